"""The shipped pretrained encoder (data/encoder) and the script that makes it (lightning_sp/pretrain_encoder.py)."""

import json
import random

import pytest
import torch
from transformers import CLIPVisionModel

from lightning_sp import pretrain_encoder as pe
from lightning_sp.config import compose
from lightning_sp.data import synthetic
from lightning_sp.models.vision import build_vision
from lightning_sp.paths import resolve

SHIPPED = resolve("data/encoder")


# A random 3x3-grid encoder, narrow and shallow: pretraining it takes seconds.
SMALL_ENCODER = [
    "model.vision.name_or_path=null",
    "variant=mlp",
    "model.vision.image_size=84",
    "model.vision.patch_size=28",
    "model.vision.hidden_size=16",
    "model.vision.intermediate_size=32",
    "model.vision.num_layers=2",
]


def test_moved_scene_keeps_the_objects_and_changes_the_layout():
    rng = random.Random(3)
    for _ in range(50):
        scene = synthetic.sample_scene(rng)
        other = pe.moved(scene, rng)
        assert other.layout() != scene.layout()
        strip = lambda s: sorted((it.colour, it.shape, it.dx, it.dy, it.half) for it in s.items)  # noqa: E731
        assert strip(other) == strip(scene) and other.background == scene.background
        assert len({(it.row, it.col) for it in other.items}) == len(other.items)  # one object per cell


def test_batches_are_deterministic_pairs_with_their_facts():
    batches = pe.SceneBatches(4, image_size=84, seed=7)
    pixels, facts = batches.batch(5)
    again_pixels, again_facts = pe.SceneBatches(4, image_size=84, seed=7).batch(5)
    assert torch.equal(pixels, again_pixels) and torch.equal(facts, again_facts)
    assert pixels.shape == (4, 3, 84, 84)
    # Rebuild the scenes the batch drew and check its multi-hot rows name exactly their objects' facts.
    rng = random.Random("encoder:7:5")
    scenes = []
    for _ in range(2):
        scene = synthetic.sample_scene(rng)
        scenes += [scene, pe.moved(scene, rng)]
    for row, scene in zip(facts, scenes):
        named = {pe.FACTS[i] for i in row.nonzero().flatten().tolist()}
        assert named == {(it.colour, it.shape, it.row * 3 + it.col) for it in scene.items}
    # The pair shares its objects but no fact set: only positions tell the two captions apart.
    assert not torch.equal(facts[0], facts[1])
    with pytest.raises(ValueError, match="even"):
        pe.SceneBatches(3, image_size=84, seed=0)


def test_a_short_pretraining_writes_a_loadable_encoder_with_its_checksum(tmp_path):
    out = tmp_path / "encoder"
    overrides = SMALL_ENCODER
    recipe = pe.pretrain(out, overrides, steps=3, batch_size=4, lr=1e-3, seed=0, progress=False)
    assert recipe["sha256"][pe.WEIGHTS_FILE] == pe.sha256(out / pe.WEIGHTS_FILE)
    assert json.loads((out / "recipe.json").read_text())["steps"] == 3
    # The run's own config loads it through the normal path, and the tower returns the saved model's features.
    cfg = compose([*overrides[1:], f"model.vision.name_or_path={out}"])
    tower = build_vision(cfg.model.vision)
    saved = CLIPVisionModel.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 84, 84)
    expected = saved(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tower(pixels), expected)
    # Trained: the weights moved away from the random init the config describes.
    random_init = build_vision(compose(overrides).model.vision)
    assert not torch.allclose(tower(pixels), random_init(pixels))


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped encoder")
def test_shipped_encoder_matches_its_recipe_and_the_default_config():
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert pe.sha256(SHIPPED / pe.WEIGHTS_FILE) == recipe["sha256"][pe.WEIGHTS_FILE], (
        "data/encoder/model.safetensors differs from the checksum its recipe records: rebuild it with `make encoder`"
    )
    cfg = compose([])
    assert resolve(cfg.model.vision.name_or_path) == SHIPPED
    saved = json.loads((SHIPPED / "config.json").read_text())
    assert (saved["image_size"], saved["patch_size"]) == (cfg.model.vision.image_size, cfg.model.vision.patch_size)


def test_the_position_task_names_each_patch_place_from_the_projector_layer():
    """--position-weight: a linear head on the patch features of model.vision.select_layer (what the projector
    reads) is trained to name each patch's grid index, self-supervised (no VQA answer involved)."""
    overrides = SMALL_ENCODER
    cfg = compose(overrides)
    torch.manual_seed(0)
    vision = build_vision(cfg.model.vision).model
    model = pe.SceneCLIP(vision, position_layer=cfg.model.vision.select_layer)
    pixels, facts = pe.SceneBatches(2, image_size=84, seed=0).batch(0)
    model.logits(pixels, facts)
    feats = vision(pixels, output_hidden_states=True).hidden_states[cfg.model.vision.select_layer][:, 1:]  # (2, 9, C)
    expected = torch.nn.functional.cross_entropy(model.position_head(feats).reshape(18, 9), torch.arange(9).repeat(2))
    torch.testing.assert_close(model.last_position_loss, expected)
    assert pe.SceneCLIP(vision).position_head is None  # off by default: the shipped recipe is CLIP's loss alone


def test_a_pretraining_with_the_position_task_records_it_in_its_recipe(tmp_path):
    overrides = SMALL_ENCODER
    recipe = pe.pretrain(
        tmp_path / "enc", overrides, steps=2, batch_size=4, lr=1e-3, seed=0, progress=False, position_weight=0.5
    )
    assert "--position-weight 0.5" in recipe["command"]
