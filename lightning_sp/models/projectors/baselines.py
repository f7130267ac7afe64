"""Ablation arms of docs/METHOD.md §5 that need code (the rest are config options of `pooling` / `cropping`).

Each arm is one registered class + one `conf/variant/<name>.yaml`:

| name                   | SP tokens (grid 24)           | extractor                                                        |
|------------------------|-------------------------------|------------------------------------------------------------------|
| `cropping_transformer` | 6 (one per crop)              | C->D, + learned query token, pre-norm TransformerEncoderLayer(s) |
| `cropping_stacked`     | 6 (one per crop)              | Conv2d(C, D, 4, s=4) -> GELU -> Conv2d(D, D, side/4)             |
| `pooling_stacked`      | 6 (one per pooled map)        | same, on the adaptive pools                                      |
| `conv49`               | 49 conv tokens, no SP tokens  | Conv2d(C, D, 12, s=2) -> GELU -> Linear(D, H); no DFI            |
| `learned_queries`      | 6 learned queries             | single-head cross-attention to the patches projected C->D        |

The SP arms subclass `SpatialProjector` and only swap its extractor (`build_extractor`), so DFI (optional, per
`projector.dfi`), W_s (incl. the released head-bias rule of their family) and W_p are the released code, not a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sp.models.projectors.base import Projector, ProjectorConfigError, SpatialOptions, TokenLayout, register
from lightning_sp.models.projectors.mlp import patch_head
from lightning_sp.models.projectors.spatial import (
    DFI_STRIDE,
    CroppingProjector,
    PoolingProjector,
    SpatialProjector,
    SpatialWindows,
    conv_weight,
    dfi_kernel,
    patch_grid,
    scaled_sides,
    window_dot,
)

STACK_FACTOR = 4  # stacked arms: first conv Conv2d(k=4, stride=4), so every window side must be a multiple of 4
CONV49_TOKENS = 49  # the official control: Conv2d(k=12, s=2) on 24x24 -> 7x7


def _grid_tokens(grid_features: torch.Tensor) -> torch.Tensor:
    """(B, C, G, G) -> (B, G*G, C), row-major (patch r*G+c)."""
    return grid_features.flatten(2).transpose(1, 2)


class _ExtractorAttention:
    """Mixin for SP arms whose extractor attends: without DFI, `last_attention` is the extractor's (B, S, G*G)
    attention of each SP token over the patch grid (zero outside its window); with DFI it stays the DFI's
    (B, S, K), as in every DFI arm, and the extractor's is on `projector.sfe.last_attention`."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        out = super().forward(patches)
        if self.dfi is None:
            self.last_attention = self.sfe.last_attention
        return out

    @property
    def attention_kind(self):
        return "dfi" if self.dfi is not None else "extractor"


# ---- transformer extractor per crop ---------------------------------------------------------------------------


class WindowTransformerExtractor(SpatialWindows):
    """Per window: patches projected C->D (+ a learned absolute position embedding of the full grid, cropped with
    the window), a learned query token in front, `layers` pre-norm TransformerEncoderLayers; the query's output
    is the window's SP token.

    The layers are shared by all windows. A conv needs one kernel per window size; a transformer does not, so a
    per-window copy would multiply the extractor by S (6, 12) for no structural reason and make the 12-token arm
    twice the 6-token one. Window identity comes from the per-window query token and the absolute positions
    (without positions a transformer would see each window as a bag of patches, unlike the conv it replaces).
    Dropout 0 (no SP arm has dropout); FFN 4D with GELU, as in CLIP.
    """

    def __init__(
        self, layout: str, vision_width: int, sp_width: int, grid: int, sides=None, layers: int = 1, heads: int = 8
    ) -> None:
        super().__init__(layout, grid, sides)
        d = sp_width
        self.embed = nn.Linear(vision_width, d)
        self.position = nn.Parameter(nn.init.trunc_normal_(torch.empty(grid * grid, d), std=0.02))
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(self.num_tokens, d), std=0.02))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, dim_feedforward=4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.last_attention: torch.Tensor | None = None

    @torch.no_grad()
    def _query_attention(self, layer: nn.TransformerEncoderLayer, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) head-averaged attention of the query (row 0) in `layer`; nn.TransformerEncoderLayer does not
        return its weights, so the one query row is recomputed (1 x L, negligible next to the L x L layer)."""
        h = layer.norm1(seq)  # norm_first: self-attention reads norm1(x)
        return layer.self_attn(h[:, :1], h, h, need_weights=True, average_attn_weights=True)[1][:, 0]

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, S, D); sets `last_attention` (B, S, G*G)."""
        b = grid_features.shape[0]
        x = self.embed(_grid_tokens(grid_features)) + self.position  # (B, G*G, D), once for all windows
        x = x.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        tokens, maps = [], []
        for query, window, (r0, c0, r1, c1) in zip(self.queries, self.windows(x), self.boxes()):
            seq = torch.cat([query.expand(b, 1, -1), _grid_tokens(window)], dim=1)
            for i, layer in enumerate(self.layers):
                if i == len(self.layers) - 1:
                    att = self._query_attention(layer, seq)[:, 1:]  # over the window's patches (query dropped)
                    grid_map = att.new_zeros(b, self.grid, self.grid)
                    grid_map[:, r0:r1, c0:c1] = att.reshape(b, r1 - r0, c1 - c0)
                    maps.append(grid_map.flatten(1))
                seq = layer(seq)
            tokens.append(seq[:, 0])
        self.last_attention = torch.stack(maps, dim=1)
        return torch.stack(tokens, dim=1)


