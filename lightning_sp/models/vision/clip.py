"""HF CLIP vision encoder (LLaVA-1.5's): ``hidden_states[select_layer]``, CLS dropped, CLIP's normalisation."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from lightning_sp.data.images import CLIP_MEAN, CLIP_STD
from lightning_sp.models.seeding import seeded
from lightning_sp.data.images import ImageStats
from lightning_sp.models.vision.base import VisionBackbone, register_vision, write_sincos_positions
from lightning_sp.paths import resolve


def _pretrained_geometry(name_or_path: str) -> Optional[tuple[int, int]]:
    """(image_size, patch_size) from a pretrained CLIP's config.json when it is on disk (a local directory or the
    hub cache: never downloaded); None when it cannot be read here (checked again when the model loads)."""
    try:
        local = resolve(name_or_path)
        config = CLIPVisionConfig.from_pretrained(
            str(local) if local.is_dir() else str(name_or_path), local_files_only=True
        )
    except Exception:  # noqa: BLE001 -- not local, not cached, not a CLIP config: checked when the model loads
        return None
    return int(config.image_size), int(config.patch_size)


@register_vision("clip")
class CLIPVision(VisionBackbone):
    """`CLIPVisionModel` (pretrained: ``name_or_path``, an HF id or directory; random-init from the size fields)."""

    @classmethod
    def image_stats(cls, cfg) -> ImageStats:
        return CLIP_MEAN, CLIP_STD

    @classmethod
    def check_config(cls, cfg) -> None:
        """A pretrained encoder's grid comes from its own config: image_size / patch_size must agree with it, or the
        projector would be sized for a grid the encoder does not give."""
        geometry = _pretrained_geometry(cfg.name_or_path) if cfg.name_or_path else None
        if geometry is None or geometry == (cfg.image_size, cfg.patch_size):
            return
        size, patch = geometry
        raise ValueError(
            f"model.vision.name_or_path={cfg.name_or_path} takes {size}px images with patch {patch} (a "
            f"{size // patch}x{size // patch} grid), but the config says model.vision.image_size={cfg.image_size}, "
            f"model.vision.patch_size={cfg.patch_size} ({cfg.image_size // cfg.patch_size}x"
            f"{cfg.image_size // cfg.patch_size}); set model.vision.image_size={size} model.vision.patch_size={patch}"
        )

    @classmethod
    def from_config(cls, cfg) -> "CLIPVision":
        if cfg.name_or_path:
            local = resolve(cfg.name_or_path)  # a repo-relative dir (the shipped data/encoder) from any cwd
            source = str(local) if local.is_dir() else cfg.name_or_path
            model = CLIPVisionModel.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        else:
            config = CLIPVisionConfig(
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
            )
            with seeded(cfg.init_seed):
                model = CLIPVisionModel(config)
            if cfg.position_init == "sincos":  # row 0 is CLS's
                table = model.vision_model.embeddings.position_embedding.weight.data
                write_sincos_positions(table, config.image_size // config.patch_size)
        return cls(model, cfg.select_layer)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    def fsdp_blocks(self) -> list:
        return list(self.model.vision_model.encoder.layers)

    def hf_vision_config(self) -> CLIPVisionConfig:
        return self.model.config

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.get_input_embeddings().weight.dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]
