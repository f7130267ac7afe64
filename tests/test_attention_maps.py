"""Attention maps: the numbers behind the pictures (unit), the TensorBoard images of a real fit, the notebook."""

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evalkit import small_data
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sp import viz
from lightning_sp.callbacks import AttentionMapLogger
from lightning_sp.callbacks.attention import image_samples
from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.data.conversation import encode_prompt, expand_image_token
from lightning_sp.models.vlm import LlavaSP
from lightning_sp.train import build_trainer

QUESTION = {
    "id": "q",
    "image": "x.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape in the top left cell?"},
        {"from": "gpt", "value": "red"},
    ],
}


def prompt_for(model, tokenizer):
    ids = encode_prompt(QUESTION, tokenizer, "vicuna_v1")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return expand_image_token(ids, [IGNORE_INDEX] * len(ids), image_id, model.num_visual_tokens)[0]


@pytest.fixture(scope="module")
def models(tokenizer):
    """Tiny random models per variant, built once (LoRA on: the LLM is a peft wrapper, as in finetune runs)."""
    from conftest import TINY

    from lightning_sp.config import compose

    cache = {}

    def get(variant, *extra):
        key = (variant, *extra)
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = LlavaSP.from_config(compose([*TINY, f"variant={variant}", *extra]), tokenizer).eval()
        return cache[key]

    return get


def sample_maps(model, tokenizer, **kw):
    torch.manual_seed(1)
    return viz.compute_sample_maps(
        model, tokenizer, torch.randn(3, 336, 336), prompt_for(model, tokenizer), target="red", max_new_tokens=3, **kw
    )


# ---- geometry -----------------------------------------------------------------------------------------------


def test_boxes_are_sp_boxes_scaled_from_the_patch_grid_to_pixels(models):
    cropping = models("cropping").projector
    windows = viz.sp_windows(cropping, (336, 336))
    assert [w.label for w in windows] == [
        "crop 4x4",
        "crop 8x8",
        "crop 12x12",
        "crop 16x16",
        "crop 20x20",
        "crop 24x24",
    ]
    for window, (r0, c0, r1, c1) in zip(windows, cropping.sp_boxes()):
        assert window.boxes == [(c0 * 14, r0 * 14, c1 * 14, r1 * 14)]  # 336 px / 24 patches = 14 px a patch
    assert windows[0].boxes == [(140, 140, 196, 196)]  # the centre 4x4 patches
    # A non-square grid on a non-square image scales each axis by its own factor.
    assert viz.scale_box((1, 2, 3, 4), (4, 8), (40, 160)) == (40, 10, 80, 30)


def test_pooling_tokens_draw_the_cells_of_their_pooling_grid(models):
    windows = viz.sp_windows(models("pooling").projector, (336, 336))
    assert [len(w.boxes) for w in windows] == [16, 64, 144, 256, 400, 1]  # sides 4..20 pooled; 24 = global conv
    assert windows[-1].label == "global 24x24" and windows[-1].boxes == [(0, 0, 336, 336)]
    # The cells are exactly adaptive_avg_pool2d's bins, also where they overlap (24 is not a multiple of 5, 7).
    x = torch.randn(1, 1, 24, 24)
    for side in (4, 5, 7, 20):
        pooled = F.adaptive_avg_pool2d(x, side).flatten()
        means = torch.stack([x[0, 0, r0:r1, c0:c1].mean() for r0, c0, r1, c1 in viz.pooling_cells(side, 24)])
        torch.testing.assert_close(means, pooled)


def test_dfi_footprint_puts_each_kv_weight_on_its_receptive_field_and_keeps_the_mass():
    kernel, stride, n = 16, 2, 5  # the released DFI on a 24x24 grid
    one_hot = torch.zeros(1, n, n)
    one_hot[0, 1, 3] = 1.0
    footprint = viz.dfi_footprint(one_hot, (24, 24), kernel, stride)[0]
    expected = torch.zeros(24, 24)
    expected[2:18, 6:22] = 1 / kernel**2  # K/V token (1, 3) convolves rows 2..17, cols 6..21
    torch.testing.assert_close(footprint, expected)
    att = torch.softmax(torch.randn(6, n, n).flatten(1), -1).view(6, n, n)
    image = viz.upsample_to_image(viz.dfi_footprint(att, (24, 24), kernel, stride), (336, 336))
    assert image.shape == (6, 336, 336)
    torch.testing.assert_close(image.sum(dim=(1, 2)), torch.ones(6))


