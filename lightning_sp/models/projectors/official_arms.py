"""The official code's own ablation arms for the SP extractor (docs/METHOD.md §8), beside ours in baselines.py.

Both are SFE-only (no DFI) cropping arms with the official unbiased head GELU -> Linear(width -> H):

| name                   | per crop of side s (grid 24: s = 4, 8, ..., 24)                                            |
|------------------------|--------------------------------------------------------------------------------------------|
| `official_transformer` | one `nn.Transformer` (d_model = C, 8 heads, 4 encoder + 4 decoder layers, FFN width C,      |
|                        | dropout 0.1, pre-norm, no biases); source = the crop's s*s patches, target = a zero-initialised |
|                        | query token; the decoder's output is the SP token, of width C (the head reads C, not D)      |
| `official_stacked`     | Conv2d (no bias) + BatchNorm2d pairs, no activation, whose kernels shrink the crop to 1x1  |
|                        | (`OFFICIAL_STACKS`); widths C, then D                                                      |

They differ from ours on purpose: `cropping_transformer` shares one small transformer over all windows with
learned positions (a transformer needs no per-size kernel), `*_stacked` is one strided 4x4 conv + GELU + a
full-window conv, and both keep the released DFI. The official ones are what the authors ran; ours isolate the
one change their names say. Weights are our own initialisation (the official arms shipped none): PyTorch's
defaults for the transformer and BatchNorm, `conv_weight` for the convs, zeros for the queries as released.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_sp.models.projectors.base import ProjectorConfigError, register
from lightning_sp.models.projectors.spatial import PAPER_GRID, CroppingProjector, SpatialWindows, scaled_sides

TRANSFORMER_LAYERS = 4  # encoder and decoder each, as released
TRANSFORMER_HEADS = 8
TRANSFORMER_DROPOUT = 0.1

# Per crop side (paper grid 24): the kernels of the official conv stack and whether each conv outputs the vision
# width C ("C") or the SP width D ("D"); every conv is followed by a BatchNorm2d of its width. Each stack ends at
# 1x1: sum(k - 1) == side - 1.
OFFICIAL_STACKS: dict[int, list[tuple[int, str]]] = {
    4: [(3, "D"), (2, "D")],
    8: [(5, "D"), (3, "D"), (2, "D")],
    12: [(5, "C"), (3, "D"), (5, "D"), (2, "D")],
    16: [(5, "C"), (3, "C"), (5, "D"), (3, "D"), (3, "D"), (2, "D")],
    20: [(5, "C"), (5, "C"), (3, "C"), (5, "D"), (3, "D"), (3, "D"), (2, "D")],
    24: [(5, "C"), (5, "C"), (5, "C"), (3, "D"), (5, "D"), (3, "D"), (3, "D"), (2, "D")],
}


class _OfficialSFEOnly(CroppingProjector):
    """Common rules: crops, no DFI (the official arms have none), the unbiased head."""

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        super().check_config(cfg, grid)
        if cfg.dfi or cfg.head_bias:
            raise ProjectorConfigError(
                f"projector '{cls.registry_name}' is the official SFE-only arm: projector.dfi and "
                "projector.head_bias must be false (its variant YAML sets them)"
            )


class OfficialTransformerExtractor(SpatialWindows):
    """One nn.Transformer per window and a zero-initialised query each; token width = the vision width C."""

    def __init__(self, layout: str, vision_width: int, grid: int, sides=None) -> None:
        super().__init__(layout, grid, sides)
        if vision_width % TRANSFORMER_HEADS:
            raise ProjectorConfigError(
                f"official_transformer runs {TRANSFORMER_HEADS} heads at the vision width; "
                f"{vision_width} is not a multiple of {TRANSFORMER_HEADS}"
            )
        self.out_width = vision_width
        with warnings.catch_warnings():
            # nn.Transformer asks its encoder for nested tensors, which pre-norm layers cannot use, and warns so on
            # every construction; they only pay off for padded batches, and crops have no padding.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.transformers = nn.ModuleList(
                nn.Transformer(
                    d_model=vision_width,
                    nhead=TRANSFORMER_HEADS,
                    num_encoder_layers=TRANSFORMER_LAYERS,
                    num_decoder_layers=TRANSFORMER_LAYERS,
                    dim_feedforward=vision_width,
                    dropout=TRANSFORMER_DROPOUT,
                    batch_first=True,
                    norm_first=True,
                    bias=False,
                )
                for _ in self.sides
            )
        self.queries = nn.Parameter(torch.zeros(len(self.sides), vision_width))

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, S, C)."""
        b = grid_features.shape[0]
        tokens = []
        for window, transformer, query in zip(self.windows(grid_features), self.transformers, self.queries):
            src = window.flatten(2).transpose(1, 2)  # (B, s*s, C), row-major within the crop
            tokens.append(transformer(src, query.expand(b, 1, -1))[:, 0])
        return torch.stack(tokens, dim=1)


@register("official_transformer")
class OfficialTransformerProjector(_OfficialSFEOnly):
    """The official "transformer extractor per crop" arm (OfficialTransformerExtractor); no DFI."""

    def build_extractor(self, cfg, vision_width: int, sp_width: int, grid: int) -> nn.Module:
        return OfficialTransformerExtractor(self.window_layout, vision_width, grid, cfg.sides)


class OfficialStackedExtractor(SpatialWindows):
    """Per window, the official Conv2d + BatchNorm2d stack of its side (OFFICIAL_STACKS); token width D."""

    def __init__(self, layout: str, vision_width: int, sp_width: int, grid: int, sides=None) -> None:
        super().__init__(layout, grid, sides)
        self.out_width = sp_width
        widths = {"C": vision_width, "D": sp_width}
        self.stacks = nn.ModuleList()
        for side in self.sides:
            layers, width = [], vision_width
            for kernel, out in OFFICIAL_STACKS[side]:
                layers += [nn.Conv2d(width, widths[out], kernel, bias=False), nn.BatchNorm2d(widths[out])]
                width = widths[out]
            self.stacks.append(nn.Sequential(*layers))

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, S, D)."""
        return torch.stack(
            [stack(window).flatten(1) for window, stack in zip(self.windows(grid_features), self.stacks)], dim=1
        )


@register("official_stacked")
class OfficialStackedProjector(_OfficialSFEOnly):
    """The official "stacked small convs" arm (OfficialStackedExtractor); no DFI. Its kernels are written for the
    crops of the paper's 24x24 grid, so it runs there only."""

    def build_extractor(self, cfg, vision_width: int, sp_width: int, grid: int) -> nn.Module:
        return OfficialStackedExtractor(self.window_layout, vision_width, sp_width, grid, cfg.sides)

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        super().check_config(cfg, grid)
        sides = scaled_sides(grid, cfg.sides)
        if grid != PAPER_GRID or not set(sides) <= set(OFFICIAL_STACKS):
            raise ProjectorConfigError(
                f"projector 'official_stacked' has the official conv stacks of the crops {sorted(OFFICIAL_STACKS)} "
                f"of the paper's {PAPER_GRID}x{PAPER_GRID} grid; this encoder gives a {grid}x{grid} grid (sides "
                f"{sides}). Use a patch-14 encoder at 336 px (model.vision.patch_size=14; with the embedded default "
                "also model.vision.name_or_path=null for a random one)"
            )
