"""What every projector promises: a token layout and a (B, N, C) -> (B, T, H) forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


class ProjectorConfigError(ValueError):
    """A projector cannot be built for this config or encoder grid (raised at config time)."""


@dataclass(frozen=True)
class TokenLayout:
    """Visual tokens a projector emits: `num_sp_tokens` spatial tokens first, then a patch grid (row-major)."""

    num_sp_tokens: int
    patch_grid: tuple[int, int]

    @property
    def num_patch_tokens(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_sp_tokens + self.num_patch_tokens


class Projector(nn.Module):
    """Maps CLIP patch features (B, grid*grid, C) to LLM visual tokens (B, layout.num_tokens, H)."""

    layout: TokenLayout

    def __init__(self) -> None:
        super().__init__()
        # (B, num_sp_tokens, K) attention of the spatial tokens from the last forward, for visualisation.
        self.last_attention: Optional[torch.Tensor] = None

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        """Raise ProjectorConfigError if this projector cannot run with `cfg` on a `grid`×`grid` encoder."""

    def sp_boxes(self) -> list[tuple[int, int, int, int]]:
        """Patch-grid boxes (row0, col0, row1, col1) each SP token summarises, for drawing; [] if none."""
        return []

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules big enough for FSDP units of their own (sharded and all-gathered apart from the rest of the
        projector), innermost first. Default: none; the whole projector is one unit."""
        return []

    @property
    def attention_kind(self) -> Optional[str]:
        """What ``last_attention`` holds after a forward, for pictures and metrics: "dfi" (each SP token over the
        DFI's n x n K/V tokens), "extractor" (each SP token over the patch grid), or None (nothing to show)."""
        return None

    def sp_conv_parameters(self) -> list[nn.Parameter]:
        """Weights of convolutions whose kernel covers a whole window (fan-in up to grid*grid*C): the optimizer
        trains them at `optim.lr_sp_conv` (Adam moves each weight by ~lr, their outputs by ~lr * fan-in), every
        other projector parameter at `optim.lr_projector`. Declared here by the projector, never guessed from
        parameter names. Default: none."""
        return []
