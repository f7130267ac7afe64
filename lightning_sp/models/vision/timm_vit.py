"""timm ViT encoders (SigLIP, DINOv2, any timm ``VisionTransformer``), as prismatic-vlms uses them.

``model.vision.arch`` is the timm architecture name (``vit_so400m_patch14_siglip_384``,
``vit_large_patch14_reg4_dinov2``); its pretrained config gives the normalisation (SigLIP 0.5 / 0.5, DINOv2
ImageNet's), so no constant is assumed. Weights: ``name_or_path`` is a local file (``.safetensors`` / ``.bin`` /
``.pth``), a directory holding ``model.safetensors`` or ``pytorch_model.bin`` (a timm hub snapshot), or a hub id
(``timm/vit_so400m_patch14_siglip_384.webli``); ``null`` builds the architecture at the config's sizes
(hidden_size, num_layers, num_heads, intermediate_size, image_size, patch_size) with random weights: the tiny forms
the tests train.

The features are block ``select_layer``'s output (``-2``: the penultimate block, as LLaVA and prismatic read CLIP and
SigLIP), before the final norm, prefix tokens (CLS, registers) dropped. The blocks after it, the final norm and the
pooling head are pruned at build: never computed, never stored.
"""

from __future__ import annotations

import timm
import torch

from lightning_sp.models.seeding import seeded
from lightning_sp.data.images import ImageStats
from lightning_sp.models.vision.base import VisionBackbone, register_vision, write_sincos_positions
from lightning_sp.paths import resolve

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _weights_overlay(name_or_path: str) -> dict:
    """timm's ``pretrained_cfg_overlay`` that points its loader at a local file or a hub repository."""
    local = resolve(name_or_path)
    if local.is_file():
        return {"file": str(local)}
    if local.is_dir():
        for name in WEIGHT_FILES:
            if (local / name).is_file():
                return {"file": str(local / name)}
        raise FileNotFoundError(
            f"model.vision.name_or_path={name_or_path}: the directory holds none of {', '.join(WEIGHT_FILES)}"
        )
    return {"hf_hub_id": name_or_path}


@register_vision("timm")
class TimmViT(VisionBackbone):
    """A timm VisionTransformer, frozen, pruned after ``select_layer``."""

    @classmethod
    def image_stats(cls, cfg) -> ImageStats:
        pretrained = timm.models.get_pretrained_cfg(cfg.arch)
        if pretrained is None:
            raise ValueError(
                f"model.vision.arch={cfg.arch}: timm has no pretrained config for it, so its normalisation is unknown"
            )
        return tuple(pretrained.mean), tuple(pretrained.std)

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.arch:
            raise ValueError(
                "model.vision.backbone=timm needs model.vision.arch, a timm architecture name (e.g. "
                "vit_so400m_patch14_siglip_384, vit_large_patch14_reg4_dinov2)"
            )
        if not timm.is_model(cfg.arch):
            close = timm.list_models(f"*{cfg.arch.split('.')[0].split('_')[0]}*")[:8]
            raise ValueError(
                f"model.vision.arch={cfg.arch} is not a timm architecture (timm {timm.__version__}); "
                f"for example: {', '.join(close)}"
            )
        if cfg.select_layer >= 0 or (cfg.select_layer < -cfg.num_layers and not cfg.name_or_path):
            raise ValueError(
                f"model.vision.select_layer={cfg.select_layer}: timm backbones take a block counted "
                f"from the end (-1 the last block's output, -2 the penultimate)"
            )

    @classmethod
    def from_config(cls, cfg) -> "TimmViT":
        kwargs = {"num_classes": 0, "img_size": cfg.image_size}
        if cfg.name_or_path:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=_weights_overlay(cfg.name_or_path))
            model = timm.create_model(cfg.arch, **kwargs)
        else:
            if cfg.intermediate_size % cfg.hidden_size:
                raise ValueError(
                    f"model.vision.intermediate_size ({cfg.intermediate_size}) must be a multiple of "
                    f"hidden_size ({cfg.hidden_size}) for a timm ViT (its MLP is sized by a ratio)"
                )
            kwargs.update(
                patch_size=cfg.patch_size,
                embed_dim=cfg.hidden_size,
                depth=cfg.num_layers,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
            )
            with seeded(cfg.init_seed):
                model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
            if cfg.position_init == "sincos":
                write_sincos_positions(model.pos_embed.data[0], cfg.image_size // cfg.patch_size)
        depth = len(model.blocks)
        block = depth + cfg.select_layer
        if not 0 <= block < depth:
            raise ValueError(f"model.vision.select_layer={cfg.select_layer}: {cfg.arch} has {depth} blocks")
        model.prune_intermediate_layers(indices=[block], prune_norm=True, prune_head=True)
        return cls(model, cfg.select_layer)

    @property
    def hidden_size(self) -> int:
        return self.model.embed_dim

    @property
    def image_size(self) -> int:
        return self.model.patch_embed.img_size[0]

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    def fsdp_blocks(self) -> list:
        return list(self.model.blocks)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Pruned at build: the selected block is the last one kept.
        dtype = self.model.patch_embed.proj.weight.dtype
        (features,) = self.model.forward_intermediates(
            pixel_values.to(dtype),
            indices=[len(self.model.blocks) - 1],
            norm=False,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return features
