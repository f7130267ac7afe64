"""What every projector promises (a token layout and a (B, N, C) -> (B, T, H) forward), and the registry that
names them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, Optional

import torch
from torch import nn

from lightning_sp.registry import Registry


class ProjectorConfigError(ValueError):
    """A projector cannot be built for this config or encoder grid (raised at config time)."""


@dataclass(frozen=True)
class TokenLayout:
    """Visual tokens a projector emits: `num_sp_tokens` spatial tokens first, then a patch grid (row-major)."""

    num_sp_tokens: int
    patch_grid: tuple[int, int]

    @property
    def num_patch_tokens(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_sp_tokens + self.num_patch_tokens


@dataclass(frozen=True)
class ProjectorOptions:
    """The `projector.*` keys a projector reads, one dataclass per kind of arm (subclass it and name it as the
    projector's `Options`). `build_projector` and config validation hand a projector its own options only, so a key
    it does not declare never reaches it, and a command-line override of such a key is reported as having no effect.
    `schema.ProjectorConfig` is the union of the shipped arms' options, with the same defaults
    (tests/test_projectors.py checks both); a field no shipped arm has becomes a `projector.*` key when its arm is
    registered (config.run_schema). This base declares none: the MLP's."""

    @classmethod
    def from_config(cls, cfg) -> "ProjectorOptions":
        """The declared fields of a `projector` config section (an OmegaConf node or any object with them)."""
        values = {}
        for f in fields(cls):
            value = getattr(cfg, f.name)
            values[f.name] = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
        return cls(**values)


@dataclass(frozen=True)
class SpatialOptions(ProjectorOptions):
    """LLaVA-SP arms: the SP branch's width, the DFI, the windows and W_s's bias."""

    sp_width: int = 512  # D, width of the SP branch (paper: 512)
    dfi: bool = True  # Detail Feature Integrator on the SP tokens
    dfi_kv_tokens: int = 25  # K/V tokens of the DFI: a square number (25 = 5x5 as released, 49 = 7x7)
    sides: Optional[list[int]] = None  # window sides on the paper's 24x24 grid; None: 4, 8, ..., 24
    head_bias: Optional[bool] = None  # bias of W_s; None = the released variant's choice


class Projector(nn.Module):
    """Maps CLIP patch features (B, grid*grid, C) to LLM visual tokens (B, layout.num_tokens, H).

    A subclass is built as ``cls(options, vision_width=C, llm_width=H, grid=G)`` with ``options`` an instance of
    its ``Options`` (after ``check_config(options, grid)`` passed); ``registry_name`` is set by registration."""

    Options: ClassVar[type[ProjectorOptions]] = ProjectorOptions
    registry_name: ClassVar[str]
    layout: TokenLayout

    def __init__(self) -> None:
        super().__init__()
        # (B, num_sp_tokens, K) attention of the spatial tokens from the last forward, for visualisation.
        self.last_attention: Optional[torch.Tensor] = None

    @classmethod
    def check_config(cls, cfg, grid: int) -> None:
        """Raise ProjectorConfigError if this projector cannot run with its options `cfg` (an ``Options``) on a
        `grid`×`grid` encoder."""

    def sp_boxes(self) -> list[tuple[int, int, int, int]]:
        """Patch-grid boxes (row0, col0, row1, col1) each SP token summarises, for drawing; [] if none."""
        return []

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules big enough for FSDP units of their own (sharded and all-gathered apart from the rest of the
        projector), innermost first. Default: none; the whole projector is one unit."""
        return []

    @property
    def attention_kind(self) -> Optional[str]:
        """What ``last_attention`` holds after a forward, for pictures and metrics: "dfi" (each SP token over the
        DFI's n x n K/V tokens), "extractor" (each SP token over the patch grid), or None (nothing to show)."""
        return None

    def sp_conv_parameters(self) -> list[nn.Parameter]:
        """Weights of convolutions whose kernel covers a whole window (fan-in up to grid*grid*C): the optimizer
        trains them at `optim.lr_sp_conv` (Adam moves each weight by ~lr, their outputs by ~lr * fan-in), every
        other projector parameter at `optim.lr_projector`. Declared here by the projector, never guessed from
        parameter names. Default: none."""
        return []


PROJECTORS: Registry[type[Projector]] = Registry("projector", "projector.name", Projector)
register = PROJECTORS.register
