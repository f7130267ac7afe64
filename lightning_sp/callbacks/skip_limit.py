"""Stop a run when too many training records are being skipped, with a summary of why.

The data pipeline skips bad records one at a time (`data.samples.SampleBuilder`: a warning names each record, its
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

from lightning_sp.ranks import gather_objects

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
        self.skipped = self.seen = 0  # over all ranks, since the run started (kept across resumes)
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

    # Saved in checkpoints, so that a resumed run keeps counting from where it stopped.
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "seen": self.seen, "reasons": dict(self.reasons)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.seen = int(state_dict["skipped"]), int(state_dict["seen"])
        self.reasons = Counter(state_dict["reasons"])

    def on_train_end(self, trainer, pl_module) -> None:
        if self.skipped and trainer.is_global_zero:
            log.info(
                "skipped %d of %d training records read (%.2f%%, all ranks; limit %s); on rank 0 by reason: %s",
                self.skipped,
                self.seen,
                100 * self.skipped / self.seen,
                self.max_fraction,
                dict(self.reasons),
            )

    def all_reasons(self) -> Counter:
        """Skip counts per reason over all ranks (a collective: every rank must call it)."""
        return sum((Counter(r) for r in gather_objects(dict(self.reasons))), Counter())

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
