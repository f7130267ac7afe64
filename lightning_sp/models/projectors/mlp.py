"""LLaVA-1.5 `mlp2x_gelu` projector: the baseline, and W_p (the patch head) of every LLaVA-SP variant."""

from __future__ import annotations

import torch
from torch import nn

from lightning_sp.models.projectors.base import Projector, TokenLayout, register


def patch_head(vision_width: int, llm_width: int) -> nn.Sequential:
    """Linear(C, H) -> GELU -> Linear(H, H); indices 0 and 2 match LLaVA's `mm_projector.{0,2}` keys."""
    return nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))


@register("mlp")
class MLPProjector(Projector):
    def __init__(self, cfg, vision_width: int, llm_width: int, grid: int) -> None:
        super().__init__()
        self.layout = TokenLayout(num_sp_tokens=0, patch_grid=(grid, grid))
        self.patch_head = patch_head(vision_width, llm_width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.patch_head(patches)