@dataclass(frozen=True)
class WindowTransformerOptions(SpatialOptions):
    """`cropping_transformer`: the SP options, plus its pre-norm TransformerEncoderLayers (width D) shared by all
    windows and their heads (a divisor of sp_width)."""

    extractor_layers: int = 1
    extractor_heads: int = 8


@register("cropping_transformer")
class CroppingTransformerProjector(_ExtractorAttention, CroppingProjector):
    """§5 "conv vs transformer extractor per crop": `cropping` with each crop's big conv replaced by a small
    transformer (WindowTransformerExtractor); DFI, W_s (with cropping's head-bias rule) and W_p unchanged."""

    Options = WindowTransformerOptions

    def build_extractor(self, cfg, vision_width: int, sp_width: int, grid: int) -> nn.Module:
        return WindowTransformerExtractor(
            self.window_layout,
            vision_width,
            sp_width,
            grid,
            cfg.sides,
            layers=cfg.extractor_layers,
            heads=cfg.extractor_heads,
        )

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        super().check_config(cfg, grid)
        if cfg.extractor_layers < 1:
            raise ProjectorConfigError(f"projector.extractor_layers must be >= 1, got {cfg.extractor_layers}")
        if cfg.extractor_heads < 1 or cfg.sp_width % cfg.extractor_heads:
            raise ProjectorConfigError(
                f"projector.extractor_heads ({cfg.extractor_heads}) must be a positive divisor of "
                f"projector.sp_width ({cfg.sp_width}) for '{cls.registry_name}'"
            )


# ---- stacked small convs --------------------------------------------------------------------------------------


