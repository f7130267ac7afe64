"""Ablation studies: every arm x seed of a study trained on one budget, then a results table per arm.

    python -m lightning_sp ablate study=default trainer.max_steps=20
    make ablate ABLATE=default ARGS="trainer.max_steps=20"

A study is a YAML file in ``conf/ablate/`` (or any path given as ``study=path/to/study.yaml``)::

    description: which projector keeps spatial layout?
    seeds: [0, 1, 2]
    budget: [trainer.max_steps=300]          # overrides applied to every arm
    arms:
      - {name: mlp, overrides: [variant=mlp]}
      - {name: pooling_nodfi, overrides: [variant=pooling, projector.dfi=false]}

Each run's overrides are, in order: the budget, the arm's, the command line's (``ARGS``), then ``seed=<k>`` and
``run_dir=<root>/<study>/<arm>/seed<k>`` (so ``make tensorboard`` shows the arms side by side). Every run's config
is composed and validated before the first one starts; when ``trainer.val_check_interval`` does not divide
``trainer.max_steps`` it is lowered to their gcd, so that every run ends with a validation of its final weights.
Re-running a study skips finished runs (``metrics.json`` present); a finished run whose saved config differs from
the one the study now asks for is an error that names the differing keys (its results would silently stand for
another config); an unfinished run directory (a crash, an interrupt) is cleared and run again. A failing run is
reported and the study goes on.

Runs train in this process (``lightning_sp.train.train``), or each in a subprocess (``python -m lightning_sp
train``) when the config launches several processes (DDP/FSDP, ``trainer.devices`` other than 1) or with
``isolate=true``.

The study directory gets ``results.md`` and ``results.csv`` (the markdown also printed) and ``results.png``
(written by :mod:`lightning_sp.study_report`; the study and its runs as data: :mod:`lightning_sp.study_spec`):

- from each run's per-question results (``val_questions.jsonl``, :mod:`lightning_sp.stats`), per arm the
  validation accuracy overall and per question type with a 95 % bootstrap interval over questions, pooled over
  seeds, beside the per-type prior (each type's most frequent training answer, for the synthetic data); and each
  arm against ``mlp`` paired on the same questions and seeds: the difference, its interval, an exact p-value
  (sign-flip test over questions) and whether it is significant at 0.05. The chart shows the per-type accuracies
  with their intervals and the priors.
- from each run's ``metrics.json``, mean ± std over the finished seeds of the validation metrics, the final
  losses, the number of visual tokens, total / trainable / projector parameters, fit time and throughput.

Command-line keys of the study itself: ``study=``, ``seeds=[0,1]``, ``arms=[mlp,pooling]`` (a subset),
``root=`` (default ``runs/ablate``), ``isolate=auto|true|false``; every other ``key=value`` goes to every arm.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lightning_sp.config import CONF_DIR, ConfigError, compose, flatten, group_choices
from lightning_sp.overrides import override_key, parse_dotlist
from lightning_sp.study_report import priors, summarize, write_results
from lightning_sp.study_spec import PlannedRun, StudySpec
from lightning_sp.train import train

log = logging.getLogger(__name__)

DEFAULT_ROOT = "runs/ablate"
STUDY_KEYS = ("study", "seeds", "arms", "root", "isolate")
# Keys that do not change what a run computes: a finished run still counts when only these differ.
COSMETIC_KEYS = ("trainer.enable_progress_bar", "trainer.log_every_n_steps", "data.num_workers")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ---- study files ------------------------------------------------------------------------------------------


def study_path(study: str | Path) -> Path:
    p = Path(study)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"study file {p} not found")
        return p
    p = CONF_DIR / "ablate" / f"{study}.yaml"
    if not p.is_file():
        raise ConfigError(
            f"unknown study '{study}'; valid: {', '.join(group_choices('ablate'))} "
            f"(files in {p.parent}), or a path to a study .yaml"
        )
    return p


def load_study(study: str | Path) -> tuple[str, StudySpec]:
    """(study name = file stem, validated spec)."""
    path = study_path(study)
    schema = OmegaConf.structured(StudySpec)
    try:
        spec = OmegaConf.merge(schema, OmegaConf.load(path))
    except Exception as exc:  # unknown keys, wrong types, YAML syntax: say which file
        raise ConfigError(f"{path}: {exc}") from exc
    if OmegaConf.missing_keys(spec):
        raise ConfigError(f"{path}: missing {', '.join(sorted(OmegaConf.missing_keys(spec)))} (every arm needs a name)")
    spec = OmegaConf.to_object(spec)
    if not spec.arms:
        raise ConfigError(f"{path}: no arms; add `arms: [{{name: mlp, overrides: [variant=mlp]}}, ...]`")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers, got {spec.seeds}")
    names = [a.name for a in spec.arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: arm names must be unique; repeated: {', '.join(dupes)}")
    bad = [n for n in names if not _SAFE_NAME.match(n)]
    if bad:
        raise ConfigError(f"{path}: arm names become directory names; use letters, digits, _ . + -: {bad}")
    return path.stem, spec


# ---- planning ---------------------------------------------------------------------------------------------


def config_differences(saved_yaml: Path, cfg: DictConfig) -> list[str]:
    """Keys whose value differs between a run's saved config and ``cfg`` (keys only one of them has -- a field
    added to the schema since -- and cosmetic keys are ignored)."""

    def plain(c: Any) -> dict:  # JSON round trip: tuples (schema defaults) and lists (YAML) compare equal
        return flatten(json.loads(json.dumps(OmegaConf.to_container(c, resolve=True))))

    saved, wanted = plain(OmegaConf.load(saved_yaml)), plain(cfg)
    return [
        f"{k}: {saved[k]!r} -> {wanted[k]!r}"
        for k in sorted(saved.keys() & wanted.keys())
        if saved[k] != wanted[k] and k not in COSMETIC_KEYS
    ]


def plan_study(
    name: str,
    spec: StudySpec,
    overrides: Sequence[str] = (),
    root: str | Path = DEFAULT_ROOT,
    arms: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
) -> list[PlannedRun]:
    """Compose and validate every run of the study (nothing is built or trained)."""
    for item in overrides:
        key = override_key(item)
        if key in ("seed", "run_dir"):
            fix = "seeds=[0,1]" if key == "seed" else "root=<dir>"
            raise ConfigError(f"the study sets '{key}' of each run; use {fix} instead")
    chosen = list(spec.arms)
    if arms is not None:
        known = {a.name for a in spec.arms}
        unknown = [a for a in arms if a not in known]
        if unknown:
            raise ConfigError(f"unknown arms {unknown}; study '{name}' has: {', '.join(a.name for a in spec.arms)}")
        chosen = [a for a in spec.arms if a.name in set(arms)]
    seeds = list(spec.seeds if seeds is None else seeds)
    study_dir = Path(root) / name
    runs = []
    for arm in chosen:
        for seed in seeds:
            run_dir = study_dir / arm.name / f"seed{seed}"
            run_overrides = [*spec.budget, *arm.overrides, *overrides, f"seed={seed}", f"run_dir={run_dir}"]
            try:
                cfg = compose(run_overrides)
                t = cfg.trainer
                if t.max_steps % t.val_check_interval:
                    # The table must report the final model: validate at a step count that divides max_steps.
                    every = math.gcd(t.max_steps, t.val_check_interval)
                    log.info(
                        "arm %s: trainer.val_check_interval %d -> %d so that step %d (the last) validates",
                        arm.name,
                        t.val_check_interval,
                        every,
                        t.max_steps,
                    )
                    run_overrides.insert(-2, f"trainer.val_check_interval={every}")
                    cfg = compose(run_overrides)
            except ConfigError as exc:
                raise ConfigError(f"arm '{arm.name}' (seed {seed}): {exc}") from exc
            runs.append(PlannedRun(arm.name, seed, run_overrides, run_dir, cfg))
    stale = []
    for run in runs:
        if run.finished and (run.run_dir / "config.yaml").is_file():
            diff = config_differences(run.run_dir / "config.yaml", run.cfg)
            if diff:
                stale.append(f"{run.run_dir}: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}")
    if stale:
        raise ConfigError(
            "finished runs were trained with another config than the study now asks for:\n  "
            + "\n  ".join(stale)
            + "\ndelete them, or write this variant of the study elsewhere "
            "(root=<dir>)"
        )
    return runs


def _needs_process(cfg: DictConfig) -> bool:
    """Launchers (DDP/FSDP) re-execute the command line in every rank: give each run its own process."""
    t = cfg.trainer
    return str(t.devices) not in ("1", "[0]") or t.strategy not in ("auto", "single_device")


# ---- running ----------------------------------------------------------------------------------------------


def _run_in_process(run: PlannedRun) -> None:
    try:
        train(run.cfg)
    finally:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def _run_subprocess(run: PlannedRun) -> None:
    cmd = [sys.executable, "-m", "lightning_sp", "train", *run.overrides]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with status {proc.returncode}")
    if not run.finished:
        raise RuntimeError(f"{run.run_dir} has no metrics.json after training")


def run_study(
    study: str | Path = "default",
    overrides: Sequence[str] = (),
    root: str | Path = DEFAULT_ROOT,
    arms: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    isolate: str | bool = "auto",
    progress: bool = True,
) -> dict:
    """Run (or finish) a study and write its results table. Returns ``{"study_dir", "ran", "skipped",
    "failed", "rows", "markdown"}``; ``failed`` lists ``(arm, seed, error)``."""
    name, spec = load_study(study)
    runs = plan_study(name, spec, overrides, root, arms, seeds)
    study_dir = Path(root) / name
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.yaml").write_text(
        OmegaConf.to_yaml(
            OmegaConf.create(
                {
                    "source": str(study_path(study)),
                    "command_line": list(overrides),
                    **OmegaConf.to_container(OmegaConf.structured(spec)),
                }
            )
        )
    )

    ran, skipped, failed = [], [], []
    bar = tqdm(total=len(runs), desc=f"ablate {name}", unit="run", disable=not progress, dynamic_ncols=True)
    for run in runs:
        label = f"{run.arm}/seed{run.seed}"
        bar.set_postfix_str(label)
        if run.finished:
            log.info("%s: finished earlier (%s), skipped", label, run.run_dir / "metrics.json")
            skipped.append(label)
            bar.update()
            continue
        if run.run_dir.exists():
            log.warning("%s: clearing the unfinished run in %s", label, run.run_dir)
            shutil.rmtree(run.run_dir)
        separate = (
            isolate is True
            or str(isolate).lower() == "true"
            or (str(isolate).lower() == "auto" and _needs_process(run.cfg))
        )
        try:
            (_run_subprocess if separate else _run_in_process)(run)
            ran.append(label)
        except Exception as exc:  # noqa: BLE001 -- one failing arm must not lose the others
            log.exception("%s failed", label)
            failed.append((run.arm, run.seed, f"{type(exc).__name__}: {exc}"))
        bar.update()
    bar.close()

    arm_names = [a.name for a in spec.arms if arms is None or a.name in set(arms)]
    seeds = list(spec.seeds if seeds is None else seeds)
    rows = summarize(study_dir, arm_names, seeds)
    arm_overrides = {a.name: a.overrides for a in spec.arms}
    markdown = write_results(
        study_dir, name, spec, rows, arm_overrides, list(overrides), failed, seeds, priors=priors(runs, rows)
    )
    print(markdown, flush=True)
    chart_note = f", {study_dir / 'results.png'}" if (study_dir / "results.png").is_file() else ""
    print(
        f"results: {study_dir / 'results.md'}, {study_dir / 'results.csv'}{chart_note} "
        f"({len(ran)} run, {len(skipped)} skipped, {len(failed)} failed)",
        flush=True,
    )
    return {
        "study_dir": study_dir,
        "ran": ran,
        "skipped": skipped,
        "failed": failed,
        "rows": rows,
        "markdown": markdown,
    }


# ---- command line -----------------------------------------------------------------------------------------


def parse_ablate_args(args: Sequence[str]) -> tuple[dict, list[str]]:
    """`key=value` arguments -> (run_study keyword arguments, overrides for every arm)."""
    own, rest = [], []
    for item in args:
        (own if override_key(item, "study=default") in STUDY_KEYS else rest).append(item)
    parsed = OmegaConf.to_container(parse_dotlist(own, "study options"))
    kwargs: dict[str, Any] = {}
    if parsed.get("study") is not None:
        kwargs["study"] = str(parsed["study"])
    if parsed.get("root") is not None:
        kwargs["root"] = str(parsed["root"])
    if parsed.get("isolate") is not None:
        value = str(parsed["isolate"]).lower()
        if value not in ("auto", "true", "false"):
            raise ConfigError(f"isolate must be auto, true or false, got {parsed['isolate']!r}")
        kwargs["isolate"] = value
    for key, kind in (("seeds", int), ("arms", str)):
        if parsed.get(key) is not None:
            value = parsed[key]
            value = value if isinstance(value, list) else [value]
            try:
                kwargs[key] = [kind(v) for v in value]
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{key} must be a list like {key}=[...], got {parsed[key]!r}") from exc
    return kwargs, rest


def ablate_from_args(args: Sequence[str]) -> dict:
    kwargs, overrides = parse_ablate_args(args)
    return run_study(overrides=overrides, **kwargs)
