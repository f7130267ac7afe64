"""Which process this is and what the others hold: the two rank helpers every layer may use (the data pipeline,
callbacks, training), apart from the FSDP machinery in lightning_sp/distributed.py."""

from __future__ import annotations

import os
from typing import Any

import torch


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (a collective: every rank must call it); `[obj]` outside
    torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 before any launch). A node started with NODE_RANK
    alone (one process per node, Lightning's own environment) is rank NODE_RANK x local world size + LOCAL_RANK."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    local = int(os.environ.get("LOCAL_RANK") or 0)
    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return node * int(os.environ.get("LOCAL_WORLD_SIZE") or 1) + local
