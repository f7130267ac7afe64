"""Where the answer looks, as numbers: pure functions of attention tensors, shared by the pictures and the
validation metrics (callbacks/attention_metrics.py) so that both report the same quantity, and the one extra
forward that gives the last prompt token's attention for a batch of left-padded prompts."""

from __future__ import annotations

import math
import re
from typing import Optional

import torch

from lightning_sp.data.synthetic import POSITIONS
from lightning_sp.thirdparty.transformers_internals import eager_attention

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


def attention_weights(out) -> tuple[torch.Tensor, ...]:
    """The per-layer attention weights of an LLM output run with ``output_attentions`` at eager attention; an
    error, not a silent empty result, when the attention kernel returned none."""
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the LLM returned no attention weights although it ran with eager attention")
    return out.attentions


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
    return attention_weights(out), sp_attention


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
    return tuple(a[:, :, -1] for a in attention_weights(out))


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
