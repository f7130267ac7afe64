"""Correctness of the benchmark helpers (benchmarks/*.py): results-file sections, FLOP accounting, the LLaVA
baseline of the input benchmark, and a 1-step run of the GPU step benchmark at its CPU-sized shape.
No timing is asserted anywhere: the figures themselves live in benchmarks/RESULTS.md."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- RESULTS.md sections -----------------------------------------------------------------------------------


def test_sections_replace_only_their_own_span():
    results = load("_results")
    text = "# Benchmarks\n\nintro\n"
    text = results.update_section(text, "a_bench", "## A\nfirst\n")
    text = results.update_section(text, "b_bench", "## B\n", device="cpu")
    text = results.update_section(text, "b_bench", "## B cuda\n", device="cuda")
    assert text.startswith("# Benchmarks\n\nintro\n")
    again = results.update_section(text, "a_bench", "## A\nsecond\n")
    assert "second" in again and "first" not in again
    assert again.replace("second", "first") == text  # nothing else moved
    cpu_again = results.update_section(text, "b_bench", "## B new\n", device="cpu")
    assert "## B new" in cpu_again and "## B cuda" in cpu_again and cpu_again.count("<!-- b_bench -->") == 1
    assert cpu_again.index("<!-- b_bench:cpu -->") < cpu_again.index("<!-- /b_bench:cpu -->")


def test_section_without_device_blocks_is_replaced_by_a_device_block():
    """step_bench's section predates per-device blocks: a new run must replace that content, not keep it."""
    results = load("_results")
    old = "x\n\n<!-- step_bench -->\n## old table\n<!-- /step_bench -->\n\ny\n"
    new = results.update_section(old, "step_bench", "## new table\n", device="cpu")
    assert "old table" not in new and "## new table" in new
    assert new.startswith("x\n\n<!-- step_bench -->\n<!-- step_bench:cpu -->") and new.endswith("\n\ny\n")


def test_write_section_creates_the_file(tmp_path):
    results = load("_results")
    path = tmp_path / "sub" / "R.md"
    results.write_section(path, "x_bench", "body\n")
    assert path.read_text() == "# Benchmarks\n\n<!-- x_bench -->\nbody\n<!-- /x_bench -->\n"


# ---- FLOP accounting of gpu_step_bench -----------------------------------------------------------------------


def test_step_flops_against_a_hand_computation():
    g = load("gpu_step_bench")
    shape = g.Shape(
        batch=2,
        seq=10,
        llm_hidden=8,
        llm_layers=3,
        llm_heads=2,
        llm_kv_heads=1,
        llm_intermediate=12,
        vocab=50,
        head_positions=4,
        lora_r=2,
        lora_targets=("q_proj", "down_proj"),
        vis_hidden=4,
        vis_layers=2,
        vis_intermediate=6,
        image_size=28,
        patch_size=14,
        projector_flops_per_image=1000.0,
        grad_ckpt=True,
    )
    f = g.step_flops(shape)
    # By hand. T = 2 * 10 = 20 tokens. Head dim 4, one KV head -> k/v project 8 -> 4.
    # One layer's linears: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate 8*12 + up 8*12 + down 12*8 = 480.
    # N_llm = 3 * 480 + lm_head 8*50 = 1840.  N_lora = 3 * (2*(8+8) + 2*(12+8)) = 3 * 72 = 216.
    assert (f["n_llm"], f["n_lora"], f["tokens"]) == (1840, 216, 20)
    # The LM head runs only at the 4 positions per sequence that predict a label: 2 * 4 = 8 of the 20 tokens.
    assert f["llm_frozen"] == 4 * (3 * 480) * 20 + 4 * (8 * 50) * 8  # 115200 + 12800
    assert f["llm_lora"] == 6 * 216 * 20  # 25920
    # causal attention forward per layer and sequence 2 * 10^2 * 8 = 1600; 3 layers x 2 sequences; x3 with bwd
    assert f["llm_attention"] == 3 * 3 * 2 * 1600  # 28800
    # vision: P = (28/14)^2 + 1 = 5 tokens; layer params 4*16 + 2*4*6 = 112
    # per image: 2 layers * (2*112*5 + 4*25*4) + patch conv 2*3*196*4*4 = 2*(1120+400) + 18816 = 21856
    assert f["vision"] == 2 * 21856
    assert f["projector"] == 2000
    model = 128000 + 25920 + 28800 + 43712 + 2000
    assert f["model"] == model
    # recompute: decoder linears + LoRA forward again, 2*(3*480 + 216)*20 = 66240, + attention forward 9600
    assert f["recompute"] == 66240 + 9600
    assert f["hardware"] == model + 75840
    no_ckpt = g.step_flops(g.Shape(**{**shape.__dict__, "grad_ckpt": False}))
    assert no_ckpt["recompute"] == 0 and no_ckpt["hardware"] == no_ckpt["model"] == model


def test_peak_by_device_name():
    g = load("gpu_step_bench")
    assert g.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert g.peak_tflops("NVIDIA H200") == 989.0
    assert g.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert g.peak_tflops("NVIDIA A10G") is None