class StackedConvExtractor(SpatialWindows):
    """Per window (s x s): Conv2d(C, D, 4, stride 4) -> GELU -> Conv2d(D, D, s/4) over the whole (s/4)^2 map.

    One chain per window, as the released SFE has one conv per window. The first conv has a bias (it feeds a
    GELU); the second, like every SFE conv, has none. The first is a normal strided conv (`reduce`); the second
    covers its whole input, so it is a matmul over the flattened map (`merge`, Conv2d weight layout) as in spatial.py.
    """

    def __init__(self, layout: str, vision_width: int, sp_width: int, grid: int, sides=None) -> None:
        super().__init__(layout, grid, sides)
        if any(s % STACK_FACTOR for s in self.sides):
            raise ValueError(f"stacked convs need window sides divisible by {STACK_FACTOR}, got {self.sides}")
        self.reduce = nn.ModuleList(
            nn.Conv2d(vision_width, sp_width, STACK_FACTOR, stride=STACK_FACTOR) for _ in self.sides
        )
        self.merge = nn.ParameterList(conv_weight(sp_width, sp_width, s // STACK_FACTOR) for s in self.sides)

    def full_window_weights(self) -> list[nn.Parameter]:
        return list(self.merge)  # the 4x4 `reduce` convs are ordinary small kernels: lr_projector

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, S, D)."""
        tokens = [
            window_dot(F.gelu(conv(window)), weight)
            for window, conv, weight in zip(self.windows(grid_features), self.reduce, self.merge)
        ]
        return torch.stack(tokens, dim=1)


class _StackedMixin:
    """§5 "one large kernel vs stacked small convs": the family's SFE with StackedConvExtractor."""

    def build_extractor(self, cfg, vision_width: int, sp_width: int, grid: int) -> nn.Module:
        return StackedConvExtractor(self.window_layout, vision_width, sp_width, grid, cfg.sides)

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        super().check_config(cfg, grid)
        sides = scaled_sides(grid, cfg.sides)
        bad = [s for s in sides if s % STACK_FACTOR]
        if bad:
            raise ProjectorConfigError(
                f"projector '{cls.registry_name}' stacks Conv2d(k={STACK_FACTOR}, stride={STACK_FACTOR}) before a full-window "
                f"conv, so every window side must be a multiple of {STACK_FACTOR}; on a {grid}x{grid} patch grid the "
                f"sides are {sides} ({bad} are not). Use projector.sides / an encoder grid whose scaled sides are "
                f"multiples of {STACK_FACTOR} (the default sides at grid 24 or 48)"
            )


@register("cropping_stacked")
class CroppingStackedProjector(_StackedMixin, CroppingProjector):
    """`cropping` with each crop's single large conv replaced by stacked small convs (StackedConvExtractor)."""


@register("pooling_stacked")
class PoolingStackedProjector(_StackedMixin, PoolingProjector):
    """`pooling` with each pooled map's single large conv replaced by stacked small convs (StackedConvExtractor)."""


# ---- learned queries ------------------------------------------------------------------------------------------


class LearnedQueryExtractor(nn.Module):
    """S learned queries, single-head cross-attention to the patch features: (B, C, G, G) -> (B, S, D).

    X = LN(Linear(C, D)(Z) + P) with P a learned position embedding; A = softmax(Q (X Wk)^T / sqrt(D)) (B, S, G*G);
    out = A (X Wv + b). The key projection has no bias: it would shift all logits of a query equally (no effect,
    zero gradient). The attention is written out rather than `F.scaled_dot_product_attention`, because its weights
    are `last_attention` (visualised); at S x G*G = 6 x 576 a fused kernel has nothing to win.
    """

    def __init__(self, vision_width: int, sp_width: int, grid: int, num_queries: int) -> None:
        super().__init__()
        d = sp_width
        self.num_tokens = num_queries
        self.embed = nn.Linear(vision_width, d)
        self.position = nn.Parameter(nn.init.trunc_normal_(torch.empty(grid * grid, d), std=0.02))
        # N(0, 1) as nn.Embedding / DETR queries: distinct attention maps from the first step (queries near 0
        # would all start as the same global average).
        self.queries = nn.Parameter(torch.randn(num_queries, d))
        self.norm = nn.LayerNorm(d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d)
        self.last_attention: torch.Tensor | None = None

    def boxes(self) -> list[tuple[int, int, int, int]]:
        return []  # no windows: where a query looks is learned (see last_attention)

    def full_window_weights(self) -> list[nn.Parameter]:
        return []  # attention, no convolution

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(_grid_tokens(grid_features)) + self.position)  # (B, G*G, D)
        k, v = self.key(x), self.value(x)
        attention = torch.softmax(self.queries @ k.transpose(1, 2) / math.sqrt(k.shape[-1]), dim=-1)
        self.last_attention = attention.detach()
        return attention @ v


@register("learned_queries")
class LearnedQueriesProjector(_ExtractorAttention, SpatialProjector):
    """Control for "6 more tokens" vs "6 multi-scale spatial tokens": as many SP tokens as the SFE arm (6, or
    len(projector.sides)), through the same (optional) DFI, W_s and W_p, but produced by learned queries
    cross-attending to the whole patch grid, with no hand-made windows or scales. If it matches `pooling` /
    `cropping`, the gain comes from extra tokens, not from the spatial prior. Its extractor is ~C*D + G^2*D + 2*D^2
    parameters (1.3 M at paper widths), like the transformer arm's and far below the 0.76 B of the full-window
    convs: a matching count would need a per-query kernel over the whole grid, i.e. the spatial prior itself.
    W_s unbiased (the SFE-only rule). Refuses the grids the SFE arms refuse (it is compared with them there);
    the values of `sides` are unused, only their number.
    """

    window_layout = "learned_queries"  # not an official layout: export refuses it

    def build_extractor(self, cfg, vision_width: int, sp_width: int, grid: int) -> nn.Module:
        return LearnedQueryExtractor(vision_width, sp_width, grid, len(scaled_sides(grid, cfg.sides)))