def test_dfi_overlay_map_matches_the_image_and_sums_to_one(models, tokenizer):
    model = models("pooling")
    maps = sample_maps(model, tokenizer)
    s, side = model.projector.layout.num_sp_tokens, model.projector.dfi.kv_side
    assert maps.sp_attention_kind == "dfi"
    assert maps.image.shape == (336, 336, 3) and maps.image.dtype == np.uint8
    assert maps.sp_attention.shape == (s, side, side)
    np.testing.assert_allclose(maps.sp_attention.sum(axis=(1, 2)), 1, rtol=1e-5)  # softmax rows
    assert maps.sp_attention_map.shape == (s, *maps.image.shape[:2])
    np.testing.assert_allclose(maps.sp_attention_map.sum(axis=(1, 2)), 1, rtol=1e-4)
    assert maps.sp_attention_shown.shape == maps.sp_attention_map.shape
    # The overlay shows the map relative to uniform attention: uniform weights read 1 everywhere, although
    # their footprint piles up in the centre, where all the 16x16 receptive fields overlap.
    uniform = torch.full((2, side * side), 1 / side**2)
    kind, raw, mapped, shown = viz.sp_attention_images(model.projector, uniform, (336, 336))
    assert kind == "dfi" and raw.shape == (2, side, side)
    np.testing.assert_allclose(shown, 1, rtol=1e-5)
    assert mapped[0, 168, 168] > 10 * mapped[0, 0, 0]
    image = viz.render_sp_attention(maps)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_denormalize_inverts_the_clip_normalisation():
    from lightning_sp.data.images import ImageProcessor

    pixels = torch.randint(0, 256, (3, 336, 336), dtype=torch.uint8)
    restored = viz.denormalize(ImageProcessor(336)(pixels))
    assert restored.shape == (336, 336, 3)
    assert np.abs(restored.astype(int) - pixels.permute(1, 2, 0).numpy().astype(int)).max() <= 1


# ---- LLM attention: eager for one pass, restored after ---------------------------------------------------------


