"""`AttentionMetrics`: where the model looks, as numbers, over the validation split at every validation.

For the validation questions that name a cell of the synthetic 3 x 3 grid ("What color is the shape in the top
left cell?", "What shape is in the bottom cell?"; :func:`lightning_sp.viz.named_cell` reads the prompt), one extra
prompt-only forward of the LLM per batch (:func:`lightning_sp.viz.prompt_attention`) gives the attention of the
position whose logits predict the first answer token (the last prompt token), averaged over heads, per layer.
Logged at the end of validation:

    val/attention_on_target_layer<i>   mean over the questions of: the share of layer i's attention over the
                                       patch tokens that falls on the asked cell's patches, over the share
                                       uniform attention would put there (1 = no preference, 9 = all on the cell)
    val/attention_on_target            the max over layers of the above
    val/attention_on_sp_tokens         the SP tokens' share of the attention on the visual tokens, over uniform
                                       (S / T), mean over layers and questions (SP projectors only)
    val/<kind>_attention_max_over_uniform, val/<kind>_attention_entropy
                                       how far the SP tokens' own attention (kind `dfi`: the DFI's weights over its
                                       K/V tokens; `extractor`: over the patch grid) is from uniform, mean over
                                       every validation image and SP token: K max_k a_k (1 = uniform) and
                                       entropy / log K (1 = uniform, 0 = one token)

Why the max over layers for the headline: the answer reads a cell through whichever layer attends to it; the
others attend broadly (early layers) or elsewhere, and a mean over layers would measure how many layers there are
as much as whether the model looks. The layer is chosen once for the whole split, not per question, so at chance
the max sits barely above 1 (one of a few layer means, each over ~100 questions); the per-layer keys show which
layer it is. The SP share is a mean over layers instead: it asks how much of the visual attention the SP tokens
get overall, not whether one layer uses them.

Cost: the visual tokens and the SP-token attention are those of the validation step's own forward (a hook on the
projector keeps its first output of each batch), so the extra work is the LLM alone on the questions that name a
cell, run as ``generate`` runs its prompts (all positions but the last with the model's attention kernel, the last
one at eager attention: :func:`lightning_sp.viz.last_position_attention`), so no larger in memory than a
generation prefill. Measured on the embedded default (pooling, 300 validation questions, 120 of them name a cell,
busy 2-core CPU): 13-15 s on top of a 30 s validation, the LLM over those 120 prompts in smaller batches.
`max_questions` caps it for large validation splits.

Counts and sums are pooled over ranks (`gather_objects`) before anything is logged, so every rank logs the same
keys and values. With sharded weights (FSDP) a rank without a cell question in a batch still runs the forward
when another rank does (on a sample of its batch, discarded): each forward all-gathers, and a rank that skipped
one would hang the others.
Unlike the pictures (attention.py), a failure here is not caught: a missing number would be mistaken for a result.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Optional

import lightning as L
import torch

from lightning_sp.ranks import gather_objects
from lightning_sp.viz import measures  # module attributes: the tests count the forwards it runs
from lightning_sp.viz.maps import question_markers, question_text, sp_attention_kind
from lightning_sp.viz.measures import (
    attention_on_cell,
    max_over_uniform,
    named_cell,
    normalised_entropy,
    sp_share_over_uniform,
)

log = logging.getLogger(__name__)


def cell_questions(batch: dict, tokenizer, image_token_id: int, markers) -> list[tuple[int, tuple[int, int]]]:
    """(index in the batch, (row, col)) of the samples of an eval batch with an image whose question names a cell."""

    has_image = batch.get("has_image")
    out = []
    for i in range(batch["prompt_ids"].shape[0]):
        if has_image is not None and not bool(has_image[i]):
            continue
        prompt = batch["prompt_ids"][i][batch["prompt_attention_mask"][i].bool()]
        cell = named_cell(question_text(tokenizer, prompt.tolist(), image_token_id, markers))
        if cell is not None:
            out.append((i, cell))
    return out


def target_sums(visual: torch.Tensor, cells: list[tuple[int, int]], layout) -> Counter:
    """Sums over one batch's questions: `visual` (B, layers, T) from :func:`lightning_sp.viz.prompt_attention`,
    `cells` the asked (row, col) per question."""

    s = layout.num_sp_tokens
    sums: Counter = Counter()
    for v, cell in zip(visual, cells):
        for layer, ratio in enumerate(attention_on_cell(v[:, s:], tuple(layout.patch_grid), cell).tolist()):
            sums[f"target_layer{layer}"] += ratio
    sums["target_n"] += len(cells)
    if s:
        sums["sp"] += float(sp_share_over_uniform(visual, s).mean(1).sum())
    return sums


def spread_sums(projector, sp_attention) -> Counter:
    """Sums over images of how far the SP tokens' attention (B, S, K) is from uniform; empty without one."""

    kind = sp_attention_kind(projector, sp_attention)
    if kind is None or sp_attention.shape[0] == 0:
        return Counter()
    flat = sp_attention.float()
    return Counter(
        {
            f"{kind}_peak": float(max_over_uniform(flat).sum()),
            f"{kind}_entropy": float(normalised_entropy(flat).sum()),
            f"{kind}_n": flat.shape[0] * flat.shape[1],
        }
    )


