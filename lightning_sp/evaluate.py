"""Benchmark evaluation of a trained run: batched greedy answers -> ``predictions.jsonl`` + ``metrics.json``.

    python -m lightning_sp eval ckpt=runs/pooling/<stamp>/checkpoints/last.ckpt benchmark=synthetic
    python -m lightning_sp eval ckpt=... benchmark=pope questions=pope/llava_pope_test.jsonl image_root=coco/val2014
    python -m lightning_sp eval ckpt=... benchmark=vqa questions=gqa/testdev.jsonl image_root=gqa/images \
        answers=gqa/testdev_answers.jsonl

Answers come from :class:`lightning_sp.inference.Predictor` and questions from :mod:`lightning_sp.question_files`;
this module scores them and writes the files. The model is rebuilt from the checkpoint alone: ``last.ckpt`` holds
the trainable tensors and the resolved run config (``lightning_sp_config``); frozen weights (vision tower, base
LLM) are rebuilt from that config.

Protocol (LLaVA-1.5 eval scripts, docs/METHOD.md §7): the run's conversation template (vicuna_v1), the image
placeholder first, the short-answer suffix "Answer the question using a single word or phrase." on its own line
(added unless the question already ends with it, as LLaVA's own question files do), greedy decoding up to 128
new tokens. Prompts are LEFT-padded and position ids come from the attention mask, so a batch answers exactly
as the same questions one at a time do.

Inputs:
* ``benchmark=vqa``: a LLaVA-1.5 question file (jsonl: ``question_id``, ``image``, ``text``; optional
  ``category``) and optionally references, inline (``answers``/``answer`` in each line) or as ``answers=FILE``
  (jsonl or json rows with ``question_id`` and ``answers``/``answer``; a VQA annotation file; or a dict keyed by
  question id). Metrics: VQAv2 soft accuracy and exact match, overall and per category.
* ``benchmark=pope``: POPE annotations (jsonl: ``question_id``, ``image``, ``text``, ``label`` yes/no, optional
  ``category`` = split). Metrics: accuracy, precision, recall, F1, yes-ratio, overall and per split.
* ``benchmark=synthetic``: the run's own validation shards (``data.val_dir``), prompted exactly as validation
  prompts them (no suffix, the run's ``eval.max_new_tokens``): ``accuracy`` here equals ``val/accuracy``.
Without references only predictions are written (e.g. VQAv2 test-dev, for the submission server).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import MISSING, DictConfig

from lightning_sp.checkpoint import resolve_checkpoint
from lightning_sp.command_options import parse_command_options
from lightning_sp.config import ConfigError
from lightning_sp.inference import PAPER_MAX_NEW_TOKENS, Predictor, Question
from lightning_sp.metrics import ExactMatch, POPEMetrics, VQAAccuracy
from lightning_sp.question_files import (
    SHORT_ANSWER_PROMPT,
    EvalDataError,
    load_question_file,
    synthetic_questions,
)

log = logging.getLogger(__name__)

BENCHMARKS = ("pope", "synthetic", "vqa")
OVERALL_METRICS = ("accuracy", "vqa_accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass
class EvalOptions:
    """`python -m lightning_sp eval` keys; dotted keys (model.llm.dtype=...) override the run's config instead."""

    ckpt: str = MISSING  # a checkpoint of a run, or the run directory (= its checkpoints/last.ckpt)
    benchmark: str = MISSING  # pope | synthetic | vqa
    questions: Optional[str] = None  # question / annotation file (vqa, pope)
    answers: Optional[str] = None  # references for vqa, when the question file has none
    image_root: Optional[str] = None  # images are <image_root>/<image>; default: the question file's folder
    out: Optional[str] = None  # output folder; default <run_dir>/eval/<benchmark>[-<questions stem>]
    batch_size: int = 8
    max_new_tokens: Optional[int] = None  # default: 128 (paper), the run's eval.max_new_tokens for synthetic
    prompt_suffix: Optional[str] = None  # default: the short-answer prompt (none for synthetic); "none": no suffix
    limit: Optional[int] = None  # first N questions only
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    dtype: Optional[str] = None  # cast the model: float32 | bfloat16 | float16 (default: as built)
    num_workers: int = 0  # DataLoader workers decoding images


