"""Lightning callbacks, one file each: attention-map logging (attention.py), attention metrics over the validation
split (attention_metrics.py), non-finite gradient guard (nonfinite.py), skipped-record limit (skip_limit.py)."""

from lightning_sp.callbacks.attention import AttentionMapLogger
from lightning_sp.callbacks.attention_metrics import AttentionMetrics
from lightning_sp.callbacks.nonfinite import NonFiniteGradientError, NonFiniteGuard
from lightning_sp.callbacks.skip_limit import SkipLimit, SkippedRecordsError

__all__ = ["AttentionMapLogger", "AttentionMetrics", "NonFiniteGradientError", "NonFiniteGuard", "SkipLimit",
           "SkippedRecordsError"]
