"""A study's results: per arm and question type, accuracy with a 95 % bootstrap interval over questions pooled
over seeds, beside the per-type prior; each arm against the reference arm paired on the same questions (difference,
interval, exact p-value); mean +- std of each run's final metrics; written as results.md, results.csv and a PNG
chart. The numbers come from lightning_sp.stats; this module reads the runs and lays the numbers out."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lightning_sp import stats
from lightning_sp.data.synthetic import majority_baseline
from lightning_sp.paths import resolve
from lightning_sp.study_spec import ALPHA, REFERENCE_ARM, PlannedRun, StudySpec

log = logging.getLogger(__name__)


# ---- results ----------------------------------------------------------------------------------------------

# Reported keys, in table order (per-question-type accuracies are inserted after val/accuracy).
_TAIL_KEYS = (
    "val/loss",
    "train/loss",
    "num_visual_tokens",
    "params/total",
    "params/trainable",
    "params/projector",
    "fit_time_s",
    "fit_samples_per_sec",
)
_HEADERS = {
    "val/accuracy": "val acc",
    "val/loss": "val loss",
    "train/loss": "train loss",
    "num_visual_tokens": "visual tokens",
    "params/total": "params",
    "params/trainable": "trainable",
    "params/projector": "projector",
    "fit_time_s": "fit time (s)",
    "fit_samples_per_sec": "samples/s",
}
_COUNTS = ("num_visual_tokens", "params/total", "params/trainable", "params/projector")


def summarize(study_dir: Path, arms: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Per arm: ``{"arm", "seeds": [finished seeds], "stats": {key: (mean, std or None)}}``."""
    runs = {}
    for arm in arms:
        runs[arm] = {}
        for seed in seeds:
            path = study_dir / arm / f"seed{seed}" / "metrics.json"
            if path.is_file():
                runs[arm][seed] = json.loads(path.read_text())
    qtypes = sorted(
        {k for per_seed in runs.values() for m in per_seed.values() for k in m if k.startswith("val/accuracy_")}
    )
    keys = ["val/accuracy", *qtypes, *_TAIL_KEYS]
    rows = []
    for arm in arms:
        stats = {}
        for key in keys:
            values = [
                m[key] for m in runs[arm].values() if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])
            ]
            if values:
                stats[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
        rows.append({"arm": arm, "seeds": sorted(runs[arm]), "stats": stats})
    add_question_stats(rows, {arm: _question_hits(study_dir, arm, sorted(runs[arm])) for arm in arms})
    return rows


# ---- per-question statistics: intervals, paired comparisons, priors ------------------------------------------


def _question_hits(study_dir: Path, arm: str, seeds: Sequence[int]) -> dict[int, dict[str, tuple[str, int]]]:
    """``{seed: {question id: (qtype, hit)}}`` of the arm's finished runs that wrote per-question results."""
    out = {}
    for seed in seeds:
        path = study_dir / arm / f"seed{seed}" / stats.VAL_QUESTIONS
        if path.is_file():
            out[seed] = {q["id"]: (q["qtype"], q["hit"]) for q in stats.read_questions(path)}
        else:
            log.warning(
                "%s has no %s (a run from before per-question results): left out of the intervals",
                path.parent,
                stats.VAL_QUESTIONS,
            )
    return out


def _common_ids(per_seed: Sequence[dict], arm: str) -> list[str]:
    """The question ids every run scored. Runs of one study score the same split, so they normally agree."""
    common = set.intersection(*(set(h) for h in per_seed))
    if any(len(h) != len(common) for h in per_seed):
        log.warning("%s: its runs scored different questions; using the %d they share", arm, len(common))
    return sorted(common)


def _hit_matrix(per_seed: Sequence[dict], ids: Sequence[str]) -> np.ndarray:
    return np.array([[h[i][1] for h in per_seed] for i in ids], dtype=np.int64)


def add_question_stats(rows: list[dict], hits: dict[str, dict[int, dict]], reference: str = REFERENCE_ARM) -> None:
    """Add to each row ``intervals`` ({accuracy key: stats.Interval}, overall and per question type, pooled over
    the seeds with per-question results), ``question_ids`` and ``paired`` (stats.Paired against ``reference``
    on the questions and seeds both arms have; None for the reference itself or without one)."""
    for row in rows:
        per_seed = list(hits[row["arm"]].values())
        row["intervals"], row["question_ids"], row["paired"] = {}, [], None
        if not per_seed:
            continue
        ids = _common_ids(per_seed, row["arm"])
        if not ids:
            continue
        matrix = _hit_matrix(per_seed, ids)
        qtypes = np.array([per_seed[0][i][0] for i in ids])
        row["question_ids"] = ids
        row["intervals"]["val/accuracy"] = stats.accuracy_interval(matrix)
        for qtype in sorted(set(qtypes.tolist()) - {"all"}):  # "all": the datamodule's type of untyped records
            row["intervals"][f"val/accuracy_{qtype}"] = stats.accuracy_interval(matrix[qtypes == qtype])
        ref = hits.get(reference, {})
        seeds = sorted(set(ref) & set(hits[row["arm"]]))
        if row["arm"] == reference or not seeds:
            continue
        arm_runs, ref_runs = [hits[row["arm"]][s] for s in seeds], [ref[s] for s in seeds]
        ids = _common_ids(arm_runs + ref_runs, f"{row['arm']} vs {reference}")
        if ids:
            row["paired"] = stats.paired_comparison(_hit_matrix(arm_runs, ids), _hit_matrix(ref_runs, ids))


def priors(runs: Sequence[PlannedRun], rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per arm, what answering each question type's most frequent training answer scores on the questions the
    arm was scored on (``lightning_sp.data.synthetic.majority_baseline``), keyed like the accuracies
    (``val/accuracy``, ``val/accuracy_<type>``). Arms without synthetic data (or its JSON) get none."""

    raw = {}  # raw_dir -> (train records, val records by id), each read once
    out = {}
    scored = {r["arm"]: r["question_ids"] for r in rows if r.get("question_ids")}
    for run in runs:
        synthetic = run.cfg.data.synthetic
        if run.arm in out or run.arm not in scored or synthetic is None:
            continue
        root = resolve(synthetic.raw_dir)
        if root not in raw:
            if not (root / "train.json").is_file() or not (root / "val.json").is_file():
                log.warning("no train.json/val.json in %s: no per-type prior for %s", root, run.arm)
                continue
            raw[root] = (
                json.loads((root / "train.json").read_text()),
                {r["id"]: r for r in json.loads((root / "val.json").read_text())},
            )
        train, val = raw[root]
        baseline = majority_baseline([val[i] for i in scored[run.arm] if i in val], reference=train)
        out[run.arm] = {
            "val/accuracy": baseline["overall"],
            **{f"val/accuracy_{qt}": acc for qt, acc in baseline["per_qtype"].items()},
        }
    return out


def _keys(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k in r["stats"]}
    qtypes = sorted(k for k in present if k.startswith("val/accuracy_"))
    return [k for k in ("val/accuracy", *qtypes, *_TAIL_KEYS) if k in present]


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _cell(key: str, stat: Optional[tuple]) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    if key in _COUNTS:  # the same for every seed
        return _human(mean)
    digits = 3 if ("accuracy" in key or "loss" in key) else 1
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _header(key: str) -> str:
    if key.startswith("val/accuracy_"):
        return "acc " + key[len("val/accuracy_") :]
    return _HEADERS.get(key, key)


def _accuracy_keys(keys) -> list[str]:
    """Accuracy keys in table order: overall first, then the question types alphabetically."""
    return sorted(set(keys), key=lambda k: (k != "val/accuracy", k))


def _interval_cell(iv: Optional[stats.Interval]) -> str:
    return "–" if iv is None else f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def _prior_rows(rows: list[dict], priors: dict[str, dict[str, float]]) -> list[tuple[str, dict[str, float]]]:
    """(label, prior) per distinct prior: one "prior" row when every arm was scored on the same questions."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["arm"] in priors:
            groups.setdefault(json.dumps(priors[r["arm"]], sort_keys=True), []).append(r["arm"])
    if len(groups) == 1:
        return [("prior", priors[next(iter(groups.values()))[0]])]
    return [(f"prior ({', '.join(arms)})", priors[arms[0]]) for arms in groups.values()]


def _interval_lines(rows: list[dict], priors: dict[str, dict[str, float]], reference: str) -> list[str]:
    keys = _accuracy_keys(k for r in rows for k in r["intervals"])
    lines = [
        "## Accuracy with 95 % confidence intervals",
        "",
        "Exact match on the validation questions, scored teacher-forced (every answer token and the end of "
        "turn right; equal to greedy decoding + exact match), pooled over the seeds: the accuracy over every "
        f"question x seed, its interval a percentile bootstrap over questions ({stats.N_BOOT:,} resamples, "
        "each resampled question bringing its hits from every seed)."
        + (
            " `prior`: answering each question type's most frequent training answer (what guessing scores)."
            if priors
            else " No prior: the study's data is not the synthetic set (or its JSON is missing)."
        ),
        "",
    ]
    header = ["arm", "seeds", "questions", *[_header(k) for k in keys]]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, prior in _prior_rows(rows, priors):
        cells = [f"{prior[k]:.3f}" if k in prior else "–" for k in keys]
        lines.append("| " + " | ".join([label, "–", "–", *cells]) + " |")
    for r in rows:
        if r["intervals"]:
            n = r["intervals"]["val/accuracy"]
            lines.append(
                "| "
                + " | ".join(
                    [r["arm"], str(n.seeds), str(n.questions), *[_interval_cell(r["intervals"].get(k)) for k in keys]]
                )
                + " |"
            )
    lines += ["", f"## Paired comparison with `{reference}`", ""]
    paired = [r for r in rows if r["paired"] is not None]
    if not paired:
        return lines + [
            f"No paired comparison: the study has no `{reference}` arm with per-question results, "
            "the reference every arm is compared with.",
            "",
        ]
    lines += [
        f"Each arm minus `{reference}` on the same questions and seeds. Interval: paired bootstrap over "
        "questions; p: exact two-sided sign-flip test over questions (each question's hits summed over "
        "seeds; with one seed, McNemar's exact test on the discordant pairs). better / worse: question x "
        f"seed pairs only the arm / only `{reference}` got right. **Bold**: p < {ALPHA}.",
        "",
        "| arm | questions x seeds | difference | 95 % CI | p | better / worse | significant |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in paired:
        c = r["paired"]
        p = f"{c.p_value:.3g}"
        cells = [
            r["arm"],
            f"{c.questions} x {c.seeds}",
            f"{c.difference:+.3f}",
            f"[{c.low:+.3f}, {c.high:+.3f}]",
            f"**{p}**" if c.significant(ALPHA) else p,
            f"{c.better} / {c.worse}",
            "yes" if c.significant(ALPHA) else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _spread_lines(rows: list[dict], seeds: Sequence[int]) -> list[str]:
    """Mean ± sample std over seeds of every metrics.json value, the winner of each accuracy column in bold."""
    keys = _keys(rows)
    best = {}
    for key in (k for k in keys if k.startswith("val/accuracy")):
        means = [r["stats"][key][0] for r in rows if key in r["stats"]]
        if len(means) > 1 and min(means) < max(means):  # bold the winner(s), not a column of ties
            best[key] = max(means)
    lines = [
        f"Mean ± sample std over seeds {list(seeds)} of each run's final metrics (`metrics.json`; accuracies "
        "as above, per question type in `acc <type>`); fit time includes validation.",
        "",
    ]
    header = ["arm", "seeds", *[_header(k) for k in keys]]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(keys)) + "|"]
    for r in rows:
        cells = []
        for k in keys:
            text = _cell(k, r["stats"].get(k))
            if k in best and k in r["stats"] and r["stats"][k][0] == best[k]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join([r["arm"], str(len(r["seeds"])), *cells]) + " |")
    return lines


def _write_csv(
    path: Path, rows: list[dict], arm_overrides: dict, priors: dict[str, dict[str, float]], reference: str
) -> None:
    keys = _keys(rows)
    acc_keys = _accuracy_keys(k for r in rows for k in r["intervals"])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "arm",
            "overrides",
            "n_seeds",
            "seeds",
            *[f"{k}_{s}" for k in keys for s in ("mean", "std")],
            "n_questions",
            *[f"{k}_{s}" for k in acc_keys for s in ("pooled", "ci_low", "ci_high", "prior")],
            "reference",
            "diff",
            "diff_ci_low",
            "diff_ci_high",
            "p_value",
            "significant",
        ]
    )
    for r in rows:
        values = []
        for k in keys:
            mean, std = r["stats"].get(k, (None, None))
            values += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
        values.append(str(r["intervals"]["val/accuracy"].questions) if r["intervals"] else "")
        prior = priors.get(r["arm"], {})
        for k in acc_keys:
            iv = r["intervals"].get(k)
            values += ["", "", ""] if iv is None else [repr(iv.estimate), repr(iv.low), repr(iv.high)]
            values.append(repr(prior[k]) if k in prior else "")
        c = r["paired"]
        values += (
            ["", "", "", "", "", ""]
            if c is None
            else [reference, repr(c.difference), repr(c.low), repr(c.high), repr(c.p_value), str(c.significant(ALPHA))]
        )
        writer.writerow(
            [
                r["arm"],
                " ".join(arm_overrides.get(r["arm"], [])),
                len(r["seeds"]),
                " ".join(map(str, r["seeds"])),
                *values,
            ]
        )
    path.write_text(buf.getvalue())


