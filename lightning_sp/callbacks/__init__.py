"""Lightning callbacks, one file each: attention-map logging (attention.py), attention metrics over the validation
split (attention_metrics.py), best-and-last checkpoints (checkpointing.py), non-finite gradient guard
(nonfinite.py), skipped-record limit (skip_limit.py), throughput in real tokens (throughput.py)."""

from lightning_sp.callbacks.attention import AttentionMapLogger
from lightning_sp.callbacks.attention_metrics import AttentionMetrics
from lightning_sp.callbacks.checkpointing import BestAndLastCheckpoint
from lightning_sp.callbacks.nonfinite import NonFiniteGradientError, NonFiniteGuard
from lightning_sp.callbacks.skip_limit import SkipLimit, SkippedRecordsError
from lightning_sp.callbacks.throughput import throughput_monitor

__all__ = [
    "AttentionMapLogger",
    "AttentionMetrics",
    "BestAndLastCheckpoint",
    "NonFiniteGradientError",
    "NonFiniteGuard",
    "SkipLimit",
    "SkippedRecordsError",
    "throughput_monitor",
]
