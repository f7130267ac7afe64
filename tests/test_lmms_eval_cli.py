"""Real lmms-eval, end to end: its own CLI (`python -m lmms_eval --model lightning_sp ...`) in a fresh process
started outside the checkout, on two tasks defined here over local files (synthetic-scene images, nothing from a
hub), one `generate_until` and one `multiple_choice` (loglikelihood). The model is found the way lmms-eval >= 0.6
finds plugins (the `lmms_eval.models` entry point -> a ModelManifest); batch size and device come from lmms-eval's
own options. Its results JSON and logged samples are checked against our `eval` (answers) and our
`Predictor.loglikelihood` on the same questions.

`make test` installs lmms-eval (the `eval` extra); without it these tests fail and say so."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from evalkit import trained_run, write_benchmark_files

pytestmark = pytest.mark.slow

LMMS_TIMEOUT_S = 600
MAX_NEW_TOKENS = 6
# lmms-eval 0.7.3's multiple-choice failure (below), as its log shows it
UPSTREAM_MC_BUG = ("lls, is_greedy = zip(*results)", "ValueError: too many values to unpack (expected 2)")
SUFFIX = "Answer the question using a single word or phrase."  # what our `eval` appends (question_files.py)

UTILS = """
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]

def doc_to_text(doc):
    return doc["text"] + "\\n" + SUFFIX
"""

GEN_TASK = """
task: lsp_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function lsp_utils.doc_to_visual
doc_to_text: !function lsp_utils.doc_to_text
doc_to_target: target
generation_kwargs:
  max_new_tokens: {max_new}
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
metadata:
  version: 0.0
"""

MC_TASK = """
task: lsp_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_visual: !function lsp_utils.doc_to_visual
doc_to_text: !function lsp_utils.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def require_lmms_eval():
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.fail("lmms-eval is not installed: `make test` installs the eval extra (pip install -e '.[eval]')")


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    """Our `eval` and lmms-eval's CLI on the same questions; returns what both produced."""
    require_lmms_eval()
    from lightning_sp.evaluate import evaluate

    run_dir = trained_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("lmms-cli")
    files = write_benchmark_files(root / "bench")
    ours = evaluate(
        str(run_dir),
        "pope",
        questions=str(files["pope"]),
        image_root=str(files["image_root"]),
        batch_size=3,
        max_new_tokens=MAX_NEW_TOKENS,
        device="cpu",
        out=str(root / "ours"),
        progress=False,
    )
    predictions = [json.loads(line) for line in (root / "ours" / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in files["pope"].read_text().splitlines()]
    # The generation task's reference is our own answer for even docs and the POPE label for odd ones: its exact
    # match is then a number we can compute independently and that is not 0 for a 2-step model's odd answers.
    docs = [
        {
            **row,
            "image_path": str(files["image_root"] / row["image"]),
            "target": pred["text"] if i % 2 == 0 else row["label"],
        }
        for i, (row, pred) in enumerate(zip(rows, predictions))
    ]
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "lsp_utils.py").write_text(f"SUFFIX = {SUFFIX!r}\n" + UTILS)
    (tasks / "lsp_gen.yaml").write_text(GEN_TASK.format(docs=tasks / "docs.jsonl", max_new=MAX_NEW_TOKENS))
    (tasks / "lsp_mc.yaml").write_text(MC_TASK.format(docs=tasks / "docs.jsonl"))

    return {
        "run_dir": run_dir,
        "files": files,
        "docs": docs,
        "ours": ours,
        "predictions": predictions,
        "tasks": tasks,
        "root": root,
        "gen": run_lmms_eval(run_dir, tasks, "lsp_gen", root / "lmms-gen"),
    }