@pytest.mark.slow
def test_gpu_step_bench_tiny_runs_one_step_on_cpu():
    out = subprocess.run(
        [sys.executable, str(BENCH / "gpu_step_bench.py"), "--tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"]["batch"] == 2 and result["shape"]["seq"] == 640 and result["visual_tokens"] == 582
    assert np.isfinite(result["loss"]) and result["step_s"] > 0 and len(result["steps_s"]) == 1
    check = result["param_check"]  # the formula's N are the built model's
    assert check["n_llm_formula"] == check["n_llm_model"] and check["n_lora_formula"] == check["n_lora_model"]
    # FlopCounterMode over the executed step agrees with the formula (attention aside; see counted_flops)
    assert result["flop_counter"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert result["mfu"] is None  # no peak for a CPU


# ---- input_bench: the LLaVA baseline is what it claims to be ----------------------------------------------------


def test_llava_image_path_matches_ours_within_the_image_tests_tolerance():
    ib = load("input_bench")
    from lightning_sp.data.images import ImageProcessor

    data = ib.photo(np.random.default_rng(0), 75, 100)
    assert Image.open(io.BytesIO(data)).size == (100, 75)
    theirs = ib.llava_image(data, ib.clip_processor())
    ours = ImageProcessor(336)(data)
    assert theirs.shape == ours.shape == (3, 336, 336)
    d = (ours - theirs).abs()
    assert d.max() < 0.05 and d.mean() < 0.005


def test_llava_style_labels_supervise_the_answers(tokenizer):
    ib = load("input_bench")
    pipe = ib.LlavaPipeline([], Path("."), tokenizer)
    conversations = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "Top left."},
    ]
    ids, labels = pipe.tokenize(conversations)
    assert ids.tolist().count(tokenizer.convert_tokens_to_ids("<image>")) == 1
    assert pipe.mismatches == 0
    supervised = tokenizer.decode([t for t in labels.tolist() if t != -100])
    assert "red circle" in supervised and "Top left" in supervised and "What is it" not in supervised
    assert supervised.count("</s>") == 2


@pytest.mark.slow
def test_input_bench_data_set_and_both_pipelines(tmp_path, tokenizer):
    ib = load("input_bench")
    records, image_root, shard_dir = ib.make_dataset(tmp_path, 8)
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["totals"]["samples"] == 8
    ours = ib.OursPipeline(shard_dir, tokenizer, 4)
    assert ours.run(4) == 8
    assert ib.batches_identical(ours, shard_dir, tokenizer) == (2, 2)  # bit-identical to the previous code's batches
    llava = ib.LlavaPipeline(records, image_root, tokenizer)
    assert llava.run(4) == 8
    batch = llava.collate([llava.sample(0), llava.sample(1)])
    assert batch["images"].shape == (2, 3, 336, 336) and batch["input_ids"].dtype == torch.long


# ---- scaling_bench: the table -----------------------------------------------------------------------------------


def test_scaling_report_growth_factors():
    sb = load("scaling_bench")
    args = type("A", (), {"device": "cpu", "threads": 1, "iters": 2, "batches": [1, 4], "texts": [64, 256]})()
    points = [
        {
            "batch": b,
            "text": t,
            "visual": 582,
            "seq": 583 + t,
            "step_s": 0.1 * b * (583 + t) / 647,
            "tokens_per_s": 1.0,
            "peak_gib": 1.0 + 0.1 * b * (583 + t) / 647,
            "built_gib": 1.0,
        }
        for b in (1, 4)
        for t in (64, 256)
    ]
    text = sb.report(points, args, 1.0, "0.0/0.0/0.0")
    rows = [line for line in text.splitlines() if line[:4] in ("| 1 ", "| 4 ")]
    assert len(rows) == 4 and rows[0].startswith("| 1 | 64 | 647 | 0.100 |")
    assert "batch 1 -> 4 (x4) at text 64: step time x4.0, peak - build x4.0" in text


@pytest.mark.slow
def test_scaling_bench_measures_one_point():
    sb = load("scaling_bench")
    args = type("A", (), {"device": "cpu", "iters": 1, "threads": 1})()
    point = sb.run_point(1, 8, args)
    assert point["seq"] == 1 + 582 + 8 and point["peak_gib"] >= point["built_gib"] > 0 and point["step_s"] > 0


# ---- images.py speed paths measured by input_bench ---------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(480, 640), (375, 500), (640, 480), (333, 500), (40, 23), (336, 336), (10, 700)])
def test_channels_last_image_path_is_bit_identical_to_the_previous_one(h, w):
    """input_bench reports the speed-up of ImageProcessor over the CHW pad/resize/normalise it replaced; that
    claim needs the two to give the very same numbers."""
    ib, previous = load("input_bench"), load("previous_pipeline")
    from lightning_sp.data.images import ImageProcessor, decode_pixels

    proc = ImageProcessor(336)
    image = (
        decode_pixels(ib.photo(np.random.default_rng(h * w), h, w))
        if min(h, w) >= 16
        else torch.from_numpy(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
    )
    for x in (image, image.contiguous()):  # HWC memory (decoder output) and CHW memory
        out = proc(x)
        assert out.is_contiguous() and torch.equal(out, previous.previous_image_path(x, proc.fill))


def test_length_group_bench_padding_and_draw():
    bench = load("length_group_bench")
    batches = [[{"input_ids": range(3)}, {"input_ids": range(5)}], [{"input_ids": range(4)}, {"input_ids": range(4)}]]
    share, mean_len = bench.padding_share(batches)
    assert share == pytest.approx(2 / 18) and mean_len == pytest.approx(18 / 4)  # padded 10 + 8, real 16
    samples = bench.draw(4096)  # 32 groups of 8 batches of 16
    text_only = [s for s in samples if not s["has_image"]]
    assert abs(len(text_only) / 4096 - bench.TEXT_ONLY_SHARE) < 0.015
    assert all(bench.VISUAL + 30 <= len(s["input_ids"]) <= bench.MAX_LENGTH for s in samples if s["has_image"])
    plain, grouped = bench.batches_of(samples, 1), bench.batches_of(samples, 8)
    assert sorted(s["id"] for b in grouped for s in b) == [s["id"] for b in plain for s in b]  # same samples
    assert bench.padding_share(grouped)[0] < bench.padding_share(plain)[0]
