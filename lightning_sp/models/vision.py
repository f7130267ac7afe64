"""Frozen vision encoder: HF CLIP, penultimate layer, CLS dropped."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from lightning_sp.models.seeding import seeded
from lightning_sp.paths import resolve


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table (grid*grid, width), row-major, as in MAE: half the channels encode
    the row, half the column."""
    if width % 4:
        raise ValueError(f"sincos position embeddings need a width divisible by 4, got {width}")
    quarter = width // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class VisionTower(nn.Module):
    """Wraps `CLIPVisionModel`; returns patch features (B, grid*grid, C) from `select_layer`, never trains."""

    def __init__(self, model: CLIPVisionModel, select_layer: int = -2) -> None:
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.model.requires_grad_(False)
        self.model.eval()

    @classmethod
    def from_config(cls, cfg) -> "VisionTower":
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
            if cfg.position_init == "sincos":
                table = model.vision_model.embeddings.position_embedding.weight
                table.data[1:] = sincos_2d(config.image_size // config.patch_size, config.hidden_size)
                table.data[0] = 0.0  # CLS
        tower = cls(model, cfg.select_layer)
        if tower.image_size != cfg.image_size or tower.patch_size != cfg.patch_size:
            raise ValueError(
                f"vision encoder {cfg.name_or_path} takes {tower.image_size}px images with patch {tower.patch_size}, "
                f"but the config says model.vision.image_size={cfg.image_size}, patch_size={cfg.patch_size}"
            )
        return tower

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def train(self, mode: bool = True) -> "VisionTower":
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever Lightning asks
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.get_input_embeddings().weight.dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]