def test_llm_attention_rows_come_from_eager_attention_and_the_implementation_is_restored(
    models, tokenizer, monkeypatch
):
    from transformers.models.llama import modeling_llama

    model = models("pooling")
    assert hasattr(model.llm, "get_base_model")  # a peft wrapper: the switch must reach the HF model inside
    before = viz.attn_implementation(model.llm)
    assert before == "sdpa"
    calls = []
    eager = modeling_llama.eager_attention_forward

    def counting(module, *args, **kwargs):
        out = eager(module, *args, **kwargs)
        calls.append(out[1])
        return out

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", counting)
    prompt = prompt_for(model, tokenizer)
    answer = tokenizer("blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    visual, _ = viz.llm_answer_attention(model, prompt, torch.randn(3, 336, 336), answer)
    assert len(calls) == model.llm.config.num_hidden_layers  # one eager call per layer, one forward
    assert viz.attn_implementation(model.llm) == before

    # The returned numbers are those eager weights: rows predicting the answer, mean over layers and heads.
    rows = torch.arange(prompt.numel() - 1, prompt.numel() - 1 + len(answer))
    image_pos = (prompt == model.image_token_id).nonzero().squeeze(1)
    expected = torch.stack([w[0][:, rows] for w in calls]).mean(dim=(0, 1, 2))[image_pos]
    torch.testing.assert_close(visual, expected)
    assert visual.shape == (model.num_visual_tokens,) and 0 < float(visual.sum()) <= 1 + 1e-5

    # A failing pass restores the implementation too; a later generate runs on sdpa again (no eager call).
    with pytest.raises(RuntimeError, match="boom"):
        with viz.eager_attention(model.llm):
            assert viz.attn_implementation(model.llm) == "eager"
            raise RuntimeError("boom")
    assert viz.attn_implementation(model.llm) == before
    calls.clear()
    with torch.no_grad():
        model(prompt.unsqueeze(0), torch.ones(1, prompt.numel(), dtype=torch.long), torch.randn(1, 3, 336, 336))
    assert calls == []


def test_projectors_without_dfi_skip_the_panel_and_mlp_has_no_sp_bars(models, tokenizer):
    maps = {v: sample_maps(models(v), tokenizer) for v in ("pooling_nodfi", "mlp")}
    for variant, m in maps.items():
        assert m.sp_attention_kind is None and viz.sp_attention_figure(m) is None
        assert m.llm_patches.shape == tuple(models(variant).projector.layout.patch_grid)
    image = viz.render_llm(maps["mlp"])
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert maps["mlp"].num_sp_tokens == 0 and len(viz.llm_figure(maps["mlp"]).axes) == 1  # the image panel only
    assert maps["pooling_nodfi"].llm_sp.shape == (6,) and len(viz.llm_figure(maps["pooling_nodfi"]).axes) == 2
    # Attending SP arms without DFI show their extractor's attention over the patch grid instead.
    queries = sample_maps(models("learned_queries", "projector.dfi=false"), tokenizer)
    assert queries.sp_attention_kind == "extractor" and queries.sp_attention.shape == (6, 24, 24)


def test_qa_text_names_question_target_and_prediction(models, tokenizer):
    maps = sample_maps(models("mlp"), tokenizer)
    text = viz.qa_markdown(maps)
    assert maps.question == "What color is the shape in the top left cell?"
    assert "**question:** What color is the shape in the top left cell?" in text
    assert "**target:** red" in text and f"**predicted:** {maps.prediction}" in text


# ---- callback plumbing -----------------------------------------------------------------------------------------


def test_callback_keeps_image_samples_with_unpadded_prompts():
    batch = {
        "pixel_values": torch.randn(3, 3, 8, 8),
        "has_image": torch.tensor([False, True, True]),
        "prompt_ids": torch.tensor([[5, 6, 7], [0, 8, 9], [1, 2, 3]]),
        "prompt_attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1]]),
        "answers": ["a", "b", "c"],
        "qtypes": ["x", "y", "z"],
        "ids": ["i0", "i1", "i2"],
    }
    kept = image_samples(batch, limit=1)
    assert len(kept) == 1 and kept[0]["sample_id"] == "i1" and kept[0]["prompt_ids"].tolist() == [8, 9]
    assert [k["sample_id"] for k in image_samples(batch, limit=5)] == ["i1", "i2"]
    assert image_samples({"pixel_values": batch["pixel_values"]}, 2) == []  # not an eval batch


def test_trainer_gets_the_logger_unless_viz_is_disabled(tiny_cfg, tmp_path):
    cfg = tiny_cfg("viz.every_n_val=3", "viz.num_images=1")
    loggers = [c for c in build_trainer(cfg, tmp_path).callbacks if isinstance(c, AttentionMapLogger)]
    assert len(loggers) == 1 and (loggers[0].every_n_val, loggers[0].num_images) == (3, 1)
    off = build_trainer(tiny_cfg("viz.enabled=false"), tmp_path / "off").callbacks
    assert not any(isinstance(c, AttentionMapLogger) for c in off)
    from lightning_sp.config import ConfigError

    with pytest.raises(ConfigError, match="viz.every_n_val"):
        tiny_cfg("viz.every_n_val=0")


# ---- end to end: a two-step fit logs the images; the notebook draws them from its checkpoint ------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import TINY

    from lightning_sp.config import compose
    from lightning_sp.train import train

    root = tmp_path_factory.mktemp("attention_run")
    run_dir = root / "run"
    cfg = compose(
        [
            *TINY,
            "variant=pooling",
            *small_data(root / "data"),
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "eval.max_new_tokens=3",
            f"run_dir={run_dir}",
        ]
    )
    assert cfg.viz.enabled and cfg.viz.num_images == 2  # on by default
    train(cfg)
    return run_dir


@pytest.mark.slow
def test_fit_logs_attention_images_and_text_to_tensorboard(tiny_run):
    events = list((tiny_run / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    assert {"attention/dfi/0", "attention/dfi/1", "attention/llm/0", "attention/llm/1"} <= images, images
    for tag in ("attention/dfi/0", "attention/llm/1"):
        (event,) = acc.Images(tag)
        assert event.step == 2 and event.width > 200 and event.height > 100
    texts = set(acc.Tags()["tensors"])
    assert {"attention/qa/0/text_summary", "attention/qa/1/text_summary"} <= texts, texts
    qa = acc.Tensors("attention/qa/0/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**question:**" in qa and "**target:**" in qa and "**predicted:**" in qa
    assert 0 < acc.Scalars("attention/llm_sp_share")[0].value < acc.Scalars("attention/llm_visual_share")[0].value


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_a_checkpoint(tiny_run, tmp_path):
    from lightning_sp.notebook import ATTENTION_NOTEBOOK, execute

    out = tmp_path / "executed.ipynb"
    nb = execute(ATTENTION_NOTEBOOK, {"RUN_DIR": str(tiny_run), "NUM_SAMPLES": 2}, out, timeout=300)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the DFI figure and the LLM figure
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and "**question:**" in markdown[0]
    assert nbformat.read(out, as_version=4).cells  # the executed copy was written
    # The committed notebook carries no outputs and keeps its `RUN_DIR = None` parameter cell.
    source = nbformat.read(ATTENTION_NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in source.cells if c.cell_type == "code")
    params = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RUN_DIR = None" in params[0].source


def test_latest_run_picks_the_newest_checkpoint_and_a_missing_run_says_how_to_make_one(tmp_path):
    import os

    from lightning_sp.runs import latest_run, load_run

    assert latest_run(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="make train VARIANT=pooling"):
        load_run(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="make train VARIANT=pooling"):
        load_run(tmp_path)
    for i, name in enumerate(("pooling/20250101-000000", "mlp/20250102-000000", "named-run")):
        ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
        os.utime(ckpt, (1000 + i, 1000 + (i if name != "mlp/20250102-000000" else 10)))
    assert latest_run(tmp_path) == tmp_path / "mlp" / "20250102-000000"  # newest checkpoint, not newest name


def test_attention_kind_is_the_projectors_declaration_and_a_wrong_shape_is_an_error():
    from types import SimpleNamespace

    dfi = SimpleNamespace(attention_kind="dfi", registry_name="pooling", layout=SimpleNamespace(num_patch_tokens=144))
    assert viz.sp_attention_kind(dfi, torch.full((6, 25), 1 / 25)) == "dfi"
    with pytest.raises(ValueError, match="'pooling' declares dfi attention but last_attention has 10 keys"):
        viz.sp_attention_kind(dfi, torch.full((6, 10), 0.1))
    extractor = SimpleNamespace(
        attention_kind="extractor", registry_name="x", layout=SimpleNamespace(num_patch_tokens=9)
    )
    assert viz.sp_attention_kind(extractor, torch.full((6, 9), 1 / 9)) == "extractor"
    with pytest.raises(ValueError, match="declares extractor attention"):
        viz.sp_attention_kind(extractor, torch.full((6, 25), 1 / 25))


def test_export_pngs_writes_the_readme_pictures(tiny_run, tmp_path):
    """runs.export_pngs is how the README's attention pictures are made: the DFI and LLM figures of one validation
    sample, and its question / target / prediction."""
    from PIL import Image

    from lightning_sp.runs import export_pngs, load_run

    run = load_run(tiny_run)
    paths = export_pngs(run, tmp_path / "docs", index=1, prefix="attention_pooling")
    assert [p.name for p in paths] == [
        "attention_pooling_dfi.png",
        "attention_pooling_llm.png",
        "attention_pooling_qa.md",
    ]
    for png in paths[:2]:
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 100
    qa = paths[2].read_text()
    assert "**question:**" in qa and "**target:**" in qa
