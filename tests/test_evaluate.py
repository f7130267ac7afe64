"""Evaluation of a trained tiny run: checkpoint -> model, batched greedy answers, predictions + metrics files."""

import json
import subprocess
import sys

import pytest
import torch
from evalkit import trained_run, write_benchmark_files

from lightning_sp.config import ConfigError
from lightning_sp.evaluate import evaluate, parse_eval_args, score
from lightning_sp.inference import Predictor, Question
from lightning_sp.question_files import SHORT_ANSWER_PROMPT, load_question_file
from lightning_sp.paths import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.from_checkpoint(run_dir / "checkpoints" / "last.ckpt", device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_benchmark_files(tmp_path_factory.mktemp("bench"))


def test_bf16_evaluation_keeps_rope_frequencies_in_float32(run_dir):
    from lightning_sp.inference import load_for_inference

    full = load_for_inference(run_dir, dtype="float32")
    half = load_for_inference(run_dir, dtype="bfloat16")
    ref = {n: b for n, b in full.named_buffers() if n.endswith("inv_freq")}
    got = {n: b for n, b in half.named_buffers() if n.endswith("inv_freq")}
    assert ref and ref.keys() == got.keys()
    assert all(got[n].dtype == torch.float32 and torch.equal(got[n], ref[n]) for n in ref)
    assert next(half.model.llm.parameters()).dtype == torch.bfloat16


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_checkpoint_rebuilds_the_trained_model(run_dir, predictor):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    params = dict(predictor.module.named_parameters())
    for name, tensor in ckpt["state_dict"].items():
        assert torch.equal(params[name].detach(), tensor), name
    assert not predictor.module.training


def test_batched_answers_equal_unbatched_ones(predictor, files):
    questions = load_question_file(files["questions"], image_root=files["image_root"])
    questions += load_question_file(files["pope"], image_root=files["image_root"])
    one = predictor.predict(questions, batch_size=1, max_new_tokens=8, progress=False)
    many = predictor.predict(questions, batch_size=4, max_new_tokens=8, progress=False)
    assert one == many
    # The prompts really differ in length, so the batches were left-padded.
    lengths = {predictor.builder.prompt_ids(q).numel() for q in questions}
    assert len(lengths) > 1


def test_question_file_prompts_follow_llava_1_5(files):
    questions = load_question_file(files["questions"], image_root=files["image_root"], answers=files["answers"])
    assert questions[0].text == f"Which colour is it?\n{SHORT_ANSWER_PROMPT}"
    assert questions[0].references == ["red"] * 3 + ["blue"] * 7
    # A question that already carries the suffix (LLaVA's own files) does not get it twice.
    again = load_question_file(files["questions"], image_root=files["image_root"], suffix=SHORT_ANSWER_PROMPT)
    assert all(q.text.count(SHORT_ANSWER_PROMPT) == 1 for q in again)
    assert questions[1].image == files["image_root"] / "img1.png"


def test_vqa_eval_writes_every_question_and_scores(run_dir, predictor, files, tmp_path):
    out = tmp_path / "vqa"
    result = evaluate(
        str(run_dir / "checkpoints" / "last.ckpt"),
        "vqa",
        questions=str(files["questions"]),
        answers=str(files["answers"]),
        image_root=str(files["image_root"]),
        out=str(out),
        batch_size=3,
        max_new_tokens=8,
        predictor=predictor,
        progress=False,
    )
    rows = _rows(out / "predictions.jsonl")
    assert [r["question_id"] for r in rows] == [100, 101, 102, 103, 104]
    assert all(isinstance(r["text"], str) and r["prompt"].endswith(SHORT_ANSWER_PROMPT) for r in rows)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    m = saved["metrics"]
    assert {"accuracy", "vqa_accuracy", "accuracy_short", "accuracy_long", "vqa_accuracy_short"} <= set(m)
    # The metrics are those of the written predictions.
    expected = sum((0.9 if r["text"].strip().lower() == "red" else 0.0) for r in rows) / len(rows)
    assert m["vqa_accuracy"] == pytest.approx(expected)


def test_pope_eval_writes_every_question_and_confusion_metrics(run_dir, predictor, files, tmp_path):
    out = tmp_path / "pope"
    result = evaluate(
        str(run_dir / "checkpoints" / "last.ckpt"),
        "pope",
        questions=str(files["pope"]),
        image_root=str(files["image_root"]),
        out=str(out),
        batch_size=2,
        max_new_tokens=8,
        predictor=predictor,
        progress=False,
    )
    rows = _rows(out / "predictions.jsonl")
    assert [r["question_id"] for r in rows] == [f"p{i}" for i in range(5)]
    assert [r["category"] for r in rows] == ["adversarial"] * 3 + ["random"] * 2
    m = result["metrics"]
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert name in m and f"{name}_adversarial" in m and f"{name}_random" in m
    from lightning_sp.metrics import parse_yes_no

    said_yes = [parse_yes_no(r["text"]) == "yes" for r in rows]
    assert m["yes_ratio"] == pytest.approx(sum(said_yes) / 5)
    assert m["accuracy"] == pytest.approx(sum(y == (r["label"] == "yes") for y, r in zip(said_yes, rows)) / 5)


def test_synthetic_eval_reproduces_validation_accuracy(run_dir, predictor, tmp_path):
    result = evaluate(
        str(run_dir / "checkpoints" / "last.ckpt"),
        "synthetic",
        out=str(tmp_path / "syn"),
        batch_size=3,
        predictor=predictor,
        progress=False,
    )
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert result["num_questions"] == 8 and result["max_new_tokens"] == predictor.cfg.eval.max_new_tokens
    assert result["metrics"]["accuracy"] == pytest.approx(trained["val/accuracy"])
    for key, value in trained.items():
        if key.startswith("val/accuracy_"):
            assert result["metrics"][key[len("val/") :]] == pytest.approx(value), key
    rows = _rows(tmp_path / "syn" / "predictions.jsonl")
    assert len({r["question_id"] for r in rows}) == 8
    # Answer for answer what the training module's validation generates from the datamodule's val batches.
    from lightning_sp.train import build_datamodule

    dm = build_datamodule(predictor.cfg, predictor.tokenizer, predictor.model.num_visual_tokens)
    dm.setup("validate")
    val = {}
    for batch in dm.val_dataloader():
        val.update(zip(batch["ids"], predictor.generate(batch, predictor.cfg.eval.max_new_tokens)))
    assert {r["question_id"]: r["text"] for r in rows} == val


def test_score_without_references_gives_predictions_only():
    qs = [Question(question_id=1, text="q")]
    assert score("vqa", qs, ["a"]) == {} and score("pope", qs, ["yes"]) == {}


def test_eval_arguments_are_validated():
    opts, overrides = parse_eval_args(["ckpt=x.ckpt", "benchmark=pope", "batch_size=4", "model.llm.dtype=bfloat16"])
    assert (opts["ckpt"], opts["benchmark"], opts["batch_size"]) == ("x.ckpt", "pope", 4)
    assert overrides == ["model.llm.dtype=bfloat16"]
    with pytest.raises(ConfigError, match="unknown eval option 'batchsize'.*batch_size"):
        parse_eval_args(["ckpt=x", "benchmark=pope", "batchsize=4"])
    with pytest.raises(ConfigError, match="eval needs benchmark"):
        parse_eval_args(["ckpt=x"])
    # A group selection names the model, which the checkpoint already fixes: said so, not "unknown key".
    with pytest.raises(ConfigError, match="'variant=pooling' selects a config group.*stored in its checkpoint"):
        parse_eval_args(["ckpt=x", "benchmark=pope", "variant=pooling"])


def test_export_arguments_are_validated_the_same_way():
    from lightning_sp.export import export_from_args

    with pytest.raises(ConfigError, match="'variant=cropping' selects a config group"):
        export_from_args(["ckpt=x", "out=y", "variant=cropping"])
    with pytest.raises(ConfigError, match="unknown export option 'dtyp'. Did you mean 'dtype'"):
        export_from_args(["ckpt=x", "out=y", "dtyp=bfloat16"])
    with pytest.raises(ConfigError, match="export needs out"):
        export_from_args(["ckpt=x"])


def test_eval_cli_end_to_end(run_dir, files, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_sp",
            "eval",
            f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
            "benchmark=pope",
            f"questions={files['pope']}",
            f"image_root={files['image_root']}",
            f"out={out}",
            "max_new_tokens=4",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        len(_rows(out / "predictions.jsonl")) == 5 and "f1" in json.loads((out / "metrics.json").read_text())["metrics"]
    )
    bad = subprocess.run(
        [sys.executable, "-m", "lightning_sp", "eval", "ckpt=nope.ckpt", "benchmark=mmmu"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_missing_image_names_the_question(predictor, files, tmp_path):
    questions = load_question_file(files["pope"], image_root=tmp_path)  # wrong root
    with pytest.raises(ValueError, match=r"question 'p0': image .*img0.png not found"):
        predictor.predict(questions[:1], progress=False)
