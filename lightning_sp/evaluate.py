"""Benchmark evaluation of a trained run: batched greedy answers -> ``predictions.jsonl`` + ``metrics.json``.

    python -m lightning_sp eval ckpt=runs/pooling/<stamp>/checkpoints/last.ckpt benchmark=synthetic
    python -m lightning_sp eval ckpt=... benchmark=pope questions=pope/llava_pope_test.jsonl image_root=coco/val2014
    python -m lightning_sp eval ckpt=... benchmark=vqa questions=gqa/testdev.jsonl image_root=gqa/images \
        answers=gqa/testdev_answers.jsonl

The model is rebuilt from the checkpoint alone: ``last.ckpt`` holds the trainable tensors and the resolved run
config (``lightning_sp_config``); frozen weights (vision tower, base LLM) are rebuilt from that config.

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
from typing import Any, Optional, Sequence

import torch
from omegaconf import MISSING, DictConfig
from tqdm import tqdm

from lightning_sp.config import ConfigError, InputError, parse_command_options
from lightning_sp.data.conversation import encode_continuation, expanded_prompt_ids, reference_answer
from lightning_sp.data.collate import left_padded_prompts
from lightning_sp.data.images import DEFAULT_STATS, ImageProcessor, ImageStats
from lightning_sp.data.tokenizer import IMAGE_TOKEN
from lightning_sp.dtypes import dtype_named
from lightning_sp.metrics import ExactMatch, POPEMetrics, VQAAccuracy
from lightning_sp.module import load_module
from lightning_sp.data.prepare import ensure_synthetic
from lightning_sp.data.shards import load_index
from lightning_sp.checkpoint import resolve_checkpoint

log = logging.getLogger(__name__)

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
BENCHMARKS = ("pope", "synthetic", "vqa")
PAPER_MAX_NEW_TOKENS = 128
OVERALL_METRICS = ("accuracy", "vqa_accuracy", "precision", "recall", "f1", "yes_ratio")


class EvalDataError(InputError):
    """A benchmark file or question that cannot be used; the message names the question and the fix."""


@dataclass
class Question:
    """One benchmark question, as the model will be asked it."""

    question_id: Any
    text: str  # the human turn (suffix included), without the <image> placeholder
    image: Any = None  # a path, encoded bytes, a PIL image, a uint8 (3,H,W) tensor, or None (text only)
    references: Optional[list] = None  # reference answers (strings, or VQA answer dicts)
    label: Optional[str] = None  # POPE: "yes" | "no"
    category: Optional[str] = None  # POPE split, question type, ...
    record: Optional[dict] = None  # a full LLaVA record to prompt from instead of `text` (synthetic val)


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


# ---- model ------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_inference(
    path: str | Path, overrides: Sequence[str] = (), device: str = "cpu", dtype: Optional[str] = None
):
    """:func:`lightning_sp.module.load_module` (the LightningModule of a run, rebuilt from a checkpoint or run
    directory, strict about trainable tensors), cast to ``dtype``, on ``device``, in eval mode."""

    cast = dtype_named(dtype) if dtype is not None else None  # a bad name fails before the model loads
    module = load_module(path, overrides)
    if cast is not None:
        # RoPE's inverse frequencies stay float32, as transformers' from_pretrained(torch_dtype=...) keeps them:
        # rounded to bf16 they shift every position's angle (logits up to ~0.03 apart on the tiny model).
        keep = {name: buf for name, buf in module.named_buffers() if name.endswith("inv_freq")}
        module = module.to(cast)
        for name, buf in keep.items():
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, buf)
    return module.to(_device(device)).eval()


# ---- prompts and batches ----------------------------------------------------------------------------------


def _pixels_from(image, processor: ImageProcessor, qid) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise EvalDataError(f"question {qid!r}: image {path} not found (check image_root)")
        image = path.read_bytes()
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image (lmms-eval passes these)
        import numpy as np

        image = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    try:
        return processor(image)
    except ValueError as exc:
        raise EvalDataError(f"question {qid!r}: {exc}") from exc


class PromptBuilder:
    """Question -> (expanded prompt ids, pixel values), and a list of those -> a left-padded batch.

    Holds no model, so DataLoader workers can use it."""

    def __init__(
        self, tokenizer, template: str, num_visual_tokens: int, image_size: int, image_stats: ImageStats | None = None
    ):
        self.tokenizer, self.template, self.num_visual_tokens = tokenizer, template, num_visual_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.processor = ImageProcessor(image_size, *(image_stats or DEFAULT_STATS))
        self.image_size = image_size

    def record(self, q: Question) -> dict:
        if q.record is not None:
            return q.record
        rec = {"id": q.question_id, "conversations": [{"from": "human", "value": q.text.replace(IMAGE_TOKEN, "")}]}
        if q.image is not None:
            rec["image"] = "image"  # any non-empty value: the placeholder goes in front of the question
        return rec

    def prompt_ids(self, q: Question) -> torch.Tensor:
        return expanded_prompt_ids(self.record(q), self.tokenizer, self.template, self.num_visual_tokens)

    def pixel_values(self, q: Question) -> torch.Tensor:
        if q.image is None:
            return torch.zeros(3, self.image_size, self.image_size)
        return _pixels_from(q.image, self.processor, q.question_id)

    def __call__(self, q: Question) -> dict:
        return {"prompt_ids": self.prompt_ids(q), "pixel_values": self.pixel_values(q)}

    def collate(self, items: list[dict]) -> dict:
        batch = left_padded_prompts([it["prompt_ids"] for it in items], self.tokenizer.pad_token_id)
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
        return batch


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (lm-eval's ``until`` convention)."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


class _Prepared(torch.utils.data.Dataset):
    def __init__(self, questions: Sequence[Question], builder: PromptBuilder):
        self.questions, self.builder = questions, builder

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict:
        return self.builder(self.questions[i])


class Predictor:
    """A trained model answering questions: batched greedy generation and continuation log-likelihoods."""

    def __init__(self, module):
        self.module = module.eval()
        self.model, self.tokenizer, self.cfg = module.model, module.tokenizer, module.cfg
        self.builder = PromptBuilder(
            self.tokenizer,
            self.cfg.stage.template,
            self.model.num_visual_tokens,
            self.cfg.model.vision.image_size,
            image_stats=self.model.vision.stats,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, overrides: Sequence[str] = (), device: str = "auto", dtype: Optional[str] = None
    ) -> "Predictor":
        return cls(load_for_inference(path, overrides, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, streamer=None, stop_strings: Sequence[str] = ()) -> list[str]:
        """Greedy answers for a collated batch; with ``stop_strings`` each answer ends before the first of them
        (decoding stops there instead of running to ``max_new_tokens``)."""
        new_tokens = self.module.generate_tokens(batch, max_new_tokens, streamer=streamer, stop_strings=stop_strings)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop_strings(t, stop_strings).strip() for t in texts]

    def predict(
        self,
        questions: Sequence[Question],
        batch_size: int = 8,
        max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
        num_workers: int = 0,
        progress: bool = True,
        stop_strings: Sequence[str] = (),
    ) -> list[str]:
        """Greedy answers, in the order of ``questions``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loader = torch.utils.data.DataLoader(
            _Prepared(questions, self.builder),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=self.builder.collate,
        )
        answers: list[str] = []
        for batch in tqdm(loader, desc="generating", unit="batch", disable=not progress):
            answers += self.generate(batch, max_new_tokens, stop_strings=stop_strings)
        return answers

    @torch.no_grad()
    def loglikelihood(self, question: Question, continuation: str) -> tuple[float, bool]:
        """(log P(continuation | prompt), whether greedy decoding would produce exactly its tokens).

        The continuation's ids are those it has after the prompt (conversation.encode_continuation: the tokens the
        model saw in training; answers follow "ASSISTANT:" after a space, so a continuation without leading
        whitespace gets one), appended to the prompt's ids, as lm-eval does."""
        cont = encode_continuation(self.builder.record(question), self.tokenizer, self.builder.template, continuation)
        return self.continuation_logprob(question, torch.tensor(cont, dtype=torch.long))

    @torch.no_grad()
    def continuation_logprob(self, question: Question, cont: torch.Tensor) -> tuple[float, bool]:
        """:meth:`loglikelihood` for continuation token ids (1-D)."""
        if cont.numel() == 0:
            return 0.0, True
        prompt = self.builder.prompt_ids(question)
        ids = torch.cat([prompt, cont]).unsqueeze(0).to(self.device)
        pixels = self.builder.pixel_values(question).unsqueeze(0).to(self.device)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
        logits = logits[0, prompt.numel() - 1 : -1].float()
        cont = cont.to(self.device)
        logprob = torch.log_softmax(logits, dim=-1).gather(1, cont.unsqueeze(1)).sum()
        return float(logprob), bool((logits.argmax(dim=-1) == cont).all())


