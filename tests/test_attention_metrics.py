"""Where the answer looks, as numbers: the cell geometry and ratios against hand computation, the batched
left-padded forward against the one-sample pictures' forward, and a validation run that logs the keys with the
values a per-sample recomputation gives."""

import math
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from evalkit import small_data

from lightning_sp import viz
from lightning_sp.callbacks import AttentionMetrics
from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.data import synthetic
from lightning_sp.data.conversation import encode_prompt, expand_image_token

# ---- geometry and ratios against hand computation --------------------------------------------------------------


def cell_by_centre(grid, image=336):
    """Each patch's cell from its centre in pixels, by division on floats: the direct definition."""
    gh, gw = grid
    rows = [int((r + 0.5) * image / gh // (image / 3)) for r in range(gh)]
    cols = [int((c + 0.5) * image / gw // (image / 3)) for c in range(gw)]
    return rows, cols


@pytest.mark.parametrize("grid", [(24, 24), (12, 12), (16, 16), (16, 24)])
def test_cell_patches_assign_each_patch_by_its_centre_and_partition_the_grid(grid):
    rows, cols = cell_by_centre(grid)
    total = torch.zeros(grid, dtype=torch.long)
    for r in range(3):
        for c in range(3):
            mask = viz.cell_patches(grid, (r, c))
            expected = torch.tensor([[rows[i] == r and cols[j] == c for j in range(grid[1])] for i in range(grid[0])])
            assert torch.equal(mask, expected)
            total += mask.long()
    assert torch.equal(total, torch.ones(grid, dtype=torch.long))  # every patch in exactly one cell
    if grid == (24, 24):
        assert torch.equal(viz.cell_patches(grid, (2, 0)).nonzero().amin(0), torch.tensor([16, 0]))
        assert int(viz.cell_patches(grid, (2, 0)).sum()) == 64  # rows 16-23, cols 0-7
    if grid == (16, 16):
        assert [rows.count(k) for k in range(3)] == [5, 6, 5]


@pytest.mark.parametrize("grid", [(24, 24), (12, 12), (16, 16)])
def test_attention_on_cell_is_nine_on_the_cell_one_when_uniform_zero_elsewhere(grid):
    gh, gw = grid
    for cell in ((0, 0), (1, 1), (2, 1)):
        mask = viz.cell_patches(grid, cell).flatten().float()
        on_cell = mask / mask.sum()
        expected = gh * gw / mask.sum()  # share 1 over a uniform share of (cell patches / all patches)
        torch.testing.assert_close(viz.attention_on_cell(on_cell, grid, cell), expected)
        if gh % 3 == 0:
            torch.testing.assert_close(viz.attention_on_cell(on_cell, grid, cell), torch.tensor(9.0))
        torch.testing.assert_close(viz.attention_on_cell(torch.full((gh * gw,), 0.3), grid, cell), torch.tensor(1.0))
        other = (2 - cell[0], 2 - cell[1]) if cell != (1, 1) else (0, 0)
        off = viz.cell_patches(grid, other).flatten().float()
        torch.testing.assert_close(viz.attention_on_cell(off, grid, cell), torch.tensor(0.0))


def test_attention_on_cell_matches_a_loop_over_patches_for_random_attention_per_layer():
    torch.manual_seed(0)
    grid, cell = (16, 16), (1, 2)
    att = torch.rand(3, 256) * 0.01  # unnormalised, like the patch part of a softmax row
    rows, cols = cell_by_centre(grid)
    got = viz.attention_on_cell(att, grid, cell)
    for layer in range(3):
        on, n = 0.0, 0
        for i in range(16):
            for j in range(16):
                if (rows[i], cols[j]) == cell:
                    on, n = on + float(att[layer, i * 16 + j]), n + 1
        assert n == 6 * 5  # the middle row band has 6 patch rows, the right column band 5 patch columns
        assert math.isclose(float(got[layer]), (on / float(att[layer].sum())) / (n / 256), rel_tol=1e-5)
    with pytest.raises(ValueError, match="576"):
        viz.attention_on_cell(torch.rand(100), (24, 24), cell)


def test_named_cell_reads_the_whole_cell_phrase_of_synthetic_questions():
    for r, row in enumerate(synthetic.POSITIONS):
        for c, name in enumerate(row):
            assert viz.named_cell(f"What color is the shape in the {name} cell?") == (r, c)
            assert viz.named_cell(f"What shape is in the {name} cell?") == (r, c)
    assert viz.named_cell("What shape is in the top cell?") == (0, 1)  # not "top left", not "top right"
    assert viz.named_cell("What shape is in the bottom right cell?") == (2, 2)
    rng = random.Random(0)
    scene = synthetic.sample_scene(rng)
    for qtype in ("locate", "count", "relation"):  # these name objects, rows or columns, never a cell
        for _ in range(20):
            question, _ = synthetic.ask(scene, qtype, rng)
            assert viz.named_cell(question) is None, question
    for qtype in ("position_colour", "shape_at"):
        for _ in range(20):
            assert viz.named_cell(synthetic.ask(scene, qtype, rng)[0]) is not None


def test_spread_and_sp_share_against_hand_values():
    att = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(viz.max_over_uniform(att), torch.tensor([1.0, 4.0, 2.0]))
    torch.testing.assert_close(viz.normalised_entropy(att), torch.tensor([1.0, 0.0, 0.5]))  # log 2 / log 4
    # 2 SP tokens then 6 patches: SP share 0.4 of the visual attention vs 2/8 uniform -> 1.6
    visual = torch.tensor([0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])
    torch.testing.assert_close(viz.sp_share_over_uniform(visual, 2), torch.tensor(1.6))
    torch.testing.assert_close(viz.sp_share_over_uniform(torch.ones(2, 8), 2), torch.ones(2))


# ---- the batched forward equals the one-sample forward of the pictures ---------------------------------------


def prompt_ids(question, model, tokenizer):
    record = {"id": "q", "image": "x", "conversations": [{"from": "human", "value": f"<image>\n{question}"}]}
    ids = encode_prompt(record, tokenizer, "vicuna_v1")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return expand_image_token(ids, [IGNORE_INDEX] * len(ids), image_id, model.num_visual_tokens)[0]


def sharpen(model, factor: float = 200.0):
    """Scale the LLM's query projections: a random tiny LLM attends almost uniformly (every ratio ~1.000), which
    would let a wrong cell or a wrong row pass a comparison; sharp attention makes them differ."""
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "q_proj" in name and "lora_" not in name:
                p.mul_(factor)
    return model


@pytest.fixture(scope="module")
def pooling_model(tokenizer):
    from conftest import TINY

    from lightning_sp.config import compose
    from lightning_sp.models.vlm import LlavaSP

    torch.manual_seed(0)
    return sharpen(LlavaSP.from_config(compose([*TINY, "variant=pooling"]), tokenizer).eval())


def test_left_padded_prompts_get_the_attention_they_get_alone(pooling_model, tokenizer, one_thread):
    model = pooling_model
    questions = ["What shape is in the top cell?", "What color is the shape in the bottom right cell? Look closely."]
    prompts = [prompt_ids(q, model, tokenizer) for q in questions]
    assert prompts[0].numel() < prompts[1].numel()
    width = prompts[1].numel() + 2  # a batch subset keeps padding columns that are padding in every row
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel() :], mask[i, width - p.numel() :] = p, 1
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 336, 336)
    visual = viz.prompt_attention(model, ids, mask, pixels)
    layers = model.llm.config.num_hidden_layers
    assert visual.shape == (2, layers, model.num_visual_tokens)
    for i, p in enumerate(prompts):
        # rows of prompt + answer: row 0 predicts the first answer token and does not see the answer (causal)
        alone, _ = viz.answer_attention_by_layer(model, p, pixels[i], [tokenizer.eos_token_id, 5])
        torch.testing.assert_close(visual[i], alone[:, 0], rtol=1e-4, atol=1e-7)
    # the images' visual tokens computed once stand in for the images (what the callback reuses)
    with torch.no_grad():
        tokens = model.visual_tokens(pixels)
    torch.testing.assert_close(viz.prompt_attention(model, ids, mask, visual_tokens=tokens), visual)
    with pytest.raises(ValueError, match="left-padded"):
        viz.prompt_attention(model, ids.flip(1), mask.flip(1), pixels)


def test_the_pictures_state_the_asked_cell_number(pooling_model, tokenizer, one_thread):
    model = pooling_model
    torch.manual_seed(3)
    maps = viz.compute_sample_maps(
        model,
        tokenizer,
        torch.randn(3, 336, 336),
        prompt_ids("What color is the shape in the bottom left cell?", model, tokenizer),
        target="red",
        answer_ids=[tokenizer.eos_token_id],
    )
    assert maps.asked_cell == (2, 0)
    # by hand: the first answer row's patches, rows 16-23 x cols 0-7 of the 24 x 24 grid, over 1/9
    patches = maps.llm_first_row[:, 6:].reshape(-1, 24, 24)
    by_hand = patches[:, 16:, :8].sum(axis=(1, 2)) / patches.sum(axis=(1, 2)) * 9
    np.testing.assert_allclose(maps.attention_on_target_by_layer, by_hand, rtol=1e-5)
    value, layer = maps.attention_on_target
    assert layer == int(by_hand.argmax()) and math.isclose(value, float(by_hand.max()), rel_tol=1e-5)
    assert f"answer attention on the asked cell (bottom left): {value:.1f}x uniform (layer {layer}" in viz.qa_markdown(
        maps
    )
    assert viz.target_caption(maps) in viz.llm_figure(maps)._suptitle.get_text()
    peak, entropy = maps.sp_attention_spread
    k = maps.sp_attention[0].size
    assert math.isclose(peak, float(np.mean(maps.sp_attention.reshape(6, -1).max(1) * k)), rel_tol=1e-5)
    assert f"peak {peak:.2f}x uniform" in viz.sp_attention_figure(maps)._suptitle.get_text()
    other = viz.compute_sample_maps(
        model,
        tokenizer,
        torch.randn(3, 336, 336),
        prompt_ids("Where is the red circle?", model, tokenizer),
        answer_ids=[5],
    )
    assert other.asked_cell is None and other.attention_on_target is None
    assert "asked cell" not in viz.qa_markdown(other)


# ---- a validation run logs the numbers a per-sample recomputation gives ---------------------------------------


@pytest.mark.slow
def test_validation_logs_attention_metrics_equal_to_per_sample_maps(tmp_path, tokenizer, one_thread):
    from conftest import TINY

    from lightning_sp.config import compose
    from lightning_sp.data.prepare import ensure_synthetic
    from lightning_sp.module import LlavaSPModule
    from lightning_sp.train import build_datamodule

    cfg = compose([*TINY, "variant=pooling", *small_data(tmp_path / "data"), "eval.max_new_tokens=2"])
    ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)
    torch.manual_seed(0)
    module = LlavaSPModule(cfg, tokenizer)
    sharpen(module.model)
    datamodule = build_datamodule(cfg, tokenizer, module.model.num_visual_tokens)
    vision_calls = []
    module.model.vision.register_forward_hook(lambda *_: vision_calls.append(1))

    def validate(*callbacks):
        vision_calls.clear()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=list(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        return trainer.validate(module, datamodule=datamodule)[0]

    validate()
    plain_calls = len(vision_calls)
    callback = AttentionMetrics()  # one forward a batch; the second holds 2 cell questions: padding inside it
    logged = validate(callback)
    assert len(vision_calls) == plain_calls  # the callback reused the validation step's visual tokens

    datamodule.setup("validate")
    every = []
    for batch in datamodule.val_dataloader():
        for i in range(len(batch["ids"])):
            prompt = batch["prompt_ids"][i][batch["prompt_attention_mask"][i].bool()]
            every.append(
                viz.compute_sample_maps(
                    module.model, tokenizer, batch["pixel_values"][i], prompt, answer_ids=[tokenizer.eos_token_id]
                )
            )
    per_sample = [m for m in every if m.asked_cell is not None]
    assert len(every) == 8 and len(per_sample) == 3  # val types rotate: 3 of 8 questions name a cell
    assert int(callback.sums["target_n"]) == 3
    by_layer = np.mean([m.attention_on_target_by_layer for m in per_sample], axis=0)
    layers = module.model.llm.config.num_hidden_layers
    assert set(logged) >= {f"val/attention_on_target_layer{i}" for i in range(layers)} | {
        "val/attention_on_target",
        "val/attention_on_sp_tokens",
        "val/dfi_attention_max_over_uniform",
        "val/dfi_attention_entropy",
    }, logged
    for i in range(layers):
        assert math.isclose(logged[f"val/attention_on_target_layer{i}"], by_layer[i], rel_tol=1e-4)
    assert math.isclose(logged["val/attention_on_target"], by_layer.max(), rel_tol=1e-4)
    sp_share = [float((m.llm_first_row[:, :6].sum(1) / m.llm_first_row.sum(1)).mean()) * 582 / 6 for m in per_sample]
    assert math.isclose(logged["val/attention_on_sp_tokens"], np.mean(sp_share), rel_tol=1e-4)
    kv = np.concatenate([m.sp_attention.reshape(6, -1) for m in every])  # (images x SP tokens, K): every image
    entropy = -(kv * np.log(kv)).sum(1) / np.log(kv.shape[1])
    assert math.isclose(logged["val/dfi_attention_max_over_uniform"], (kv.max(1) * kv.shape[1]).mean(), rel_tol=1e-4)
    assert math.isclose(logged["val/dfi_attention_entropy"], entropy.mean(), rel_tol=1e-4)


def fake_validation(model, tokenizer, monkeypatch, questions, world_size=1, sharded=False):
    """A left-padded eval batch of `questions`, a stand-in trainer and module, and the forwards counted (their
    batch sizes): enough to drive `on_validation_batch_end` without a Trainer."""
    from conftest import TINY

    from lightning_sp.config import compose

    prompts = [prompt_ids(q, model, tokenizer) for q in questions]
    width = max(p.numel() for p in prompts)
    batch = {
        "prompt_ids": torch.stack(
            [torch.cat([torch.full((width - p.numel(),), tokenizer.pad_token_id), p]) for p in prompts]
        ),
        "prompt_attention_mask": torch.stack(
            [torch.cat([torch.zeros(width - p.numel(), dtype=torch.long), torch.ones_like(p)]) for p in prompts]
        ),
        "pixel_values": torch.randn(len(prompts), 3, 336, 336),
    }
    forwards = []
    real_forward = viz.last_position_attention
    monkeypatch.setattr(
        viz.measures, "last_position_attention", lambda *a, **k: forwards.append(a[1].shape[0]) or real_forward(*a, **k)
    )
    module = SimpleNamespace(
        model=model,
        tokenizer=tokenizer,
        cfg=compose([*TINY]),
        device=torch.device("cpu"),
        ranks_in_lockstep=sharded and world_size > 1,
    )
    trainer = SimpleNamespace(world_size=world_size, precision_plugin=L.pytorch.plugins.precision.Precision())
    return batch, forwards, module, trainer


def test_a_sharded_rank_without_cell_questions_still_runs_the_forward(pooling_model, tokenizer, monkeypatch):
    """Under FSDP each forward all-gathers: a rank whose batch names no cell runs it anyway when another rank does."""
    batch, forwards, module, trainer = fake_validation(
        pooling_model,
        tokenizer,
        monkeypatch,
        ["Where is the red circle?", "What shape is in the top cell?"],
        world_size=2,
        sharded=True,
    )
    others = []  # what the other rank says: whether it runs a forward in this batch
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: t.fill_(max(int(t), others[-1])))
    callback = AttentionMetrics()
    for rows, other, expected_forwards, expected_questions in (
        ([0, 1], 0, [1], 1),  # this rank's cell question: one forward on it
        ([0], 1, [1], 1),  # none here, one on the other rank: a discarded forward, nothing counted
        ([0], 0, [], 1),
    ):  # none anywhere: no forward
        others.append(other)
        forwards.clear()
        callback.on_validation_batch_end(trainer, module, None, {k: v[rows] for k, v in batch.items()}, 0)
        assert forwards == expected_forwards and callback.sums["target_n"] == expected_questions


def test_max_questions_measures_the_first_ones_of_the_split(pooling_model, tokenizer, monkeypatch):
    batch, forwards, module, trainer = fake_validation(
        pooling_model,
        tokenizer,
        monkeypatch,
        ["What shape is in the top cell?", "Where is the red circle?", "What color is the shape in the left cell?"],
    )
    callback = AttentionMetrics(max_questions=3)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    callback.on_validation_batch_end(trainer, module, None, batch, 1)
    callback.on_validation_batch_end(trainer, module, None, batch, 2)
    assert forwards == [2, 1] and callback.sums["target_n"] == 3  # 2 of the first batch, 1 of the second, none after
    with pytest.raises(ValueError, match="max_questions"):
        AttentionMetrics(max_questions=0)


def test_sums_and_metrics_for_a_projector_without_sp_tokens_by_hand():
    from collections import Counter

    from lightning_sp.callbacks.attention_metrics import metrics_from_sums, spread_sums, target_sums

    layout = SimpleNamespace(num_sp_tokens=0, patch_grid=(3, 3))  # mlp-like: patches only, one patch a cell
    visual = torch.zeros(2, 2, 9)  # 2 questions x 2 layers
    visual[0, 0, 0], visual[0, 0, 1] = 0.5, 0.5  # layer 0 of question 0: half on cell (0, 0) -> 4.5x
    visual[0, 1] = 0.1  # layer 1: uniform -> 1x
    visual[1, :, 4] = 1.0  # question 1 asks (0, 0) but looks at the centre -> 0x
    sums = target_sums(visual, [(0, 0), (0, 0)], layout)
    assert sums == pytest.approx(Counter({"target_layer0": 4.5, "target_layer1": 1.0, "target_n": 2}))
    assert metrics_from_sums(sums) == pytest.approx(
        {  # no SP tokens: no SP key
            "val/attention_on_target_layer0": 2.25,
            "val/attention_on_target_layer1": 0.5,
            "val/attention_on_target": 2.25,
        }
    )
    projector = SimpleNamespace(attention_kind=None, layout=SimpleNamespace(num_patch_tokens=9))
    assert spread_sums(projector, None) == Counter()
    assert spread_sums(projector, torch.full((1, 2, 9), 1 / 9)) == Counter()  # declares nothing to show
    projector = SimpleNamespace(attention_kind="extractor", layout=SimpleNamespace(num_patch_tokens=9))
    extractor = spread_sums(projector, torch.full((1, 2, 9), 1 / 9))  # attention over the patch grid: uniform
    assert metrics_from_sums(extractor) == pytest.approx(
        {"val/extractor_attention_max_over_uniform": 1.0, "val/extractor_attention_entropy": 1.0}
    )
    assert metrics_from_sums(Counter()) == {}
