"""Drawing the maps: matplotlib figures (``matplotlib.figure.Figure``, no pyplot state), the same as uint8
arrays for TensorBoard, the question/answer markdown, and PNG files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from lightning_sp.data.answers import normalize_answer
from lightning_sp.data.synthetic import POSITIONS
from lightning_sp.viz.geometry import SPWindow
from lightning_sp.viz.maps import AttentionMaps


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    alpha: float = 0.55,
    cmap: str = "jet",
    lo: Optional[float] = None,
    hi: Optional[float] = None,
) -> np.ndarray:
    """Blend a non-negative (H, W) map, scaled from ``lo`` to ``hi``, over an (H, W, 3) uint8 image; returns
    uint8. Defaults: 0 to max(map max, 2 x map mean), so a flat map shows mid-scale everywhere instead of
    stretching float noise over the whole colour range, and anything at twice the mean or more stands out."""
    from matplotlib import colormaps

    h = np.asarray(heat, dtype=np.float64)
    lo = 0.0 if lo is None else lo
    hi = max(float(h.max()), 2 * float(h.mean())) if hi is None else hi
    h = ((h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)).clip(0, 1)
    colour = colormaps[cmap](h)[..., :3]
    a = alpha * (0.25 + 0.75 * h)[..., None]  # faint where the map is low: the image stays readable
    out = (1 - a) * image.astype(np.float64) / 255 + a * colour
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def _draw_window(ax, window: SPWindow, colour: str = "white") -> None:
    """The window's boxes as one collection (a 20x20 pooling grid is 400 cells: one artist, not 400)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if not window.boxes:
        return
    many = len(window.boxes) > 1
    rects = [Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in window.boxes]
    ax.add_collection(
        PatchCollection(
            rects, facecolor="none", edgecolor=colour, linewidth=0.4 if many else 1.8, alpha=0.5 if many else 1.0
        )
    )


