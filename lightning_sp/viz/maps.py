"""Computing the attention maps: run the model on a few samples and return :class:`AttentionMaps` (plain numpy
arrays; see the package docstring for each field). No drawing here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lightning_sp.data.conversation import get_template
from lightning_sp.viz.geometry import SPWindow, denormalize, dfi_footprint, sp_windows, upsample_to_image
from lightning_sp.viz.measures import attention_on_cell, eager_forward, max_over_uniform, named_cell, normalised_entropy


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
        prompt_ids = prompt_ids.cpu().long()
        if answer_ids is None:
            # The decoding evaluation runs (LlavaSP.generate_batch, as LlavaSPModule.generate_tokens), so the maps
            # show the answer the model gives there. It needs no attentions: those come from the teacher-forced
            # eager pass over the answer below, which decoding with output_attentions could not replace (SDPA and
            # flash attention return no weights, and the DFI attention is not part of generate's output).
            batch = {
                "prompt_ids": prompt_ids.unsqueeze(0),
                "prompt_attention_mask": torch.ones(1, prompt_ids.numel(), dtype=torch.long),
                "pixel_values": pixel_values.unsqueeze(0),
            }
            new = model.generate_batch(batch, tokenizer, max_new_tokens, synced_gpus=synced_gpus)
            # Kept as ids up to the first EOS (not as text, as evaluation keeps it): the attention pass scores them.
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

    return get_template(template).question_markers
