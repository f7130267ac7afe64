"""Deterministic construction of random-init models.

Frozen random weights are not stored in checkpoints (they are rebuilt from the config), so building them must
give the same tensors every time, without disturbing the caller's RNG stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