def write_results(
    study_dir: Path,
    name: str,
    spec: StudySpec,
    rows: list[dict],
    arm_overrides: dict,
    command_line: list[str],
    failed: list,
    seeds: Optional[Sequence[int]] = None,
    priors: Optional[dict[str, dict[str, float]]] = None,
    reference: str = REFERENCE_ARM,
) -> str:
    """Write results.md and results.csv (and results.png when there are per-question results); returns the
    markdown. ``seeds``: those asked for (default the spec's); ``priors``: :func:`priors`' per arm."""
    priors = priors or {}
    lines = [f"# Ablation study `{name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [
        f"Budget (every arm): `{' '.join(spec.budget) or '-'}`"
        + (f"; command line: `{' '.join(command_line)}`" if command_line else "")
        + ".",
        "",
    ]
    if any(r["intervals"] for r in rows):
        lines += _interval_lines(rows, priors, reference)
        write_chart(study_dir / "results.png", rows, priors)
        lines += ["![per-type accuracy with 95 % intervals](results.png)", "", "## Spread over seeds", ""]
    else:  # no per-question results (runs from before them): no chart, and none left from an earlier table
        (study_dir / "results.png").unlink(missing_ok=True)
    lines += _spread_lines(rows, spec.seeds if seeds is None else seeds)
    lines += ["", "| arm | overrides |", "|---|---|"]
    lines += [f"| {r['arm']} | `{' '.join(arm_overrides.get(r['arm'], [])) or '-'}` |" for r in rows]
    if failed:
        lines += ["", "Failed runs (re-run the study to retry them):", ""]
        lines += [f"- {arm} seed {seed}: {err.splitlines()[0][:300] if err else ''}" for arm, seed, err in failed]
    markdown = "\n".join(lines) + "\n"
    (study_dir / "results.md").write_text(markdown)
    _write_csv(study_dir / "results.csv", rows, arm_overrides, priors, reference)
    return markdown