# ---- scoring ----------------------------------------------------------------------------------------------


def _by_category(questions: Sequence[Question], predictions: Sequence[str], make, update) -> dict:
    """{None: overall metric, category: metric, ...} over the questions that have references."""
    metrics = {None: make()}
    for q, p in zip(questions, predictions):
        for key in {None, q.category}:
            if key not in metrics:
                metrics[key] = make()
            update(metrics[key], q, p)
    return metrics


def score(benchmark: str, questions: Sequence[Question], predictions: Sequence[str]) -> dict[str, float]:
    """Flat metric dict: overall names, and ``<name>_<category>`` per category (POPE split, question type)."""
    out: dict[str, float] = {}

    def flat(name: str, key, value) -> None:
        out[name if key is None else f"{name}_{key}"] = float(value)

    if benchmark == "pope":
        labelled = [(q, p) for q, p in zip(questions, predictions) if q.label is not None]
        if not labelled:
            return out
        qs, ps = zip(*labelled)
        metrics = _by_category(qs, ps, POPEMetrics, lambda m, q, p: m.update([p], [q.label]))
        for key, m in sorted(metrics.items(), key=lambda kv: (kv[0] is not None, str(kv[0]))):
            for name, value in m.compute().items():
                flat(name, key, value)
        return out

    scored = [(q, p) for q, p in zip(questions, predictions) if q.references]
    if not scored:
        return out
    qs, ps = zip(*scored)
    for name, make in (("accuracy", ExactMatch), ("vqa_accuracy", VQAAccuracy)):
        metrics = _by_category(qs, ps, make, lambda m, q, p: m.update([p], [q.references]))
        for key, m in sorted(metrics.items(), key=lambda kv: (kv[0] is not None, str(kv[0]))):
            flat(name, key, m.compute())
    return out


# ---- the command ------------------------------------------------------------------------------------------


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint file belongs to: ``<run>/checkpoints/last.ckpt`` -> ``<run>``; a checkpoint
    elsewhere -> its own folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _default_out(ckpt: Path, benchmark: str, questions: Optional[str]) -> Path:
    name = benchmark if questions is None else f"{benchmark}-{Path(questions).stem}"
    return run_dir_of(ckpt) / "eval" / name


def load_benchmark(
    benchmark: str,
    cfg: DictConfig,
    questions: Optional[str] = None,
    answers: Optional[str] = None,
    image_root: Optional[str] = None,
    prompt_suffix: Optional[str] = None,
) -> list[Question]:
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{benchmark}'; valid: {', '.join(BENCHMARKS)}")
    if benchmark == "synthetic":
        if questions is not None or prompt_suffix:
            raise ConfigError(
                "benchmark=synthetic reads the run's val shards; it takes no questions= or "
                "prompt_suffix= (pass data.val_dir=... to evaluate other shards)"
            )
        return synthetic_questions(cfg)
    if questions is None:
        raise ConfigError(
            f"benchmark={benchmark} needs questions=<file.jsonl> (LLaVA question file"
            f"{' or POPE annotations' if benchmark == 'pope' else ''})"
        )
    suffix = SHORT_ANSWER_PROMPT if prompt_suffix is None else prompt_suffix
    if suffix.strip().lower() == "none":
        suffix = ""
    loaded = load_question_file(questions, image_root=image_root, answers=answers, suffix=suffix)
    if benchmark == "pope":
        for q in loaded:  # labels may also come from an answers file
            if q.label is None and q.references:
                q.label = q.references[0]
        unlabelled = [q.question_id for q in loaded if q.label is None]
        if unlabelled and len(unlabelled) < len(loaded):
            raise EvalDataError(f"{questions}: {len(unlabelled)} questions have no 'label', e.g. {unlabelled[:5]}")
    return loaded


