"""Benchmark question files as `eval` reads them: LLaVA-1.5 question jsonl (with inline references or a separate
answers file: jsonl/json rows, a VQA annotation file, or a dict keyed by question id), POPE annotations, and the
synthetic validation split. A question that cannot be used is an EvalDataError naming it and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from lightning_sp.config import ConfigError
from lightning_sp.data import locations
from lightning_sp.data.conversation import reference_answer
from lightning_sp.data.prepare import ensure_synthetic
from lightning_sp.data.shards import load_index
from lightning_sp.data.tokenizer import IMAGE_TOKEN
from lightning_sp.inference import EvalDataError, Question

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


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
    if cfg.data.val_dir is None:
        raise ConfigError(
            "benchmark=synthetic evaluates data.val_dir, which this run's config leaves unset; "
            "pass data.val_dir=<shard dir>"
        )
    if cfg.data.synthetic is not None:
        ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)
    val_dir = locations.normalise(cfg.data.val_dir)  # a directory or a URL, as training reads it
    index = load_index(val_dir)
    dataset = locations.ShardDataset([locations.join(val_dir, s["name"]) for s in index["shards"] if s["samples"] > 0])
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
