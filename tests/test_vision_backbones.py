"""Vision backbones as plug-ins: timm SigLIP and DINOv2 beside HF CLIP, checked against timm's own forward, trained
with every projector their grid supports, and a backbone added from outside the package."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lightning_sp.config import ConfigError, compose, group_choices
from lightning_sp.data.images import CLIP_MEAN, CLIP_STD
from lightning_sp.models.seeding import seeded
from lightning_sp.models.vision import (
    VISION_BACKBONES,
    VisionBackbone,
    build_vision,
    image_stats,
    register_vision,
    sincos_2d,
)
from lightning_sp.module import LlavaSPModule
from lightning_sp.train import build_datamodule, train
from evalkit import NARROW, first_and_last_loss, few_step_fit

# The tiny forms (conf/vision/*_tiny.yaml), with evalkit.NARROW's narrower LLM and projector.
TINY_BACKBONES = {"siglip_tiny": 27, "dinov2_tiny": 16}  # preset -> its patch grid
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def timm_reference(cfg, pixels: torch.Tensor) -> torch.Tensor:
    """Block `select_layer`'s output without prefix tokens, computed by hand from an unpruned timm model built the
    same way (same seed, same sin-cos table): patch embedding, positions, then the blocks one by one."""
    v = cfg.model.vision
    with seeded(v.init_seed):
        m = timm.create_model(
            v.arch,
            pretrained=False,
            num_classes=0,
            img_size=v.image_size,
            patch_size=v.patch_size,
            embed_dim=v.hidden_size,
            depth=v.num_layers,
            num_heads=v.num_heads,
            mlp_ratio=v.intermediate_size / v.hidden_size,
        ).eval()
    grid = v.image_size // v.patch_size
    m.pos_embed.data.zero_()
    m.pos_embed.data[0, -grid * grid :] = sincos_2d(grid, v.hidden_size)
    with torch.no_grad():
        x = m.norm_pre(m._pos_embed(m.patch_embed(pixels)))
        for block in m.blocks[: len(m.blocks) + v.select_layer + 1]:
            x = block(x)
    return x[:, m.num_prefix_tokens :]


@pytest.mark.parametrize("preset, grid", TINY_BACKBONES.items())
def test_timm_backbone_features_equal_timms_own_blocks(preset, grid, one_thread):
    cfg = compose([f"vision={preset}"])
    backbone = build_vision(cfg.model.vision)
    assert backbone.grid == grid and backbone.hidden_size == 64
    pixels = torch.randn(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    features = backbone(pixels)
    assert features.shape == (2, grid * grid, 64)
    torch.testing.assert_close(features, timm_reference(cfg, pixels), rtol=1e-5, atol=1e-5)
    # The blocks after the selected one, the final norm and the head are pruned: never computed, never held.
    assert len(backbone.model.blocks) == cfg.model.vision.num_layers - 1
    assert isinstance(backbone.model.norm, nn.Identity) and all(p.requires_grad is False for p in backbone.parameters())
    assert backbone.fsdp_blocks() == list(backbone.model.blocks)


def test_normalisation_comes_from_the_backbone_into_data_pictures_and_prompts(tmp_path, tokenizer, one_thread):
    siglip = compose(["vision=siglip_tiny"])
    assert image_stats(siglip.model.vision) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dino = compose(["vision=dinov2_tiny"])
    assert tuple(map(tuple, image_stats(dino.model.vision))) == IMAGENET
    assert image_stats(compose([]).model.vision) == (CLIP_MEAN, CLIP_STD)
    # The training data pipeline normalises with it, and pads with its mean colour (LLaVA's expand2square).
    dm = build_datamodule(dino, tokenizer, num_visual_tokens=262)
    assert dm.image_stats == image_stats(dino.model.vision)
    from lightning_sp.data.samples import SampleBuilder

    builder = SampleBuilder(tokenizer, "vicuna_v1", 262, 224, None, image_stats=dm.image_stats)
    wide = np.zeros((100, 224, 3), dtype=np.uint8)  # a black strip: padded above and below
    pixels = builder.processor(torch.from_numpy(wide).permute(2, 0, 1).contiguous())
    black = [(0 - m) / s for m, s in zip(*IMAGENET)]
    fill = [(int(255 * m) / 255 - m) / s for m, s in zip(*IMAGENET)]
    torch.testing.assert_close(pixels[:, 112, 5], torch.tensor(black), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 2, 5], torch.tensor(fill), atol=1e-5, rtol=0)
    # The built model carries the same numbers for evaluation prompts and the attention pictures.
    module = LlavaSPModule(compose(["vision=dinov2_tiny", *NARROW]), tokenizer)
    assert module.model.vision.stats == dm.image_stats


def _variants_for(preset: str) -> list[str]:
    ok = []
    for variant in group_choices("variant"):
        try:
            compose([f"vision={preset}", f"variant={variant}"])
            ok.append(variant)
        except ConfigError:
            pass
    return ok


def _random_batch(cfg, tokenizer, model) -> dict:
    n = model.num_visual_tokens
    ids = torch.randint(5, len(tokenizer) - 1, (2, n + 12))
    ids[:, 1 : 1 + n] = model.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n] = -100
    size = cfg.model.vision.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(2, 3, size, size)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_BACKBONES)
def test_every_projector_the_grid_supports_trains_on_the_timm_backbones(preset, tokenizer, one_thread):
    variants = _variants_for(preset)
    # What the grid rules out, and why: the stacked arms need window sides that are multiples of 4.
    assert set(group_choices("variant")) - set(variants) == {"cropping_stacked", "pooling_stacked", "official_stacked"}
    for variant in variants:
        cfg = compose([f"vision={preset}", f"variant={variant}", *NARROW])
        torch.manual_seed(0)
        module = LlavaSPModule(cfg, tokenizer)
        first, last = first_and_last_loss(module, _random_batch(cfg, tokenizer, module.model))
        assert math.isfinite(last) and last < first, (variant, first, last)


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_BACKBONES)
def test_train_command_runs_a_timm_backbone_end_to_end(preset, tmp_path, tokenizer, one_thread):
    run_dir = tmp_path / "run"
    cfg = compose([f"vision={preset}", "variant=pooling", *NARROW, *few_step_fit(tmp_path)])
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"]) and 0.0 <= metrics["val/accuracy"] <= 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_pretrained_timm_weights_load_from_a_local_snapshot(tmp_path, one_thread):
    """name_or_path as a timm hub snapshot directory (model.safetensors): the same features as the saved model."""
    from safetensors.torch import save_file

    arch = "vit_small_patch14_reg4_dinov2.lvd142m"
    torch.manual_seed(3)
    source = timm.create_model(arch, pretrained=False, num_classes=0, img_size=224).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = compose(
        [
            "vision=dinov2_tiny",
            f"model.vision.name_or_path={tmp_path}",
            "model.vision.hidden_size=384",
            "model.vision.num_layers=12",
        ]
    )
    backbone = build_vision(cfg.model.vision)
    pixels = torch.randn(1, 3, 224, 224)
    (expected,) = source.forward_intermediates(
        pixels, indices=[10], norm=False, intermediates_only=True, output_fmt="NLC"
    )
    torch.testing.assert_close(backbone(pixels), expected)


def test_backbone_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.vision.backbone.*valid: clip, timm"):
        compose(["model.vision.backbone=eva"])
    with pytest.raises(ConfigError, match="needs model.vision.arch"):
        compose(["model.vision.backbone=timm", "model.vision.name_or_path=null"])
    with pytest.raises(ConfigError, match="model.vision.arch=vit_nonexistent is not a timm architecture"):
        compose(["vision=siglip_tiny", "model.vision.arch=vit_nonexistent"])
    with pytest.raises(ConfigError, match="unknown vision 'siglip'; valid choices: .*siglip_so400m"):
        compose(["vision=siglip"])


def test_hf_export_refuses_a_backbone_without_a_transformers_class(tokenizer, one_thread):
    module = LlavaSPModule(compose(["vision=siglip_tiny", "variant=mlp", *NARROW]), tokenizer)
    with pytest.raises(NotImplementedError, match="supports model.vision.backbone=clip"):
        module.model.vision.hf_vision_config()


@dataclass
class ConvStemOptions:
    stem_bias: bool = True  # a model.vision key no shipped backbone has


class ConvStem(VisionBackbone):
    """A backbone written outside the package: one strided convolution, a patch per output pixel; its bias is a
    key of its own (`model.vision.stem_bias`)."""

    Options = ConvStemOptions

    @classmethod
    def image_stats(cls, cfg):
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    @classmethod
    def from_config(cls, cfg):
        with seeded(cfg.init_seed):
            conv = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=cfg.stem_bias)
        tower = cls(conv, cfg.select_layer)
        tower._image_size = cfg.image_size
        return tower

    hidden_size = property(lambda self: self.model.out_channels)
    image_size = property(lambda self: self._image_size)
    patch_size = property(lambda self: self.model.kernel_size[0])

    def fsdp_blocks(self):
        return []

    @torch.no_grad()
    def forward(self, pixel_values):
        return self.model(pixel_values).flatten(2).transpose(1, 2)


@pytest.fixture
def conv_stem():
    register_vision("test_conv_stem")(ConvStem)
    yield
    VISION_BACKBONES.pop("test_conv_stem")


@pytest.mark.slow
def test_a_backbone_added_from_outside_is_one_class_and_one_yaml(conv_stem, tmp_path, tokenizer, one_thread):
    preset = tmp_path / "conv_stem.yaml"
    preset.write_text(
        "model:\n  vision: {backbone: test_conv_stem, name_or_path: null, image_size: 224, "
        "patch_size: 16, hidden_size: 48, stem_bias: false}\n"
    )
    cfg = compose(
        [
            "variant=cropping",
            *NARROW,
            *few_step_fit(tmp_path),
        ],
        config_files=[str(preset)],
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    module = LlavaSPModule(cfg, tokenizer)
    assert isinstance(module.model.vision, ConvStem) and module.model.vision.grid == 14
    assert module.model.vision.model.bias is None  # its own key reached it
    assert module.model.projector.layout.patch_grid == (14, 14)
