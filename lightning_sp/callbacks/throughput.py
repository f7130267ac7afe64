"""Training throughput the way Lightning measures it (`ThroughputMonitor`), in samples and *real* tokens.

Logged as `train/device/samples_per_sec` and `train/device/items_per_sec` (tokens that are not padding), plus
the all-device `train/samples_per_sec` and `train/items_per_sec` when there are several devices, over a sliding
window of the last `trainer.log_every_n_steps` batches; the fit's average goes to metrics.json (`fit_samples_per_sec`,
`fit_tokens_per_sec`, train.run_summary).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_samples(batch) -> int:
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch) -> int:
    """Tokens the model attends to: padding excluded (image tokens are expanded inside the model, not counted)."""
    return int(batch["attention_mask"].sum())


def throughput_monitor(log_every_n_steps: int) -> ThroughputMonitor:
    """Rates over the last `log_every_n_steps` batches (at least 2: a rate needs two timestamps), logged as often."""
    return ThroughputMonitor(batch_size_fn=batch_samples, length_fn=batch_tokens, window_size=max(2, log_every_n_steps))
