"""Where things are on the image: SP windows and DFI footprints in pixels, patch-grid maps upsampled to the
image, the image itself denormalised for display."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lightning_sp.data.images import DEFAULT_STATS

Box = tuple[float, float, float, float]  # pixels: (x0, y0, x1, y1)
GridBox = tuple[int, int, int, int]  # patch grid: (row0, col0, row1, col1), end exclusive


def denormalize(pixel_values: torch.Tensor, mean=DEFAULT_STATS[0], std=DEFAULT_STATS[1]) -> np.ndarray:
    """A normalised (3, H, W) image (or a (B, 3, H, W) batch) -> (H, W, 3) (or (B, H, W, 3)) uint8.

    ``mean``/``std``: the normalisation the pixels went through, the vision backbone's (``model.vision.stats``, as
    the attention maps pass it); the default is ImageProcessor's, for pixels made with its default."""
    x = pixel_values.detach().float().cpu()
    shape = (3, 1, 1) if x.ndim == 3 else (1, 3, 1, 1)
    x = x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def scale_box(box: GridBox, patch_grid: tuple[int, int], image_hw: tuple[int, int]) -> Box:
    """Patch-grid box (row0, col0, row1, col1) -> pixel box (x0, y0, x1, y1) on an (H, W) image."""
    (gh, gw), (h, w) = patch_grid, image_hw
    r0, c0, r1, c1 = box
    sy, sx = h / gh, w / gw
    return (c0 * sx, r0 * sy, c1 * sx, r1 * sy)


def pooling_cells(side: int, grid: int) -> list[GridBox]:
    """The bins of ``adaptive_avg_pool2d(x, side)`` on a grid x grid map (PyTorch's rule: floor start, ceil end)."""
    edges = [(math.floor(i * grid / side), math.ceil((i + 1) * grid / side)) for i in range(side)]
    return [(r0, c0, r1, c1) for r0, r1 in edges for c0, c1 in edges]


@dataclass
class SPWindow:
    """What one SP token summarises: a label and pixel boxes (one crop box, or the cells of a pooling grid)."""

    label: str
    boxes: list[Box]


def sp_windows(projector, image_hw: tuple[int, int]) -> list[SPWindow]:
    """One window per SP token (``layout.num_sp_tokens``; [] for ``mlp``): its crop box or pooling grid cells in
    pixels. Tokens without a fixed window (learned queries) get a label and no boxes."""
    layout = projector.layout
    grid_boxes = projector.sp_boxes()
    sfe = getattr(projector, "sfe", None)
    sides, window_layout = getattr(sfe, "sides", None), getattr(sfe, "window_layout", None)
    windows = []
    for k in range(layout.num_sp_tokens):
        box = grid_boxes[k] if k < len(grid_boxes) else None
        side = sides[k] if sides is not None and k < len(sides) else None
        if box is None:
            label, cells = ("query" if sfe is not None else "SP") + f" {k}", []
        elif window_layout == "pooling" and side is not None:
            r0, c0, r1, c1 = box
            if side == r1 - r0:  # the global token: the convolution alone, no pooling; its cells are the patches
                label, cells = f"global {side}x{side}", [box]
            else:
                label = f"pool {side}x{side}"
                cells = [(r0 + a, c0 + b, r0 + c, c0 + d) for a, b, c, d in pooling_cells(side, r1 - r0)]
        elif window_layout == "cropping" and side is not None:
            label, cells = f"crop {side}x{side}", [box]
        else:
            label, cells = f"SP {k}", [box]
        windows.append(SPWindow(label, [scale_box(c, layout.patch_grid, image_hw) for c in cells]))
    return windows


def dfi_footprint(attention: torch.Tensor, grid: tuple[int, int], kernel: int, stride: int) -> torch.Tensor:
    """(S, n, n) DFI weights -> (S, gh, gw) on the patch grid: each K/V token's weight spread evenly over the
    kernel x kernel patches its convolution reads (a transposed convolution with a 1/k^2 box). Mass-preserving."""
    s, n, m = attention.shape
    box = torch.full((1, 1, kernel, kernel), 1.0 / kernel**2, dtype=torch.float32)
    out = F.conv_transpose2d(attention.float().cpu().unsqueeze(1), box, stride=stride).squeeze(1)
    if tuple(out.shape[-2:]) != tuple(grid):
        raise ValueError(
            f"DFI K/V grid {n}x{m} (kernel {kernel}, stride {stride}) covers {tuple(out.shape[-2:])} "
            f"patches, not the {grid} patch grid"
        )
    return out


def upsample_to_image(grid_map: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """(..., gh, gw) per-patch values -> (..., H, W), nearest (each patch covers its pixels), mass-preserving."""
    lead = grid_map.shape[:-2]
    x = grid_map.float().reshape(-1, 1, *grid_map.shape[-2:])
    up = F.interpolate(x, size=image_hw, mode="nearest")
    up = up * (grid_map.shape[-2] * grid_map.shape[-1]) / (image_hw[0] * image_hw[1])
    return up.reshape(*lead, *image_hw)
