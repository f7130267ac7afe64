"""torch internals: a shared-memory buffer allocated the way ``default_collate`` allocates one in a DataLoader
worker, and an assertion checked on the device without a host sync."""

from __future__ import annotations

import torch


def shared_empty(*shape: int) -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory: a DataLoader worker hands it to the main process without
    the copy that pickling a private tensor makes (``torch.utils.data._utils.collate`` does the same)."""
    numel = 1
    for side in shape:
        numel *= side
    elem = torch.empty(0)
    return elem.new(elem._typed_storage()._new_shared(numel)).resize_(*shape)


def assert_async(condition: torch.Tensor, message: str) -> None:
    """Raise on a false ``condition`` without a host sync on GPU (there it surfaces as a device-side assert); on
    CPU it raises a RuntimeError at once."""
    torch._assert_async(condition, message)