def chart(rows: list[dict], priors: dict[str, dict[str, float]]):
    """matplotlib Figure: per question type (and overall), one bar per arm at its pooled accuracy with the 95 %
    interval as error bar; each arm's prior as a black tick across its bar."""
    from matplotlib.figure import Figure

    shown = [r for r in rows if r["intervals"]]
    keys = _accuracy_keys(k for r in shown for k in r["intervals"])
    groups = np.arange(len(keys))
    width = 0.8 / len(shown)
    fig = Figure(figsize=(max(6.0, 1.2 * len(keys) * max(1.0, len(shown) / 4)), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for j, r in enumerate(shown):
        x = groups - 0.4 + (j + 0.5) * width
        ivs = [r["intervals"].get(k) for k in keys]
        heights = [iv.estimate if iv else np.nan for iv in ivs]
        errors = [[iv.estimate - iv.low if iv else 0 for iv in ivs], [iv.high - iv.estimate if iv else 0 for iv in ivs]]
        ax.bar(x, heights, width, yerr=errors, capsize=2, ecolor="0.3", label=r["arm"])
        prior = priors.get(r["arm"], {})
        at = [(xi, prior[k]) for xi, k in zip(x, keys) if k in prior]
        if at:
            ax.hlines(
                [p for _, p in at],
                [xi - width / 2 for xi, _ in at],
                [xi + width / 2 for xi, _ in at],
                colors="black",
                linewidths=2,
                label="prior (majority answer per type)" if j == 0 else None,
            )
    ax.set_xticks(groups, ["overall" if k == "val/accuracy" else k[len("val/accuracy_") :] for k in keys])
    ax.set_ylabel("accuracy (95 % CI)")
    ax.set_ylim(0, 1)
    fig.legend(loc="outside upper center", fontsize="small", ncols=min(5, len(shown) + 1))  # off the bars
    return fig


def write_chart(path: Path, rows: list[dict], priors: dict[str, dict[str, float]]) -> None:
    chart(rows, priors).savefig(path, dpi=110)  # Figure.savefig renders with Agg: no display, no pyplot state
