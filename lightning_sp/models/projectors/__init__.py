"""Projector registry, keyed by exact name: an unknown name is an error that lists the valid ones."""

from __future__ import annotations

from typing import Callable

from lightning_sp.models.projectors.base import Projector, ProjectorConfigError, TokenLayout

PROJECTORS: dict[str, type[Projector]] = {}


def register(name: str) -> Callable[[type[Projector]], type[Projector]]:
    def add(cls: type[Projector]) -> type[Projector]:
        if name in PROJECTORS:
            raise ValueError(f"projector '{name}' registered twice ({PROJECTORS[name]} and {cls})")
        PROJECTORS[name] = cls
        cls.registry_name = name
        return cls

    return add


def build_projector(cfg, vision_width: int, llm_width: int, grid: int) -> Projector:
    """Build the projector named `cfg.name`; widths come from the encoder and the LLM, never constants."""
    if cfg.name not in PROJECTORS:
        raise KeyError(f"unknown projector '{cfg.name}'; valid: {', '.join(sorted(PROJECTORS))}")
    cls = PROJECTORS[cfg.name]
    cls.check_config(cfg, grid)
    return cls(cfg, vision_width=vision_width, llm_width=llm_width, grid=grid)


# Importing the modules registers them.
from lightning_sp.models.projectors import mlp, spatial  # noqa: E402,F401
from lightning_sp.models.projectors import baselines  # noqa: E402,F401  (ablation arms; after spatial)
from lightning_sp.models.projectors import official_arms  # noqa: E402,F401  (the official code's own arms)

__all__ = ["PROJECTORS", "Projector", "ProjectorConfigError", "TokenLayout", "build_projector", "register"]
