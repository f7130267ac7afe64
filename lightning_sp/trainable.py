"""Which parameters train in a stage, and the table of trainable/frozen counts printed at start."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn

log = logging.getLogger(__name__)


def set_trainable(model: nn.Module, stage_cfg) -> None:
    """Vision frozen; the whole projector (SFE, DFI, W_s, W_p) trains in every stage; the LLM trains through its
    LoRA adapters (and peft `modules_to_save`), which exist only when `stage.lora` is set, or in full
    (`stage.full_llm`), its weights then kept in float32 as the optimizer's master copy (bf16 compute comes from
    the trainer's precision, as for every trained weight)."""
    model.vision.requires_grad_(False)
    model.projector.requires_grad_(True)
    if stage_cfg.full_llm:
        model.llm.requires_grad_(True)
        if any(p.dtype != torch.float32 for p in model.llm.parameters()):
            log.info(
                "stage.full_llm: the LLM's weights are trained in float32 (loaded as %s)",
                next(model.llm.parameters()).dtype,
            )
            model.llm.float()
        return
    if not stage_cfg.lora:
        model.llm.requires_grad_(False)
    trainable_llm = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    if stage_cfg.lora and not trainable_llm:
        raise RuntimeError("stage.lora is set but the LLM has no trainable LoRA parameters")


def llm_part(name: str) -> str:
    """What an LLM parameter is, by peft's naming: `LoRA` (an adapter's A/B), `modules_to_save` (peft's trained
    copy of a module) or `base` (the model's own weight)."""
    if "lora_" in name:
        return "LoRA"
    if "modules_to_save" in name:
        return "modules_to_save"
    return "base"


def _component(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "projector":
        return "projector." + parts[1]
    if parts[0] == "llm":
        part = llm_part(name)
        return "llm" if part == "base" else f"llm ({part})"
    return parts[0]


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """component -> (trainable, frozen) parameter counts."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, p in model.named_parameters():
        counts[_component(name)][0 if p.requires_grad else 1] += p.numel()
    return {k: (v[0], v[1]) for k, v in counts.items()}


def parameter_table(model: nn.Module) -> str:
    counts = parameter_counts(model)
    rows = [(k, *counts[k]) for k in sorted(counts)]
    total_t, total_f = sum(r[1] for r in rows), sum(r[2] for r in rows)
    rows.append(("total", total_t, total_f))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}}  {'trainable':>13}  {'frozen':>13}"]
    lines += [f"{n:<{width}}  {t:>13,}  {f:>13,}" for n, t, f in rows]
    return "\n".join(lines)