# ---- benchmark files --------------------------------------------------------------------------------------


def read_records(path: str | Path) -> Any:
    """A .jsonl file as a list of dicts, anything else as JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise EvalDataError(f"{path}:{n}: not JSON ({exc})") from exc
        return rows
    return json.loads(text)


def _refs_of(value) -> Optional[list]:
    """References from an answers entry: a string, a list (of strings or VQA answer dicts), or a dict with
    'answers' / 'answer' / 'label'."""
    if value is None:
        return None
    if isinstance(value, dict):
        for key in ("answers", "answer", "label"):
            if key in value:
                return _refs_of(value[key])
        return None
    if isinstance(value, str):
        return [value]
    return [v["answer"] if isinstance(v, dict) else v for v in value]


def load_answers(path: str | Path) -> dict[str, list]:
    """question id (as str) -> references, from a jsonl/json list of rows, a VQA annotation file
    ({"annotations": [...]}) or a dict keyed by question id."""
    data = read_records(path)
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if isinstance(data, dict):
        return {str(k): _refs_of(v) for k, v in data.items()}
    out = {}
    for row in data:
        if "question_id" not in row:
            raise EvalDataError(f"{path}: answer rows need 'question_id', got keys {sorted(row)}")
        out[str(row["question_id"])] = _refs_of(row)
    return out


def with_suffix(text: str, suffix: Optional[str]) -> str:
    text = text.strip()
    if not suffix or text.endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def load_question_file(
    path: str | Path,
    image_root: Optional[str | Path] = None,
    answers: Optional[str] = None,
    suffix: Optional[str] = SHORT_ANSWER_PROMPT,
) -> list[Question]:
    """LLaVA-1.5 question file or POPE annotations (jsonl): question_id, image, text [, label, category,
    answers]. Image paths resolve against ``image_root`` (default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = read_records(path)
    if isinstance(rows, dict):  # a json file holding {"questions": [...]} or one list
        rows = rows.get("questions", rows)
    refs = load_answers(answers) if answers else {}
    questions, seen = [], set()
    for n, row in enumerate(rows, 1):
        if "question_id" not in row or not any(k in row for k in ("text", "question")):
            raise EvalDataError(
                f"{path} entry {n}: needs 'question_id' and 'text' (LLaVA question format), got keys {sorted(row)}"
            )
        qid = row["question_id"]
        if str(qid) in seen:
            raise EvalDataError(f"{path}: question_id {qid!r} appears twice")
        seen.add(str(qid))
        references = _refs_of(row.get("answers", row.get("answer"))) or refs.get(str(qid))
        questions.append(
            Question(
                question_id=qid,
                text=with_suffix(row.get("text", row.get("question")), suffix),
                image=root / row["image"] if row.get("image") else None,
                references=references,
                label=row.get("label"),
                category=None if row.get("category") is None else str(row["category"]),
            )
        )
    if answers:
        missing = [q.question_id for q in questions if q.references is None]
        if missing:
            raise EvalDataError(f"{answers} has no answers for {len(missing)} questions, e.g. {missing[:5]}")
    return questions


def synthetic_questions(cfg: DictConfig) -> list[Question]:
    """The run's validation shards (generated first when the config's synthetic data is missing)."""
    import webdataset as wds

    if cfg.data.val_dir is None:
        raise ConfigError(
            "benchmark=synthetic evaluates data.val_dir, which this run's config leaves unset; "
            "pass data.val_dir=<shard dir>"
        )
    if cfg.data.synthetic is not None:
        ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)
    val_dir = Path(cfg.data.val_dir)
    index = load_index(val_dir)
    urls = [str(val_dir / s["name"]) for s in index["shards"] if s["samples"] > 0]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    questions = []
    for sample in dataset:
        record = json.loads(sample["json"])
        image = next((v for k, v in sample.items() if not k.startswith("__") and k != "json"), None)
        human = [t["value"] for t in record["conversations"] if t["from"] == "human"]
        answer = reference_answer(record)
        qtype = record.get("qtype") or (record.get("qtypes") or ["all"])[-1]
        questions.append(
            Question(
                question_id=record.get("id", sample["__key__"]),
                text=human[-1].replace(IMAGE_TOKEN, "").strip(),
                image=image if record.get("image") else None,
                references=None if answer is None else [answer],
                category=str(qtype),
                record=record,
            )
        )
    return questions


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


def _default_out(ckpt: Path, benchmark: str, questions: Optional[str]) -> Path:
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    name = benchmark if questions is None else f"{benchmark}-{Path(questions).stem}"
    return run_dir / "eval" / name


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
    model_id = str(ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent)
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


__all__ = [
    "BENCHMARKS",
    "EvalOptions",
    "Predictor",
    "PromptBuilder",
    "Question",
    "SHORT_ANSWER_PROMPT",
    "evaluate",
    "load_for_inference",
    "load_question_file",
    "score",
    "synthetic_questions",
]
