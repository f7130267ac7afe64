"""Weight dtypes by name: the one list of the names a config or a command accepts."""

from __future__ import annotations

import torch

from lightning_sp.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name``; anything else is a ConfigError naming ``key`` and the valid names."""
    if name not in DTYPES:
        raise ConfigError(f"{key} must be {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
