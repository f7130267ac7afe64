"""Projector registry, keyed by exact name: an unknown name is an error that lists the valid ones."""

from __future__ import annotations

from lightning_sp.models.projectors.base import Projector, ProjectorConfigError, TokenLayout
from lightning_sp.registry import Registry

PROJECTORS: Registry[type[Projector]] = Registry("projector", "projector.name", Projector)
register = PROJECTORS.register


def build_projector(cfg, vision_width: int, llm_width: int, grid: int) -> Projector:
    """Build the projector named `cfg.name`; widths come from the encoder and the LLM, never constants."""
    cls = PROJECTORS.lookup(cfg.name)
    cls.check_config(cfg, grid)
    return cls(cfg, vision_width=vision_width, llm_width=llm_width, grid=grid)


# Importing the modules registers them.
from lightning_sp.models.projectors import mlp, spatial  # noqa: E402,F401
from lightning_sp.models.projectors import baselines  # noqa: E402,F401  (ablation arms; after spatial)
from lightning_sp.models.projectors import official_arms  # noqa: E402,F401  (the official code's own arms)

__all__ = ["PROJECTORS", "Projector", "ProjectorConfigError", "TokenLayout", "build_projector", "register"]
