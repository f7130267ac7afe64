"""LLaVA-SP projectors: Spatial Feature Extractor (SFE) + Detail Feature Integrator (DFI) + W_s + W_p.

Shapes (docs/METHOD.md §2): patches Z (B, G*G, C) -> 6 SP tokens (B, 6, D) -> W_s -> (B, 6, H), placed before
W_p(Z) (B, G*G, H). At G=24 the windows are exactly the paper's; other grids scale them proportionally.

Every SFE convolution covers its whole input window (kernel = window), so each output token is one dot
product over the flattened window. We keep the weights in Conv2d layout (D, C, k, k) — the checkpoint format —
and compute with a matmul over the flattened window instead of `F.conv2d`: same numbers, and on CPU the
backward of a 24×24×1024 kernel is >10× faster as a matmul than through the convolution kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sp.models.projectors.base import Projector, ProjectorConfigError, SpatialOptions, TokenLayout, register
from lightning_sp.models.projectors.mlp import patch_head

PAPER_GRID = 24
PAPER_SIDES = (4, 8, 12, 16, 20, 24)  # one SP token per window side, centre first, global last
DFI_STRIDE = 2  # released DFI: Conv2d(k=16, s=2) on 24x24 -> 5x5 = 25 K/V tokens


def scaled_sides(grid: int, sides=None) -> list[int]:
    """Window sides (given on the paper's 24x24 grid) scaled to `grid`; at 24 they are unchanged."""
    return [max(1, round(s * grid / PAPER_GRID)) for s in (sides or PAPER_SIDES)]


def dfi_kernel(grid: int, kv_tokens: int) -> int:
    """Kernel of the stride-2 DFI conv that yields `kv_tokens` = n*n K/V tokens: 16 for 25 and 12 for 49 at 24."""
    side = math.isqrt(kv_tokens)
    return grid - DFI_STRIDE * (side - 1)


def conv_weight(out_ch: int, in_ch: int, k: int) -> nn.Parameter:
    """A Conv2d-layout weight with nn.Conv2d's default init (the official code left these uninitialised)."""
    w = torch.empty(out_ch, in_ch, k, k)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


def patch_grid(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, G*G, C) row-major patch tokens (patch r*G+c sits at [r, c]) -> (B, C, G, G) feature map."""
    b, n, c = patches.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid * grid} patch tokens ({grid}x{grid} grid), got {n}")
    return patches.transpose(1, 2).reshape(b, c, grid, grid)


def window_dot(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Conv2d with kernel == window size, as a matmul: (B, C, k, k) x (D, C, k, k) -> (B, D)."""
    return window.reshape(window.shape[0], -1) @ weight.reshape(weight.shape[0], -1).t()


class SpatialWindows(nn.Module):
    """The SP windows, no weights: centred crops (`cropping`) or adaptive pools (`pooling`) of the patch grid.
    Extractors (this file's SFE, the ablation arms in baselines.py) subclass it and turn each window into a token."""

    def __init__(self, window_layout: str, grid: int, sides=None) -> None:
        super().__init__()
        if window_layout not in ("cropping", "pooling"):
            raise ValueError(f"SP window layout must be 'cropping' or 'pooling', got '{window_layout}'")
        # The projector class's `window_layout` (a string); `Projector.layout` is the token layout (TokenLayout).
        self.window_layout, self.grid = window_layout, grid
        self.sides = scaled_sides(grid, sides)

    @property
    def num_tokens(self) -> int:
        return len(self.sides)

    def full_window_weights(self) -> list[nn.Parameter]:
        """The extractor's convolution weights whose kernel is a whole window (Projector.sp_conv_parameters)."""
        return []

    def windows(self, grid_features: torch.Tensor):
        """Each token's input window (B, C', s, s), in token order; any channel count C'."""
        for side, (r0, c0, r1, c1) in zip(self.sides, self.boxes()):
            if self.window_layout == "cropping":
                yield grid_features[:, :, r0:r1, c0:c1]
            elif side == self.grid:
                yield grid_features  # the global token is the conv alone, no pooling
            else:
                yield F.adaptive_avg_pool2d(grid_features, side)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(row0, col0, row1, col1) of each token's window on the grid (pooling tokens see the whole grid)."""
        if self.window_layout == "pooling":
            return [(0, 0, self.grid, self.grid)] * len(self.sides)
        return [
            ((self.grid - s) // 2, (self.grid - s) // 2, (self.grid + s) // 2, (self.grid + s) // 2) for s in self.sides
        ]


class SpatialFeatureExtractor(SpatialWindows):
    """Six multi-scale tokens from the patch grid: one full-window conv per crop (`cropping`) or pool (`pooling`)."""

    def __init__(self, window_layout: str, vision_width: int, sp_width: int, grid: int, sides=None) -> None:
        super().__init__(window_layout, grid, sides)
        self.weights = nn.ParameterList(conv_weight(sp_width, vision_width, s) for s in self.sides)

    def full_window_weights(self) -> list[nn.Parameter]:
        return list(self.weights)

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, 6, D)."""
        tokens = [window_dot(window, weight) for window, weight in zip(self.windows(grid_features), self.weights)]
        return torch.stack(tokens, dim=1)


class DetailFeatureIntegrator(nn.Module):
    """Cross-attention from the SP tokens (queries) to K/V tokens of a strided conv over the grid.

    Single head, no output projection, no residual; the result is concatenated to the SP tokens (B, S, 2D).
    The attention is written out by hand rather than with `F.scaled_dot_product_attention` because its weights
    (B, S, 25) are a product output (visualised), and at S=6 x 25 there is nothing for a fused kernel to win.
    """

    def __init__(self, vision_width: int, sp_width: int, grid: int, kv_tokens: int = 25) -> None:
        super().__init__()
        self.kernel = dfi_kernel(grid, kv_tokens)
        self.stride = DFI_STRIDE
        self.kv_side = math.isqrt(kv_tokens)
        self.kv_weight = conv_weight(sp_width, vision_width, self.kernel)

        def ln_linear() -> nn.Sequential:  # indices match the official `{query,key,value}_projector.{0,1}`
            return nn.Sequential(nn.LayerNorm(sp_width), nn.Linear(sp_width, sp_width))

        self.query, self.key, self.value = ln_linear(), ln_linear(), ln_linear()

    def kv_tokens(self, grid_features: torch.Tensor) -> torch.Tensor:
        """Conv2d(C, D, k, stride 2) as unfold + matmul: (B, C, G, G) -> (B, kv_side**2, D)."""
        cols = F.unfold(grid_features, self.kernel, stride=self.stride)  # (B, C*k*k, L)
        return cols.transpose(1, 2) @ self.kv_weight.reshape(self.kv_weight.shape[0], -1).t()

    def forward(self, sp_raw: torch.Tensor, grid_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv_tokens(grid_features)
        q, k, v = self.query(sp_raw), self.key(kv), self.value(kv)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.cat([sp_raw, attention @ v], dim=-1), attention


class SpatialProjector(Projector):
    """SFE (+ DFI) -> W_s for 6 SP tokens, W_p for the patch tokens; SP tokens first."""

    # The SP windows, "cropping" or "pooling" (SpatialWindows): also the name of the released LLaVA-SP variant
    # whose checkpoint layout these weights have (models/official.py). `variant=` (conf/variant/) is a preset file
    # and `projector.name` the registered class it selects; several classes share one window layout.
    window_layout: str = ""
    default_head_bias: bool = False
    Options = SpatialOptions

    def __init__(self, cfg, vision_width: int, llm_width: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        d = cfg.sp_width
        self.sfe = self.build_extractor(cfg, vision_width, d, grid)
        self.layout = TokenLayout(num_sp_tokens=self.sfe.num_tokens, patch_grid=(grid, grid))
        self.dfi = DetailFeatureIntegrator(vision_width, d, grid, cfg.dfi_kv_tokens) if cfg.dfi else None
        # SFE-only arms use an unbiased head (official code); with DFI the released variant decides.
        bias = cfg.head_bias if cfg.head_bias is not None else (self.default_head_bias and cfg.dfi)
        width = 2 * d if cfg.dfi else getattr(self.sfe, "out_width", d)  # an extractor may hand on other widths
        self.spatial_head = nn.Sequential(nn.GELU(), nn.Linear(width, llm_width, bias=bias))
        self.patch_head = patch_head(vision_width, llm_width)

    def build_extractor(self, cfg, vision_width: int, sp_width: int, grid: int) -> nn.Module:
        """The SP-token extractor: (B, C, G, G) -> (B, num_tokens, D), with `num_tokens` and `boxes()`.
        Ablation arms (baselines.py) override this to swap the extractor and keep DFI, W_s and W_p."""
        return SpatialFeatureExtractor(self.window_layout, vision_width, sp_width, grid, cfg.sides)

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        if cfg.sides is not None and (not cfg.sides or any(not 1 <= s <= PAPER_GRID for s in cfg.sides)):
            raise ProjectorConfigError(f"projector.sides must be a non-empty list of sides in 1..24, got {cfg.sides}")
        sides = scaled_sides(grid, cfg.sides)
        if len(set(sides)) != len(sides):
            raise ProjectorConfigError(
                f"projector '{cls.registry_name}' needs {len(sides)} distinct window sizes, but a {grid}x{grid} "
                f"patch grid only gives {sides}; use an encoder with a larger grid (image_size / patch_size) or "
                "fewer sides"
            )
        if cfg.sp_width < 1:
            raise ProjectorConfigError(f"projector.sp_width must be positive, got {cfg.sp_width}")
        if cfg.dfi:
            n = cfg.dfi_kv_tokens
            if n < 1 or math.isqrt(n) ** 2 != n or dfi_kernel(grid, n) < 1:
                raise ProjectorConfigError(
                    f"projector.dfi_kv_tokens must be a square number n*n with 2*(n-1) < grid ({grid}), got {n}"
                )

    def sp_boxes(self) -> list[tuple[int, int, int, int]]:
        return self.sfe.boxes()

    def sp_conv_parameters(self) -> list[nn.Parameter]:
        return [*self.sfe.full_window_weights(), *([self.dfi.kv_weight] if self.dfi is not None else [])]

    def fsdp_units(self) -> list[nn.Module]:
        # The full-window SP convolutions and the DFI; the heads W_s, W_p stay in the projector's unit, whose output
        # (the concatenated tokens) is what the LLM consumes.
        return [self.sfe, *([self.dfi] if self.dfi is not None else [])]

    @property
    def attention_kind(self) -> Optional[str]:
        return "dfi" if self.dfi is not None else None

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        grid_features = patch_grid(patches, self.grid)
        sp = self.sfe(grid_features)
        if self.dfi is not None:
            sp, attention = self.dfi(sp, grid_features)
            self.last_attention = attention.detach()
        return torch.cat([self.spatial_head(sp), self.patch_head(patches)], dim=1)


@register("cropping")
class CroppingProjector(SpatialProjector):
    window_layout = "cropping"
    default_head_bias = True  # the released Cropping checkpoint has `conv_linear.1.bias`


@register("pooling")
class PoolingProjector(SpatialProjector):
    window_layout = "pooling"
    default_head_bias = False
