"""Lightning callbacks, one file each: attention-map logging (attention.py), non-finite gradient guard
(nonfinite.py)."""

from lightning_sp.callbacks.attention import AttentionMapLogger
from lightning_sp.callbacks.nonfinite import NonFiniteGradientError, NonFiniteGuard

__all__ = ["AttentionMapLogger", "NonFiniteGradientError", "NonFiniteGuard"]