def _image_axis(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def sp_attention_figure(maps: AttentionMaps, panel: float = 1.9, columns: int = 6):
    """Each SP token's attention over the image with its window / pooling cells drawn (DFI: relative to uniform
    attention, plus the raw n x n K/V weights below). None when the projector has no SP-token attention."""
    from matplotlib.figure import Figure

    if maps.sp_attention_kind is None:
        return None
    dfi = maps.sp_attention_kind == "dfi"
    s = maps.sp_attention.shape[0]
    cols = min(s, columns)
    blocks = math.ceil(s / cols)
    per_block = 2 if dfi else 1
    fig = Figure(figsize=(panel * cols, (panel + 0.25) * per_block * blocks + 0.4), dpi=90, layout="constrained")
    axes = fig.subplots(per_block * blocks, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k in range(s):
        row, col = per_block * (k // cols), k % cols
        window = maps.windows[k] if k < len(maps.windows) else SPWindow(f"SP {k}", [])
        shown = maps.sp_attention_shown[k]
        ax = axes[row, col]
        ax.set_axis_on()
        if dfi:
            title = f"SP {k}: {window.label}\n{shown.min():.2f}x-{shown.max():.2f}x uniform"
        else:
            title = f"SP {k}: {window.label}\nmax {maps.sp_attention[k].max():.3f} per patch"
        _image_axis(ax, overlay(maps.image, shown), title)
        _draw_window(ax, window)
        if dfi:
            ax = axes[row + 1, col]
            ax.set_axis_on()
            w = maps.sp_attention[k]
            vmax = max(float(w.max()), 2.0 / w.size)  # uniform attention shows mid-scale
            ax.imshow(w, cmap="viridis", vmin=0, vmax=vmax)
            if w.shape[0] <= 7:
                for r in range(w.shape[0]):
                    for c in range(w.shape[1]):
                        ax.text(
                            c,
                            r,
                            f"{100 * w[r, c]:.1f}",
                            ha="center",
                            va="center",
                            fontsize=5.5,
                            color="white" if w[r, c] < 0.6 * vmax else "black",
                        )
            ax.set_title(f"K/V weights {w.shape[0]}x{w.shape[1]}, % (uniform {100 / w.size:.1f})", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    peak, entropy = maps.sp_attention_spread
    spread = f"mean over SP tokens: peak {peak:.2f}x uniform, entropy {entropy:.3f} of uniform's"
    if dfi:
        fig.suptitle(
            "DFI cross-attention of each SP token: K/V weights spread over their receptive fields, "
            f"relative to uniform attention\nK/V weights, {spread}",
            fontsize=9,
        )
    else:
        fig.suptitle(f"SP extractor attention of each SP token over the patch grid\n{spread}", fontsize=9)
    return fig


def llm_figure(maps: AttentionMaps, panel: float = 3.0):
    """Left: answer -> patch-token attention over the image; right (SP projectors): answer -> SP tokens,
    with the mean per-patch-token attention as a reference line."""
    from matplotlib.figure import Figure

    has_sp = maps.num_sp_tokens > 0
    height = max(panel, 0.16 * maps.num_sp_tokens + 0.8) + 0.4
    fig = Figure(figsize=(panel * (2.2 if has_sp else 1.1), height), dpi=90, layout="constrained")
    axes = fig.subplots(1, 2 if has_sp else 1, squeeze=False, width_ratios=[1, 1.2] if has_sp else [1])[0]
    patch_share = float(maps.llm_patches.sum())
    _image_axis(
        axes[0],
        overlay(maps.image, maps.llm_patch_map),
        f"answer -> {maps.llm_patches.size} patch tokens\n({100 * patch_share:.1f}% of the attention)",
    )
    if has_sp:
        ax = axes[1]
        labels = [w.label for w in maps.windows]
        y = np.arange(maps.num_sp_tokens)
        ax.barh(y, maps.llm_sp * 100, color="tab:orange")
        ax.axvline(
            100 * maps.llm_patches.mean(), color="tab:blue", linestyle="--", linewidth=1, label="mean per patch token"
        )
        ax.set_yticks(y, labels, fontsize=7 if maps.num_sp_tokens <= 12 else 5)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("% of the answer's attention", fontsize=7)
        ax.set_title(f"answer -> SP tokens ({100 * float(maps.llm_sp.sum()):.1f}% in all)", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    title = (
        f"LLM attention, mean over layers, heads and {maps.answer_rows} answer rows "
        f"(visual tokens: {100 * maps.llm_visual_share:.1f}%)"
    )
    if maps.attention_on_target is not None:
        title += "\n" + target_caption(maps)
    fig.suptitle(title, fontsize=8)
    return fig


def target_caption(maps: AttentionMaps) -> str:
    """'answer attention on the asked cell (top left): 4.2x uniform (layer 1, first answer token)'; layers count
    from 0, as in the ``val/attention_on_target_layer<i>`` keys."""
    value, layer = maps.attention_on_target
    row, col = maps.asked_cell
    return (
        f"answer attention on the asked cell ({POSITIONS[row][col]}): {value:.1f}x uniform "
        f"(layer {layer}, first answer token)"
    )


def figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib figure to an (H, W, 3) uint8 array (Agg canvas; works under any backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_sp_attention(maps: AttentionMaps) -> Optional[np.ndarray]:
    fig = sp_attention_figure(maps)
    return None if fig is None else figure_to_array(fig)


def render_llm(maps: AttentionMaps) -> np.ndarray:
    return figure_to_array(llm_figure(maps))


def qa_markdown(maps: AttentionMaps) -> str:
    """Question, target and prediction as markdown (TensorBoard text, notebooks)."""
    lines = [f"**sample** `{maps.sample_id}`" + (f" ({maps.qtype})" if maps.qtype else "")]
    lines.append(f"**question:** {maps.question}")
    if maps.target is not None:
        ok = normalize_answer(maps.prediction) == normalize_answer(maps.target)
        lines.append(f"**target:** {maps.target}")
        lines.append(f"**predicted:** {maps.prediction} ({'correct' if ok else 'wrong'})")
    else:
        lines.append(f"**predicted:** {maps.prediction}")
    if maps.attention_on_target is not None:
        lines.append(f"**{target_caption(maps)}**")
    return "  \n".join(lines)


def save_pngs(maps: AttentionMaps, out_dir: Path | str, prefix: str = "attention") -> list[Path]:
    """Write ``<prefix>_<kind>.png`` (the SP-token attention, kind ``dfi``/``extractor``, if any) and
    ``<prefix>_llm.png``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in ((maps.sp_attention_kind, sp_attention_figure(maps)), ("llm", llm_figure(maps))):
        if fig is not None:
            path = out_dir / f"{prefix}_{name}.png"
            fig.savefig(path, dpi=fig.dpi)
            paths.append(path)
    return paths
