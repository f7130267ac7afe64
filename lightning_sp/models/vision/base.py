"""What every vision backbone promises, and the registry that names them.

A backbone is a frozen encoder that turns normalised square images (B, 3, S, S) into patch features
(B, grid*grid, C) from one chosen layer, prefix tokens (CLS, registers) dropped, row-major over the patch grid: what
the projector reads. Everything else the rest of the code needs from an encoder is asked of the backbone class, never
assumed to be CLIP:

- ``image_stats(cfg)``: the per-channel mean and std its pixels are normalised with (and LLaVA's pad colour is the
  mean), readable from the config alone, so data pipelines, pictures and exports need no model;
- ``check_config(cfg)``: refuse, at config time, what this backbone cannot build (naming the key);
- ``hidden_size`` / ``image_size`` / ``patch_size`` / ``grid``: from the built encoder, never from constants;
- ``fsdp_blocks()``: its repeated blocks, each an FSDP unit;
- ``hf_vision_config()``: the transformers vision config an HF export writes (only backbones an HF class can load).
- ``Options`` (optional): a dataclass of the ``model.vision.*`` keys it reads beyond the shared ones, with defaults;
  they become config keys like any other.

A new backbone is one subclass registered under an exact name (``@register_vision("name")``) and one YAML that sets
``model.vision.backbone: name`` (a ``vision=`` preset in ``conf/vision/`` or any ``--config`` file); tests/
test_vision_backbones.py adds one from outside the package and trains it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_sp.data.images import ImageStats
from lightning_sp.registry import Registry


class VisionBackbone(nn.Module):
    """Frozen image encoder; subclasses set ``model`` and ``select_layer`` and implement the abstract parts."""

    registry_name: str = ""
    # A dataclass of `model.vision.*` keys this backbone reads beyond the shared ones (each with its default): the
    # config schema gains them (config.run_schema). None: the shared keys suffice.
    Options: Optional[type] = None
    stats: ImageStats  # (mean, std) of its input normalisation; set by build_vision from image_stats(cfg)

    def __init__(self, model: nn.Module, select_layer: int) -> None:
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.model.requires_grad_(False)
        self.model.eval()

    # -- built from the config alone -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "VisionBackbone":
        raise NotImplementedError

    @classmethod
    def image_stats(cls, cfg) -> ImageStats:
        """(mean, std) per RGB channel that this encoder's inputs are normalised with."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError naming the model.vision key this backbone cannot honour. Default: nothing to check."""

    # -- asked of the built encoder --------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def fsdp_blocks(self) -> list[nn.Module]:
        """The encoder's repeated blocks, innermost FSDP units (the rest of the tower is one unit around them)."""
        raise NotImplementedError

    def hf_vision_config(self):
        """The transformers vision config of this encoder, for HF exports; backbones no HF class loads refuse."""
        raise NotImplementedError(
            f"the '{self.registry_name}' vision backbone has no transformers vision class to export to; HF export "
            "supports model.vision.backbone=clip (evaluate other encoders from their checkpoints)"
        )

    def train(self, mode: bool = True) -> "VisionBackbone":
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever Lightning asks
        return self


VISION_BACKBONES: Registry[type[VisionBackbone]] = Registry("vision backbone", "model.vision.backbone", VisionBackbone)
register_vision = VISION_BACKBONES.register


def backbone_class(cfg) -> type[VisionBackbone]:
    """The class registered as ``cfg.backbone`` (a model.vision config); an unknown name lists the valid ones."""
    return VISION_BACKBONES.lookup(cfg.backbone)


def build_vision(cfg) -> VisionBackbone:
    cls = backbone_class(cfg)
    cls.check_config(cfg)
    backbone = cls.from_config(cfg)
    backbone.stats = cls.image_stats(cfg)
    if backbone.image_size != cfg.image_size or backbone.patch_size != cfg.patch_size:
        raise ValueError(
            f"vision encoder {cfg.name_or_path or cfg.backbone} takes {backbone.image_size}px images with patch "
            f"{backbone.patch_size}, but the config says model.vision.image_size={cfg.image_size}, "
            f"patch_size={cfg.patch_size}"
        )
    return backbone


def image_stats(cfg) -> ImageStats:
    """(mean, std) the configured encoder's inputs are normalised with, without building it."""
    return backbone_class(cfg).image_stats(cfg)


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


def write_sincos_positions(table: torch.Tensor, grid: int) -> None:
    """Fill a random-init encoder's position table (prefix rows + grid*grid patch rows, width) in place: the patch
    rows get :func:`sincos_2d` (a clear 2-D position, as a trained encoder's features have), the prefix rows (CLS,
    registers; none for SigLIP) zeros."""
    table.zero_()
    table[-grid * grid :] = sincos_2d(grid, table.shape[-1])
