"""Lightning callbacks, one file each: attention-map logging (attention.py)."""

from lightning_sp.callbacks.attention import AttentionMapLogger

__all__ = ["AttentionMapLogger"]
