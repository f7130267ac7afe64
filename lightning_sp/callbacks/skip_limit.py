"""Stop a run when too many training records are being skipped, with a summary of why.

The data pipeline skips bad records one at a time (`datamodule.SampleBuilder`: a warning names each record, its
shard and the reason, and every batch carries the counts). A few are expected in real data; a large share means
the data or the config is wrong (a wrong image root, records that do not fit the template, data.max_length too
short), and the run would silently train on whatever is left. `SkipLimit` sums skipped and seen records over all
ranks after every training batch, so every rank takes the same decision at the same step (none is left waiting in
a collective), and raises `SkippedRecordsError` once the skipped fraction is over the limit.
"""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch

log = logging.getLogger(__name__)


class SkippedRecordsError(RuntimeError):
    """The skipped fraction of training records exceeded `data.max_skipped_fraction`; the message has the counts."""


class SkipLimit(L.Callback):
    """Raise `SkippedRecordsError` when skipped / seen > `max_fraction`, once `min_samples` records have been seen
    over all ranks (seen = skipped + trained on). Below `min_samples` a handful of bad records early in the stream
    would decide alone."""

    def __init__(self, max_fraction: float, min_samples: int = 200) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction, self.min_samples = float(max_fraction), int(min_samples)
        self.skipped = self.seen = 0  # over all ranks, since this fit started
        self.reasons: Counter = Counter()  # this rank's

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(batch, dict) or "skipped" not in batch:
            return
        skipped = int(batch["skipped"])
        self.reasons.update(batch.get("skipped_reasons") or {})
        counts = torch.tensor([skipped, skipped + len(batch["input_ids"])], dtype=torch.long, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        batch_skipped, batch_seen = (int(c) for c in counts.tolist())
        self.skipped += batch_skipped
        self.seen += batch_seen
        fraction = self.skipped / self.seen
        pl_module.log("train/skipped_fraction", fraction, on_step=True, on_epoch=False, batch_size=1)
        if self.seen >= self.min_samples and fraction > self.max_fraction:
            raise SkippedRecordsError(self.summary(trainer, fraction))

    def all_reasons(self) -> Counter:
        """Skip counts per reason over all ranks (a collective: every rank must call it)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return Counter(self.reasons)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, dict(self.reasons))
        return sum((Counter(r) for r in gathered), Counter())

    def summary(self, trainer, fraction: float) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.all_reasons().most_common()) or "none recorded"
        train_dir = getattr(getattr(trainer, "datamodule", None), "train_dir", None)
        converter = f"; records the converter left out are listed in {train_dir}/skipped.jsonl" if train_dir else ""
        return (
            f"{fraction:.1%} of the training records seen so far were skipped ({self.skipped} of {self.seen}, all "
            f"ranks, at step {trainer.global_step}), over the limit data.max_skipped_fraction={self.max_fraction}. "
            f"Skipped by reason: {reasons}. Each skipped record is logged with its id, shard and reason "
            f"('skipping record ...' warnings of logger lightning_sp.data.datamodule in this run's output){converter}. "
            "Fix the data or the config (image root, stage.template, data.max_length), or raise "
            "data.max_skipped_fraction."
        )
