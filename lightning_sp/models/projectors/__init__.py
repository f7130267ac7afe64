"""Projector registry, keyed by exact name: an unknown name is an error that lists the valid ones."""

from __future__ import annotations

# Importing the arms' modules registers them (each imports base.py and the arms it builds on, never this module).
from lightning_sp.models.projectors import mlp, spatial, baselines, official_arms  # noqa: F401 (registration order)
from lightning_sp.models.projectors.base import (
    PROJECTORS,
    Projector,
    ProjectorConfigError,
    ProjectorOptions,
    SpatialOptions,
    TokenLayout,
    register,
)


def projector_options(cfg) -> tuple[type[Projector], ProjectorOptions]:
    """The class a `projector` config section names (`cfg.name`) and its own options from that section."""
    cls = PROJECTORS.lookup(cfg.name)
    return cls, cls.Options.from_config(cfg)


def build_projector(cfg, vision_width: int, llm_width: int, grid: int) -> Projector:
    """Build the projector named `cfg.name` from its own options; widths come from the encoder and the LLM, never
    constants."""
    cls, options = projector_options(cfg)
    cls.check_config(options, grid)
    return cls(options, vision_width=vision_width, llm_width=llm_width, grid=grid)


__all__ = [
    "PROJECTORS",
    "Projector",
    "ProjectorConfigError",
    "ProjectorOptions",
    "SpatialOptions",
    "TokenLayout",
    "build_projector",
    "projector_options",
    "register",
]