# ---- conv49 control -------------------------------------------------------------------------------------------


class StridedConvTokens(nn.Module):
    """Conv2d(C, D, k, stride 2, no bias) giving 7x7 tokens, as unfold + matmul (like the DFI's K/V conv)."""

    def __init__(self, vision_width: int, sp_width: int, grid: int, tokens: int = CONV49_TOKENS) -> None:
        super().__init__()
        self.grid, self.side = grid, math.isqrt(tokens)
        self.kernel, self.stride = dfi_kernel(grid, tokens), DFI_STRIDE  # grid - 2*(side-1): 12 at grid 24
        self.weight = conv_weight(sp_width, vision_width, self.kernel)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Each token's conv window, in unfold's (row-major) order."""
        k, s = self.kernel, self.stride
        return [(i * s, j * s, i * s + k, j * s + k) for i in range(self.side) for j in range(self.side)]

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, 49, D)."""
        cols = F.unfold(grid_features, self.kernel, stride=self.stride)  # (B, C*k*k, 49)
        return cols.transpose(1, 2) @ self.weight.reshape(self.weight.shape[0], -1).t()


@register("conv49")
class Conv49Projector(Projector):
    """The official control (§5): 49 extra tokens from one strided conv, no spatial SP tokens, no DFI.

    Options: the SP arms' (it refuses `dfi` and `sides`, and has no use for `dfi_kv_tokens`), so that a study's
    shared SP settings read the same for it.

    Conv2d(C, D, k=12, stride 2, no bias) over the 24x24 map -> 7x7 = 49 tokens -> GELU -> Linear(D, H) (W_s form,
    unbiased unless projector.head_bias), placed before W_p's patch tokens. On other grids k = grid - 12 keeps 49
    tokens. It has the same K/V conv shape as DFI-49, so it separates "more tokens" from "spatial SP tokens".
    """

    Options = SpatialOptions

    def __init__(self, cfg, vision_width: int, llm_width: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.conv_tokens = StridedConvTokens(vision_width, cfg.sp_width, grid)
        self.layout = TokenLayout(num_sp_tokens=CONV49_TOKENS, patch_grid=(grid, grid))
        self.spatial_head = nn.Sequential(nn.GELU(), nn.Linear(cfg.sp_width, llm_width, bias=bool(cfg.head_bias)))
        self.patch_head = patch_head(vision_width, llm_width)

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        if cfg.sp_width < 1:
            raise ProjectorConfigError(f"projector.sp_width must be positive, got {cfg.sp_width}")
        if cfg.dfi:
            raise ProjectorConfigError(
                "projector 'conv49' is the no-DFI control (49 conv tokens, no SP tokens); "
                "set projector.dfi=false (variant=conv49 does)"
            )
        if cfg.sides is not None:
            raise ProjectorConfigError(
                f"projector 'conv49' has no SP windows; leave projector.sides unset, got {cfg.sides}"
            )
        if dfi_kernel(grid, CONV49_TOKENS) < 1:
            raise ProjectorConfigError(
                f"projector 'conv49' needs a patch grid of at least 13x13 (kernel = grid - 12 gives 7x7 tokens at "
                f"stride {DFI_STRIDE}), got {grid}x{grid}"
            )

    def sp_boxes(self) -> list[tuple[int, int, int, int]]:
        return self.conv_tokens.boxes()

    def sp_conv_parameters(self) -> list[nn.Parameter]:
        return [self.conv_tokens.weight]  # k=12 over a 24x24 grid: the DFI K/V conv's shape

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        grid_features = patch_grid(patches, self.grid)
        return torch.cat([self.spatial_head(self.conv_tokens(grid_features)), self.patch_head(patches)], dim=1)