def evaluate(
    ckpt: str,
    benchmark: str,
    questions: Optional[str] = None,
    answers: Optional[str] = None,
    image_root: Optional[str] = None,
    out: Optional[str] = None,
    batch_size: int = 8,
    max_new_tokens: Optional[int] = None,
    prompt_suffix: Optional[str] = None,
    limit: Optional[int] = None,
    device: str = "auto",
    dtype: Optional[str] = None,
    num_workers: int = 0,
    overrides: Sequence[str] = (),
    predictor: Optional[Predictor] = None,
    progress: bool = True,
) -> dict:
    """Evaluate one checkpoint on one benchmark; writes ``predictions.jsonl`` and ``metrics.json`` into ``out``
    and returns the metrics.json content. ``predictor`` reuses an already loaded model."""
    started = time.perf_counter()
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{benchmark}'; valid: {', '.join(BENCHMARKS)}")

    ckpt_path = resolve_checkpoint(ckpt)
    if predictor is None:
        predictor = Predictor.from_checkpoint(ckpt_path, overrides, device=device, dtype=dtype)
    cfg = predictor.cfg
    items = load_benchmark(benchmark, cfg, questions, answers, image_root, prompt_suffix)
    if limit is not None:
        items = items[:limit]
    if max_new_tokens is None:
        max_new_tokens = cfg.eval.max_new_tokens if benchmark == "synthetic" else PAPER_MAX_NEW_TOKENS
    log.info(
        "evaluating %s on %d %s questions (batch %d, up to %d new tokens)",
        ckpt_path,
        len(items),
        benchmark,
        batch_size,
        max_new_tokens,
    )
    gen_started = time.perf_counter()
    predictions = predictor.predict(
        items, batch_size=batch_size, max_new_tokens=max_new_tokens, num_workers=num_workers, progress=progress
    )
    gen_seconds = time.perf_counter() - gen_started
    metrics = score(benchmark, items, predictions)

    out_dir = Path(out) if out else _default_out(ckpt_path, benchmark, questions)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_id = str(run_dir_of(ckpt_path))
    with open(out_dir / "predictions.jsonl", "w") as f:
        for q, pred in zip(items, predictions):  # LLaVA's answer-file format (question_id, prompt, text, ...)
            row = {"question_id": q.question_id, "prompt": q.text, "text": pred, "model_id": model_id}
            for key in ("category", "label", "references"):
                if getattr(q, key) is not None:
                    row[key] = getattr(q, key)
            f.write(json.dumps(row) + "\n")
    result = {
        "benchmark": benchmark,
        "checkpoint": str(ckpt_path),
        "questions": questions,
        "num_questions": len(items),
        "num_scored": sum(1 for q in items if (q.label if benchmark == "pope" else q.references) is not None),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "template": cfg.stage.template,
        "metrics": metrics,
        "generation_time_s": gen_seconds,
        "questions_per_sec": len(items) / gen_seconds if gen_seconds > 0 else None,
        "wall_time_s": time.perf_counter() - started,
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in OVERALL_METRICS)
    print(
        f"{benchmark}: {len(items)} questions in {gen_seconds:.1f}s; {shown or 'no references: predictions only'}"
        f" -> {out_dir}",
        flush=True,
    )
    return result


def parse_eval_args(args: Sequence[str]) -> tuple[dict, list[str]]:
    """`key=value` arguments -> (EvalOptions fields, run-config dotlist overrides for dotted keys)."""
    return parse_command_options(
        args,
        EvalOptions,
        "eval",
        f"python -m lightning_sp eval ckpt=<run>/checkpoints/"
        f"last.ckpt benchmark=<{'|'.join(BENCHMARKS)}> [key=value ...]",
    )


def evaluate_from_args(args: Sequence[str]) -> dict:
    opts, overrides = parse_eval_args(args)
    return evaluate(**opts, overrides=overrides)


__all__ = ["BENCHMARKS", "EvalOptions", "evaluate", "evaluate_from_args", "load_benchmark", "score"]
