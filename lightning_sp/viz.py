"""Model internals as pictures: DFI cross-attention, LLM attention over the visual tokens, question and answers.

Two steps, kept apart so that tests and notebooks can check the numbers without drawing anything:

1. :func:`compute_maps` (or :func:`compute_sample_maps` for one image + prompt) runs the model on a few samples
   and returns :class:`AttentionMaps` -- plain numpy arrays:

   * ``sp_attention``: the attention of each of the S spatial (SP) tokens, from ``projector.last_attention``.
     ``sp_attention_kind == "dfi"``: the Detail Feature Integrator's weights over its n x n K/V tokens, (S, n, n).
     ``sp_attention_map`` (S, H, W) spreads each K/V token's weight evenly over its receptive field (the k x k
     patches its stride-2 convolution reads), so every map still sums to 1 and lies where the K/V token looked
     -- a bilinear resize of the 5 x 5 grid would put token (0, 0), which reads the top-left 16 x 16 patches, at
     the image corner. The receptive fields overlap (16 x 16 windows at stride 2 on 24 x 24 all read the
     centre), so even uniform attention piles up in the middle; the overlay therefore shows
     ``sp_attention_shown`` = map / (the map uniform attention would give): 1 is "as uniform", above 1 is where
     this SP token looks more than average. ``"extractor"`` (SP arms whose extractor attends and that have no
     DFI: ``cropping_transformer``, ``learned_queries``): weights over the patch grid, (S, gh, gw), shown as is.
     ``None`` for projectors without attention (``mlp``, ``conv49``, SFE arms without DFI).
   * ``llm_sp`` (S,) and ``llm_patches`` (gh, gw): the LLM's attention from the answer to the visual tokens,
     averaged over layers, heads and the rows that produced the answer tokens (the row of the token *before*
     each answer token). Values are fractions of that attention (the rows sum to 1 over the whole sequence).
     The LLM must run with eager attention to return weights; :func:`eager_attention` (lightning_sp/thirdparty/
     transformers_internals.py) switches the
     implementation for that one pass on one sample and restores it, so training keeps SDPA/flash.
   * ``windows``: what each SP token summarises, in pixels: a crop box (cropping) or the cells of the pooling
     grid (pooling), from ``projector.sp_boxes()`` / the SFE sides, scaled from the patch grid to the image.
   * ``asked_cell`` and ``llm_first_row``: the cell a synthetic question names ("... in the top left cell?")
     and, per layer, the attention over the visual tokens of the row that predicts the first answer token (the
     last prompt token). ``attention_on_target`` turns them into the number the validation logs
     (``val/attention_on_target``, lightning_sp/callbacks/attention_metrics.py): the share of that row's patch
     attention on the asked cell relative to uniform, in its best layer; ``sp_attention_spread`` how far the SP
     tokens' own attention is from uniform.

Where the answer looks, as numbers: :func:`named_cell`, :func:`cell_patches`, :func:`attention_on_cell`,
:func:`sp_share_over_uniform`, :func:`max_over_uniform`, :func:`normalised_entropy` are pure functions of
tensors, shared by the pictures and the validation metrics so both report the same quantity;
:func:`prompt_attention` gives that last-prompt-token row for a batch of left-padded prompts at the cost of
about one ordinary forward (:func:`last_position_attention`).

2. :func:`sp_attention_figure`, :func:`llm_figure` return matplotlib figures; :func:`render_sp_attention`,
   :func:`render_llm` the same as (H, W, 3) uint8 arrays (TensorBoard); :func:`qa_markdown` the question, the
   target and the prediction; :func:`save_pngs` writes the figures.

Nothing here hard-codes 576 patches, a 24 x 24 grid or six SP tokens: all come from ``projector.layout``.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot): no global state, any backend, thread-safe.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lightning_sp.data.images import CLIP_MEAN, CLIP_STD
from lightning_sp.data.synthetic import POSITIONS
from lightning_sp.thirdparty.transformers_internals import attn_implementation, eager_attention  # noqa: F401 (viz API)

Box = tuple[float, float, float, float]  # pixels: (x0, y0, x1, y1)
GridBox = tuple[int, int, int, int]  # patch grid: (row0, col0, row1, col1), end exclusive


# ---- geometry -----------------------------------------------------------------------------------------------


def denormalize(pixel_values: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """A normalised (3, H, W) image (or a (B, 3, H, W) batch) -> (H, W, 3) (or (B, H, W, 3)) uint8."""
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
    sides, mode = getattr(sfe, "sides", None), getattr(sfe, "mode", None)
    windows = []
    for k in range(layout.num_sp_tokens):
        box = grid_boxes[k] if k < len(grid_boxes) else None
        side = sides[k] if sides is not None and k < len(sides) else None
        if box is None:
            label, cells = ("query" if sfe is not None else "SP") + f" {k}", []
        elif mode == "pooling" and side is not None:
            r0, c0, r1, c1 = box
            if side == r1 - r0:  # the global token: the convolution alone, no pooling; its cells are the patches
                label, cells = f"global {side}x{side}", [box]
            else:
                label = f"pool {side}x{side}"
                cells = [(r0 + a, c0 + b, r0 + c, c0 + d) for a, b, c, d in pooling_cells(side, r1 - r0)]
        elif mode == "cropping" and side is not None:
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


# ---- where the answer looks, as numbers ---------------------------------------------------------------------

CELLS = len(POSITIONS)  # synthetic scenes: a CELLS x CELLS grid of cells (lightning_sp/data/synthetic.py)
# The whole phrase "the <name> cell": "top" is a cell name and also the start of "top left", and "left" ends it.
_CELL_PHRASE = re.compile(
    r"\bthe (" + "|".join(re.escape(n) for row in POSITIONS for n in row) + r") cell\b", re.IGNORECASE
)
_CELL_OF_NAME = {name: (r, c) for r, row in enumerate(POSITIONS) for c, name in enumerate(row)}


def named_cell(question: str) -> Optional[tuple[int, int]]:
    """(row, col) of the cell a synthetic question names ("What shape is in the bottom left cell?"), or None
    when it names none ("Where is the red circle?", "How many shapes are in the top row?")."""
    match = _CELL_PHRASE.search(question)
    return _CELL_OF_NAME[match.group(1).lower()] if match else None


def cell_patches(grid: tuple[int, int], cell: tuple[int, int], cells: int = CELLS) -> torch.Tensor:
    """(gh, gw) bool: the patches of ``cell`` (row, col) when the image is cut into cells x cells equal parts.
    A patch belongs to the cell its centre lies in, so the cells partition any grid: 24 x 24 gives 8 rows a cell,
    16 x 16 gives 5, 6, 5. Integer arithmetic: patch r's centre (r + 1/2) / gh lies in cell
    floor((2r + 1) cells / 2gh); with an odd number of cells no centre lies on a border ((2r + 1) cells is odd,
    a multiple of 2gh even)."""
    (gh, gw), (row, col) = grid, cell
    rows = (2 * torch.arange(gh) + 1) * cells // (2 * gh) == row
    cols = (2 * torch.arange(gw) + 1) * cells // (2 * gw) == col
    return rows[:, None] & cols[None, :]


def attention_on_cell(
    patch_attention, grid: tuple[int, int], cell: tuple[int, int], cells: int = CELLS
) -> torch.Tensor:
    """How much of ``patch_attention`` (..., gh * gw), row-major over the patch grid, falls on ``cell``, relative
    to uniform: (mass on the cell's patches / mass on all patches) / (the cell's patches / all patches).
    1 = no preference, cells**2 (9) = everything on the cell (for grids the cells split evenly), 0 = none on it.
    Normalised over the patches only: how much goes to text or SP tokens is another question
    (:func:`sp_share_over_uniform`)."""
    att = torch.as_tensor(patch_attention).float()
    mask = cell_patches(grid, cell, cells).flatten()
    if att.shape[-1] != mask.numel():
        raise ValueError(f"attention over {att.shape[-1]} patches, grid {tuple(grid)} has {mask.numel()}")
    share = att[..., mask].sum(-1) / att.sum(-1)
    return share * mask.numel() / int(mask.sum())


def sp_share_over_uniform(visual_attention, num_sp_tokens: int) -> torch.Tensor:
    """The SP tokens' share of the attention on all visual tokens (..., T), SP tokens first as in the projector's
    layout, relative to uniform (S / T): 1 = an SP token gets what an average visual token gets."""
    att = torch.as_tensor(visual_attention).float()
    return att[..., :num_sp_tokens].sum(-1) / att.sum(-1) * att.shape[-1] / num_sp_tokens


def max_over_uniform(attention) -> torch.Tensor:
    """Peak of each attention distribution (..., K) relative to uniform: K max_k a_k. 1 = uniform, K = all on one
    token. Reads like the DFI overlay's "x uniform"; it sees the peak only (see :func:`normalised_entropy`)."""
    att = torch.as_tensor(attention).float()
    return att.amax(-1) * att.shape[-1]


