"""Samples -> batches: right-padded training batches (pixel buffers reused, image tokens expanded) and eval
batches, which add the left-padded prompts that generation and teacher-forced scoring read."""

from __future__ import annotations

from collections import Counter

import torch
from torch.nn.utils.rnn import pad_sequence

from lightning_sp.constants import IGNORE_INDEX, supervised_logit_positions
from lightning_sp.thirdparty.torch_internals import view_base


def collate_train(samples: list[dict], pad_token_id: int, *, image_token_id: int, num_visual_tokens: int) -> dict:
    """Right-padded teacher-forcing batch. Every sample must hold exactly ``num_visual_tokens`` image ids
    (image records) or none (text-only): anything else means the model would splice features in the wrong place.
    """
    ids = [s["input_ids"] for s in samples]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_token_id)
    labels = pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
    if pad_token_id != image_token_id:
        # Counted on the padded matrices, two ops per batch rather than per sample: pads are neither image ids
        # nor supervised labels, so each row's counts are its sample's.
        counts = (input_ids == image_token_id).sum(1).tolist()
        supervised = (labels != IGNORE_INDEX).any(1).tolist()
    else:
        counts = [int((s["input_ids"] == image_token_id).sum()) for s in samples]
        supervised = [bool((s["labels"] != IGNORE_INDEX).any()) for s in samples]
    reasons: Counter = Counter()
    for s, count, has_label in zip(samples, counts, supervised):
        expected = num_visual_tokens if s["has_image"] else 0
        if count != expected:
            raise ValueError(
                f"sample {s['id']!r} has {count} image tokens, expected {expected} "
                f"(has_image={s['has_image']}, num_visual_tokens={num_visual_tokens})"
            )
        if not has_label:  # encode() refuses these; a silent zero loss otherwise
            raise ValueError(f"sample {s['id']!r} has no supervised token (every label is {IGNORE_INDEX})")
        reasons.update(s.get("skipped_reasons", {}))
    # = pad_sequence of ones_like(ids) (samples are 1-D): 1 up to each length, then 0, in the ids' dtype
    lengths = torch.tensor([len(i) for i in ids])
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).to(input_ids.dtype)
    pixels = [s["pixel_values"] for s in samples]
    pixel_values = _filled_buffer(pixels)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "logit_positions": supervised_logit_positions(labels),  # here, on the host: no sync in the model
        "pixel_values": torch.stack(pixels) if pixel_values is None else pixel_values,
        "has_image": torch.tensor([s["has_image"] for s in samples], dtype=torch.bool),
        "ids": [s["id"] for s in samples],
        "skipped": sum(s.get("skipped", 0) for s in samples),
        "skipped_reasons": dict(reasons),
    }


def _filled_buffer(pixels: list[torch.Tensor]) -> torch.Tensor | None:
    """The buffer whose slots ``pixels`` are, in order and exactly (SampleBuilder writes them so), else None. That
    buffer holds what ``torch.stack(pixels)`` would return, so the batch needs no copy."""
    base = view_base(pixels[0]) if pixels else None
    if base is None or not base.is_contiguous() or tuple(base.shape) != (len(pixels), *pixels[0].shape):
        return None
    step = base.stride(0) * base.element_size()
    if all(
        view_base(p) is base
        and p.is_contiguous()
        and p.dtype == base.dtype
        and p.device == base.device
        and p.data_ptr() == base.data_ptr() + i * step
        for i, p in enumerate(pixels)
    ):
        return base
    return None


def left_padded_prompts(prompts: list[torch.Tensor], pad_token_id: int) -> dict:
    """``prompt_ids`` and ``prompt_attention_mask`` of a batch of 1-D prompts, LEFT-padded for batched generation:
    with right padding, the first generated token of a short prompt would follow pad tokens instead of the prompt's
    end (``ASSISTANT:``). The one place prompts are batched (validation and ``evaluate``)."""
    return {
        "prompt_ids": pad_sequence(prompts, batch_first=True, padding_value=pad_token_id, padding_side="left"),
        "prompt_attention_mask": pad_sequence(
            [torch.ones_like(p) for p in prompts], batch_first=True, padding_value=0, padding_side="left"
        ),
    }


def collate_eval(samples: list[dict], pad_token_id: int, *, image_token_id: int, num_visual_tokens: int) -> dict:
    """Training fields (for val loss) plus left-padded prompts (:func:`left_padded_prompts`)."""
    batch = collate_train(samples, pad_token_id, image_token_id=image_token_id, num_visual_tokens=num_visual_tokens)
    batch.update(left_padded_prompts([s["prompt_ids"] for s in samples], pad_token_id))
    batch["answers"] = [s["answer"] for s in samples]
    batch["qtypes"] = [s["qtype"] for s in samples]
    return batch