def metrics_from_sums(sums: Counter) -> dict[str, float]:
    """The logged values (see the module docstring) from sums pooled over batches and ranks."""
    out = {}
    n = sums["target_n"]
    if n:
        per_layer = [sums[f"target_layer{i}"] / n for i in range(sum(k.startswith("target_layer") for k in sums))]
        out.update({f"val/attention_on_target_layer{i}": v for i, v in enumerate(per_layer)})
        out["val/attention_on_target"] = max(per_layer)
        if "sp" in sums:
            out["val/attention_on_sp_tokens"] = sums["sp"] / n
    for kind in ("dfi", "extractor"):
        if sums[f"{kind}_n"]:
            out[f"val/{kind}_attention_max_over_uniform"] = sums[f"{kind}_peak"] / sums[f"{kind}_n"]
            out[f"val/{kind}_attention_entropy"] = sums[f"{kind}_entropy"] / sums[f"{kind}_n"]
    return out


class AttentionMetrics(L.Callback):
    def __init__(self, max_questions: Optional[int] = None) -> None:
        """`max_questions`: measure at most this many cell questions per validation (the first ones of the split,
        the same every time; split evenly over ranks); None = all of them."""
        if max_questions is not None and max_questions < 1:
            raise ValueError(f"max_questions must be >= 1 or None, got {max_questions}")
        self.max_questions = max_questions
        self.sums: Counter = Counter()
        self.seconds = 0.0
        self._hook = None
        self._seen: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # this batch's projector output

    # ---- the validation step's visual tokens ----------------------------------------------------------------
    def _keep_first(self, projector, inputs, output) -> None:
        if self._seen is None:
            attention = projector.last_attention
            self._seen = (output.detach(), None if attention is None else attention.detach())

    def visual_tokens(self, model, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, T, H) visual tokens of the batch and its (B, S, K) SP-token attention: the validation step's when its
        first projector call was this batch, else computed here."""
        n = batch["pixel_values"].shape[0]
        if self._seen is not None and self._seen[0].shape[0] == n:
            return self._seen
        model.projector.last_attention = None
        tokens = model.visual_tokens(batch["pixel_values"])
        return tokens, model.projector.last_attention

    # ---- hooks --------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.sums.clear()
        self.seconds = 0.0
        self._hook = pl_module.model.projector.register_forward_hook(self._keep_first)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._seen = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        started = time.perf_counter()
        model = pl_module.model
        asked = cell_questions(
            batch, pl_module.tokenizer, model.image_token_id, question_markers(pl_module.cfg.stage.template)
        )
        if self.max_questions is not None:
            asked = asked[: max(0, math.ceil(self.max_questions / trainer.world_size) - int(self.sums["target_n"]))]
        forwards = torch.tensor(int(bool(asked)), device=pl_module.device)
        if pl_module.ranks_in_lockstep:
            torch.distributed.all_reduce(forwards, op=torch.distributed.ReduceOp.MAX)
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            tokens, sp_attention = self.visual_tokens(model, batch)
            self._seen = None
            if sp_attention is not None:
                has_image = batch.get("has_image")
                self.sums.update(
                    spread_sums(
                        model.projector,
                        sp_attention if has_image is None else sp_attention[has_image.to(sp_attention.device)],
                    )
                )
            if asked:
                index = torch.tensor([i for i, _ in asked], device=batch["prompt_ids"].device)
                visual = measures.prompt_attention(
                    model,
                    batch["prompt_ids"][index],
                    batch["prompt_attention_mask"][index],
                    visual_tokens=tokens[index.to(tokens.device)],
                )
                self.sums.update(target_sums(visual, [cell for _, cell in asked], model.projector.layout))
            elif forwards:  # another rank ran one: so must this one (see the module docstring, FSDP)
                ids, mask = measures.left_trimmed(batch["prompt_ids"][:1], batch["prompt_attention_mask"][:1])
                measures.last_position_attention(model, ids, mask, visual_tokens=tokens[:1])
        self.seconds += time.perf_counter() - started

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._hook.remove()
        totals: Counter = Counter()
        for sums in gather_objects(dict(self.sums)):
            totals.update(sums)
        for name, value in metrics_from_sums(totals).items():
            pl_module.log(name, torch.tensor(value, dtype=torch.float32), sync_dist=True)
        log.info("attention metrics over %d questions (this rank: %.1fs)", int(totals["target_n"]), self.seconds)