def run_lmms_eval(run_dir: Path, tasks: Path, task: str, out: Path, processes: int = 1) -> dict:
    """`python -m lmms_eval` as a user runs it, from a directory outside the checkout (the model comes from the
    installed package's entry point), offline. lmms-eval exits 0 even when evaluation fails, so the caller checks
    what it wrote."""
    cwd = out.with_name(out.name + "-cwd")
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LMMS_"))}
    env.update(
        HF_HOME=str(out.with_name("hf")),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    launcher = (
        [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
        ]
        if processes > 1
        else []
    )
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "lmms_eval",
        "--model",
        "lightning_sp",
        "--model_args",
        f"pretrained={run_dir},dtype=float32",
        "--tasks",
        task,
        "--include_path",
        str(tasks),
        "--batch_size",
        "3",
        "--device",
        "cpu",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LMMS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"out": out, "log": proc.stdout + proc.stderr}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one(out: Path, pattern: str) -> Path:
    found = sorted(out.rglob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def _samples(out: Path, task: str) -> list[dict]:
    rows = [json.loads(line) for line in _one(out, f"*_samples_{task}.jsonl").read_text().splitlines() if line]
    return sorted(rows, key=lambda r: r["doc_id"])


def test_the_model_is_found_through_the_manifest_registry(lmms_run):
    assert "Failed to load model entry-point manifests" not in lmms_run["gen"]["log"]
    import lmms_eval.models as models

    from lightning_sp.lmms_adapter import LightningSP

    assert models.get_model("lightning_sp") is LightningSP
    assert "lightning_sp" in models.list_available_models()


def test_generate_until_results_equal_our_eval(lmms_run):
    docs, predictions = lmms_run["docs"], lmms_run["predictions"]
    out = lmms_run["gen"]["out"]
    assert list(out.rglob("*_results.json")), lmms_run["gen"]["log"][-6000:]
    samples = _samples(out, "lsp_gen")
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    answers = [
        s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples
    ]
    assert answers == [p["text"] for p in predictions]  # token for token the answers our `eval` wrote
    # lmms-eval's score, recomputed from our answers and the task's references (case-insensitive exact match)
    expected = sum(p["text"].lower() == d["target"].lower() for p, d in zip(predictions, docs)) / len(docs)
    results = json.loads(_one(out, "*_results.json").read_text())["results"]
    assert results["lsp_gen"]["exact_match,none"] == pytest.approx(expected)
    assert expected >= 0.5  # the even docs at least: the check above is not 0 == 0


def test_two_processes_share_the_requests_and_agree(lmms_run):
    """`torchrun --nproc-per-node 2 -m lmms_eval ...` (gloo on CPU): lmms-eval gives each rank its share of the
    docs and gathers them; the results and every answer equal the single-process run's."""
    two = run_lmms_eval(lmms_run["run_dir"], lmms_run["tasks"], "lsp_gen", lmms_run["root"] / "lmms-2proc", processes=2)
    assert "Building contexts for lsp_gen on rank 1" in two["log"]
    one_out = lmms_run["gen"]["out"]
    assert list(two["out"].rglob("*_results.json")), two["log"][-6000:]
    results = [json.loads(_one(o, "*_results.json").read_text())["results"]["lsp_gen"] for o in (one_out, two["out"])]
    assert results[0]["exact_match,none"] == results[1]["exact_match,none"]
    answers = [[(s["doc_id"], s["filtered_resps"]) for s in _samples(o, "lsp_gen")] for o in (one_out, two["out"])]
    assert answers[0] == answers[1]


def test_multiple_choice_results_equal_our_loglikelihoods(lmms_run):
    from PIL import Image

    from lightning_sp.inference import Predictor, Question

    mc = run_lmms_eval(lmms_run["run_dir"], lmms_run["tasks"], "lsp_mc", lmms_run["root"] / "lmms-mc")
    if not list(mc["out"].rglob("*_results.json")) and all(m in mc["log"] for m in UPSTREAM_MC_BUG):
        # lmms-eval 0.7.3 turns every loglikelihood result into its str() (api/instance.py,
        # unwrap_generation_output) and then fails to unpack it in multiple_choice scoring, for every model
        # (llava_hf too). Our loglikelihood is checked on lmms-eval's request objects in test_lmms_adapter.py; this
        # test runs the full comparison as soon as an lmms-eval without the bug is installed.
        pytest.xfail("lmms-eval 0.7.3 stringifies loglikelihood results: multiple_choice fails for every model")
    assert list(mc["out"].rglob("*_results.json")), mc["log"][-6000:]
    predictor = Predictor.from_checkpoint(lmms_run["run_dir"], device="cpu")
    samples = _samples(mc["out"], "lsp_mc")
    hits = []
    for doc, sample in zip(lmms_run["docs"], samples):
        q = Question(question_id=0, text=f"{doc['text']}\n{SUFFIX}", image=Image.open(doc["image_path"]).convert("RGB"))
        ours = [predictor.loglikelihood(q, choice)[0] for choice in (" yes", " no")]
        theirs = [r[0][0] if isinstance(r[0], list) else r[0] for r in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        hits.append(["yes", "no"][max(range(2), key=ours.__getitem__)] == doc["label"])
    results = json.loads(_one(mc["out"], "*_results.json").read_text())["results"]
    assert results["lsp_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_model_args_that_lmms_eval_also_passes_get_a_plain_error(tmp_path):
    require_lmms_eval()
    from lightning_sp.lmms_adapter import LightningSP

    with pytest.raises(
        ValueError,
        match="batch_size given in --model_args and by lmms-eval; use lmms-eval's own option \\(--batch_size\\)",
    ):
        LightningSP.create_from_arg_string("pretrained=x,batch_size=8", {"batch_size": 1, "device": None})


def test_discovery_does_not_import_the_model_code():
    """lmms-eval imports every plugin's entry point when it starts: ours must stay light and cannot fail on our
    model code (a failing entry point makes lmms-eval drop the plugins registered after it)."""
    require_lmms_eval()
    code = textwrap.dedent("""
        import sys
        from importlib.metadata import entry_points
        (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "lightning_sp"]
        manifest = ep.load()()
        ours = ("lightning", "lightning_sp.lmms_adapter", "lightning_sp.evaluate", "lightning_sp.module")
        heavy = sorted(m for m in ours if m in sys.modules)
        print(manifest.model_id, manifest.simple_class_path, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "lightning_sp lightning_sp.lmms_adapter.LightningSP []", out.stdout
