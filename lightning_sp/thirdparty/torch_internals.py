"""torch internals: a shared-memory buffer allocated the way ``default_collate`` allocates one in a DataLoader
worker, the tensor a view was taken from, and an assertion checked on the device without a host sync."""

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


def view_base(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``tensor`` is a view of (the root one, for a view of a view), or None where it is no view. The
    collator uses it to hand over the shared buffer whose slots a batch's images already are, without a copy."""
    return tensor._base


def assert_async(condition: torch.Tensor, message: str) -> None:
    """Raise on a false ``condition`` without a host sync on GPU (there it surfaces as a device-side assert); on
    CPU it raises a RuntimeError at once."""
    torch._assert_async(condition, message)