def normalised_entropy(attention) -> torch.Tensor:
    """Entropy of each attention distribution (..., K) over log K: 1 = uniform, 0 = all on one token. Sees the
    whole distribution: a map with one strong peak and one with a broad raised region can share a maximum."""
    att = torch.as_tensor(attention).float()
    return -torch.special.xlogy(att, att).sum(-1) / math.log(att.shape[-1])


def eager_forward(model, ids: torch.Tensor, mask: torch.Tensor, pixel_values: torch.Tensor):
    """One forward at eager attention: (the LLM's per-layer attentions, ``projector.last_attention`` of the same
    forward). Only the last position's logits: the callers want attention, not logits."""
    model.projector.last_attention = None
    with eager_attention(model.llm):
        embeds = model.embed(ids, pixel_values)
        sp_attention = model.projector.last_attention
        out = model.llm(
            inputs_embeds=embeds, attention_mask=mask, output_attentions=True, use_cache=False, logits_to_keep=1
        )
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the LLM returned no attention weights although it ran with eager attention")
    return out.attentions, sp_attention


def last_position_attention(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pixel_values: Optional[torch.Tensor] = None,
    *,
    visual_tokens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """The attention row of the last position of LEFT-padded sequences (B, L) in every layer, (B, heads, L) each.

    Run as ``generate`` runs: all positions but the last with the model's own attention kernel, keeping the K/V
    cache, then the last position alone at eager attention. Eager weights over all L x L pairs would cost as much
    as the rest of a small model's forward; one row costs nothing. Positions count from each sequence's first real
    token, as in ``generate``, so a padded sequence gets the numbers it gets alone.

    ``visual_tokens`` (B, T, H), e.g. those the validation step's own forward computed, stand in for running the
    vision tower and projector on ``pixel_values`` again.
    """
    if visual_tokens is not None:
        # embed() splices whatever visual_tokens() returns into the text embeddings: shadowing the method on the
        # instance for this one call reuses that splice as is, instead of a copy of it here.
        model.visual_tokens = lambda _: visual_tokens
    try:
        embeds = model.embed(ids, pixel_values)
    finally:
        if visual_tokens is not None:
            del model.visual_tokens
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)
    prefix = model.llm(
        inputs_embeds=embeds[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        logits_to_keep=1,
    )
    with eager_attention(model.llm):
        out = model.llm(
            inputs_embeds=embeds[:, -1:],
            attention_mask=mask,
            position_ids=positions[:, -1:],
            past_key_values=prefix.past_key_values,
            use_cache=True,
            output_attentions=True,
            logits_to_keep=1,
        )
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the LLM returned no attention weights although it ran with eager attention")
    return tuple(a[:, :, -1] for a in out.attentions)


def left_trimmed(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LEFT-padded prompts (B, L) without the leading columns that are padding in every row (a subset of a batch
    keeps the padding of the batch's longest prompt)."""
    if prompt_mask[:, -1].min() == 0:
        raise ValueError("prompts must be left-padded (last column of the attention mask all ones)")
    first = int(prompt_mask.any(0).nonzero()[0])
    return prompt_ids[:, first:], prompt_mask[:, first:]


@torch.no_grad()
def prompt_attention(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    pixel_values: Optional[torch.Tensor] = None,
    *,
    visual_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LEFT-padded prompts (B, L) with their images (B, 3, H, W), or the images' visual tokens (B, T, H) already
    computed -> the attention of each prompt's last position -- the one whose logits give the first answer token --
    over its visual tokens, per layer and averaged over heads, (B, layers, T) in the projector's layout (SP
    tokens, then patches row-major). The prompts must hold the image placeholders expanded (T per row).
    """
    ids, mask = left_trimmed(prompt_ids, prompt_mask)
    is_image = ids == model.image_token_id
    counts = is_image.sum(1)
    if (counts != model.num_visual_tokens).any():
        raise ValueError(
            f"prompts hold {counts.tolist()} image tokens, the projector emits "
            f"{model.num_visual_tokens} each (expand the <image> placeholder first)"
        )
    rows = last_position_attention(model, ids, mask, pixel_values, visual_tokens=visual_tokens)
    last = torch.stack([r.float().mean(1) for r in rows], dim=1)  # (B, layers, L)
    return last[is_image.unsqueeze(1).expand_as(last)].view(ids.shape[0], len(rows), -1)


# ---- computing the maps -------------------------------------------------------------------------------------


@dataclass
class AttentionMaps:
    """Everything one sample's pictures show, as numpy arrays (see the module docstring)."""

    image: np.ndarray  # (H, W, 3) uint8, un-normalised
    patch_grid: tuple[int, int]
    windows: list[SPWindow]
    llm_sp: np.ndarray  # (S,) attention fraction on each SP token (S may be 0)
    llm_patches: np.ndarray  # (gh, gw) attention fraction on each patch token
    llm_visual_share: float  # fraction of the answer's attention on all visual tokens
    answer_rows: int  # number of attention rows averaged (= answer tokens)
    # (layers, T) the row predicting the first answer token (the last prompt token), per layer, mean over heads:
    # what the validation metrics read (lightning_sp/callbacks/attention_metrics.py)
    llm_first_row: Optional[np.ndarray] = None
    asked_cell: Optional[tuple[int, int]] = None  # (row, col) the question names (synthetic), else None
    sp_attention_kind: Optional[str] = None  # "dfi" | "extractor" | None (no SP-token attention)
    sp_attention: Optional[np.ndarray] = None  # dfi: (S, n, n) K/V weights; extractor: (S, gh, gw)
    sp_attention_map: Optional[np.ndarray] = None  # (S, H, W) on the image, each sums to 1
    sp_attention_shown: Optional[np.ndarray] = None  # (S, H, W) what the overlay shows (dfi: map / uniform map)
    question: str = ""
    target: Optional[str] = None
    prediction: str = ""
    sample_id: str = ""
    qtype: str = ""

    @property
    def num_sp_tokens(self) -> int:
        return len(self.llm_sp)

    @property
    def attention_on_target_by_layer(self) -> Optional[np.ndarray]:
        """(layers,) per layer: the first answer row's patch attention on the asked cell relative to uniform
        (:func:`attention_on_cell`); None when the question names no cell."""
        if self.asked_cell is None or self.llm_first_row is None:
            return None
        patches = self.llm_first_row[:, self.num_sp_tokens :]
        return attention_on_cell(torch.from_numpy(patches), self.patch_grid, self.asked_cell).numpy()

    @property
    def attention_on_target(self) -> Optional[tuple[float, int]]:
        """(value, layer) of the layer where the answer looks most at the asked cell, the sample's
        ``val/attention_on_target`` (max over layers, as the validation metric); None without an asked cell."""
        per_layer = self.attention_on_target_by_layer
        if per_layer is None:
            return None
        best = int(per_layer.argmax())
        return float(per_layer[best]), best

    @property
    def sp_attention_spread(self) -> Optional[tuple[float, float]]:
        """How far the SP tokens' own attention is from uniform, mean over SP tokens: (peak / uniform,
        entropy / log K), the validation's ``val/<kind>_attention_*``; None without SP-token attention."""
        if self.sp_attention is None:
            return None
        flat = torch.from_numpy(self.sp_attention).flatten(1)
        return float(max_over_uniform(flat).mean()), float(normalised_entropy(flat).mean())

    @property
    def llm_patch_map(self) -> np.ndarray:
        """(H, W) patch attention upsampled to the image (sums to the patch tokens' share)."""
        return upsample_to_image(torch.from_numpy(self.llm_patches), self.image.shape[:2]).numpy()


def question_text(tokenizer, prompt_ids: Sequence[int], image_token_id: int, markers=("USER:", "ASSISTANT:")) -> str:
    """The last human turn of a prompt, without the image tokens, the system prompt and the turn markup.

    ``markers``: the text before and after a question in the rendered prompt (``question_markers(template)``)."""
    ids = [int(i) for i in prompt_ids if int(i) != image_token_id]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    before, after = markers
    if before and before in text:
        text = text.rsplit(before, 1)[1]
    if after and after in text:
        text = text.split(after, 1)[0]
    for special in tokenizer.all_special_tokens:  # BOS, or markup a prompt without markers keeps
        text = text.replace(special, "")
    return text.strip()


def _strip_answer(new_tokens: torch.Tensor, eos_token_id: Optional[int], pad_token_id: Optional[int]) -> list[int]:
    """Generated ids up to and including the first EOS (the decision to stop is part of the answer)."""
    out = []
    for t in new_tokens.tolist():
        if eos_token_id is not None and t == eos_token_id:
            out.append(t)
            break
        if pad_token_id is not None and t == pad_token_id and pad_token_id != eos_token_id:
            break
        out.append(t)
    return out


@torch.no_grad()
def answer_attention_by_layer(
    model, prompt_ids: torch.Tensor, pixel_values: torch.Tensor, answer_ids: Sequence[int]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One eager forward of prompt + answer; returns the attention of the rows that predict the answer tokens (the
    row of the token *before* each) over the visual tokens, averaged over heads, as (layers, rows, T) in the
    projector's layout (SP tokens, then patches row-major); and ``projector.last_attention`` of that same forward
    for this sample, (S, K), or None. Row 0 is the last prompt token, the row :func:`prompt_attention` reads.

    ``prompt_ids`` (L,) unpadded with the image placeholders expanded; ``pixel_values`` (3, H, W).
    """
    device = next(model.parameters()).device
    answer = torch.as_tensor(list(answer_ids), dtype=torch.long)
    if answer.numel() == 0:
        raise ValueError("answer_ids is empty: nothing to take the attention of")
    ids = torch.cat([prompt_ids.cpu().long(), answer]).unsqueeze(0).to(device)
    rows = torch.arange(prompt_ids.numel() - 1, ids.shape[1] - 1, device=device)  # rows that predict the answer
    image_pos = (ids[0] == model.image_token_id).nonzero().squeeze(1)
    if image_pos.numel() != model.num_visual_tokens:
        raise ValueError(
            f"prompt holds {image_pos.numel()} image tokens, the projector emits "
            f"{model.num_visual_tokens} (expand the <image> placeholder first)"
        )
    attentions, sp_attention = eager_forward(model, ids, torch.ones_like(ids), pixel_values.unsqueeze(0).to(device))
    # each (1, heads, L, L) -> (heads, rows, visual) -> mean over heads; stacked (layers, rows, T)
    att = torch.stack([a[0][:, rows][..., image_pos].float().mean(0) for a in attentions]).cpu()
    return att, (sp_attention[0].float().cpu() if sp_attention is not None else None)


def llm_answer_attention(
    model, prompt_ids: torch.Tensor, pixel_values: torch.Tensor, answer_ids: Sequence[int]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`answer_attention_by_layer` averaged over layers and answer rows: (T,), and the SP attention."""
    att, sp_attention = answer_attention_by_layer(model, prompt_ids, pixel_values, answer_ids)
    return att.mean(dim=(0, 1)), sp_attention


@torch.no_grad()
def compute_sample_maps(
    model,
    tokenizer,
    pixel_values: torch.Tensor,
    prompt_ids: torch.Tensor,
    *,
    target: Optional[str] = None,
    sample_id: str = "",
    qtype: str = "",
    max_new_tokens: int = 8,
    answer_ids: Optional[Sequence[int]] = None,
    markers=("USER:", "ASSISTANT:"),
    synced_gpus: Optional[bool] = None,
) -> AttentionMaps:
    """Maps of one sample: ``pixel_values`` (3, H, W) normalised, ``prompt_ids`` (L,) unpadded with the image
    placeholder expanded. Generates the answer greedily unless ``answer_ids`` is given (then it is scored).
    ``synced_gpus``: as in HF generate (True under multi-rank FSDP, so every rank decodes as many steps)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        prompt_ids = prompt_ids.cpu().long()
        if answer_ids is None:
            new = model.generate(
                prompt_ids.unsqueeze(0).to(device),
                torch.ones(1, prompt_ids.numel(), dtype=torch.long, device=device),
                pixel_values.unsqueeze(0).to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced_gpus,
            )
            answer_ids = _strip_answer(new[0].cpu(), tokenizer.eos_token_id, tokenizer.pad_token_id)
            if not answer_ids:
                answer_ids = [tokenizer.eos_token_id]
        by_layer, sp_attention = answer_attention_by_layer(model, prompt_ids, pixel_values, answer_ids)
    finally:
        model.train(was_training)

    projector = model.projector
    layout = projector.layout
    image = denormalize(pixel_values, *model.vision.stats)
    hw = image.shape[:2]
    s = layout.num_sp_tokens
    visual = by_layer.mean(dim=(0, 1))
    question = question_text(tokenizer, prompt_ids, model.image_token_id, markers)
    maps = AttentionMaps(
        image=image,
        patch_grid=tuple(layout.patch_grid),
        windows=sp_windows(projector, hw),
        llm_sp=visual[:s].numpy(),
        llm_patches=visual[s:].reshape(layout.patch_grid).numpy(),
        llm_visual_share=float(visual.sum()),
        answer_rows=len(answer_ids),
        llm_first_row=by_layer[:, 0].numpy(),
        asked_cell=named_cell(question),
        question=question,
        target=target,
        prediction=tokenizer.decode(list(answer_ids), skip_special_tokens=True).strip(),
        sample_id=sample_id,
        qtype=qtype,
    )
    (maps.sp_attention_kind, maps.sp_attention, maps.sp_attention_map, maps.sp_attention_shown) = sp_attention_images(
        projector, sp_attention, hw
    )
    return maps


def sp_attention_images(projector, attention: Optional[torch.Tensor], image_hw: tuple[int, int]):
    """One sample's ``last_attention`` (S, K) -> (kind, raw, map, shown) as numpy, or four Nones.

    raw: (S, n, n) DFI K/V weights or (S, gh, gw) extractor weights; map: (S, H, W), each sums to the token's
    attention mass (1); shown: what the overlay draws (DFI: map / the map of uniform attention, 1 = uniform).
    """
    kind = sp_attention_kind(projector, attention)
    grid = tuple(projector.layout.patch_grid)
    if kind == "dfi":
        side = math.isqrt(attention.shape[-1])
        kv = attention.float().cpu().reshape(attention.shape[0], side, side)
        dfi = projector.dfi
        if hasattr(dfi, "kernel"):

            def spread(a):
                return dfi_footprint(a, grid, dfi.kernel, dfi.stride)
        else:  # unknown K/V geometry: an even split of the grid

            def spread(a):
                return upsample_to_image(a, grid)

        footprint = spread(kv)
        coverage = spread(torch.full_like(kv[:1], 1.0 / kv[0].numel()))  # what uniform attention would give
        relative = footprint / coverage.clamp_min(1e-12)  # a ratio: resized, not mass-preserved
        shown = F.interpolate(relative.unsqueeze(1), size=image_hw, mode="nearest")[:, 0]
        return kind, kv.numpy(), upsample_to_image(footprint, image_hw).numpy(), shown.numpy()
    if kind == "extractor":
        grid_att = attention.float().cpu().reshape(attention.shape[0], *grid)
        mapped = upsample_to_image(grid_att, image_hw).numpy()
        return kind, grid_att.numpy(), mapped, mapped
    return None, None, None, None


def sp_attention_kind(projector, attention: Optional[torch.Tensor]) -> Optional[str]:
    """What ``projector.last_attention`` holds, as the projector declares it (``Projector.attention_kind``): "dfi"
    (over the DFI's K/V tokens), "extractor" (over the patch grid), or None (nothing); a shape that disagrees with
    the declaration is an error, not a silent blank picture."""
    kind = projector.attention_kind
    if attention is None or kind is None:
        return None
    k = attention.shape[-1]
    if (kind == "dfi" and math.isqrt(k) ** 2 != k) or (kind == "extractor" and k != projector.layout.num_patch_tokens):
        raise ValueError(
            f"projector '{getattr(projector, 'registry_name', '?')}' declares {kind} attention but last_attention "
            f"has {k} keys per SP token"
        )
    return kind


def compute_maps(
    model,
    tokenizer,
    batch: dict,
    indices: Optional[Sequence[int]] = None,
    *,
    max_new_tokens: int = 8,
    markers=("USER:", "ASSISTANT:"),
) -> list[AttentionMaps]:
    """Maps for samples of a validation batch (``pixel_values``, left-padded ``prompt_ids`` +
    ``prompt_attention_mask``, optional ``answers``/``ids``/``qtypes``); all samples unless ``indices``."""
    n = batch["pixel_values"].shape[0]
    out = []
    for i in range(n) if indices is None else indices:
        prompt = batch["prompt_ids"][i][batch["prompt_attention_mask"][i].bool()]
        out.append(
            compute_sample_maps(
                model,
                tokenizer,
                batch["pixel_values"][i],
                prompt,
                target=batch["answers"][i] if "answers" in batch else None,
                sample_id=str(batch["ids"][i]) if "ids" in batch else str(i),
                qtype=str(batch["qtypes"][i]) if "qtypes" in batch else "",
                max_new_tokens=max_new_tokens,
                markers=markers,
            )
        )
    return out


def question_markers(template: str) -> tuple[str, str]:
    """What :func:`question_text` cuts a question out by, for the conversation template ``template``."""
    from lightning_sp.data.conversation import get_template

    return get_template(template).question_markers


# ---- drawing ------------------------------------------------------------------------------------------------


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
        from lightning_sp.data.answers import normalize_answer

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
