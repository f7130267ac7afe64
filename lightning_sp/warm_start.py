"""`init=<checkpoint>`: warm-start a run's trainable tensors from another run's checkpoint (not a resume).

The typical use is stage 2 from stage 1: an align checkpoint holds the projector (SFE, DFI, W_s, W_p) but no
LoRA; the finetune run takes its projector and starts its LoRA adapters fresh. Only weights move: the optimizer,
the LR schedule and the step counter start from zero (continuing a run is `resume`, which restores those too).

Rules, all checked before any tensor is copied:
- the projector is required: every projector parameter of this run must be in the checkpoint with the same
  shape, and the checkpoint may hold no projector tensor this run lacks (another variant, other widths);
- any other trainable tensor (LoRA, peft `modules_to_save`) is loaded when present and must then match in
  shape; absent ones stay freshly initialised;
- checkpoint tensors with no trainable counterpart here (say LoRA into an align run) are ignored, and logged.
Every violation is listed in one `WarmStartError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch

from lightning_sp.checkpoint import CONFIG_KEY, PathLike, read_checkpoint, resolve_checkpoint
from lightning_sp.models.official import compact_keys

log = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.projector."
# Config fields whose difference makes the checkpoint's projector see other features than it was trained on.
_FEATURE_FIELDS = (
    "model.vision.backbone",
    "model.vision.arch",
    "model.vision.name_or_path",
    "model.vision.select_layer",
    "model.vision.image_size",
    "model.vision.patch_size",
    "model.llm.name_or_path",
)
_RANDOM_INIT_FIELDS = {
    "model.vision.name_or_path": ("model.vision.init_seed", "model.vision.position_init"),
    "model.llm.name_or_path": ("model.llm.init_seed", "model.llm.rope_theta", "model.llm.initializer_range"),
}


class WarmStartError(ValueError):
    """The checkpoint cannot initialise this run; the message lists every offending key."""


@dataclass
class WarmStartReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # trainable tensors copied from the checkpoint
    fresh: list[str] = field(default_factory=list)  # trainable tensors the checkpoint lacks (kept as initialised)
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors with no trainable counterpart here
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def part(label: str, keys: list[str]) -> str:
            return f"  {label} ({len(keys)}): {compact_keys(keys) if keys else '-'}"

        lines = [
            f"init: warm start from {self.source}",
            part("loaded", self.loaded),
            part("fresh", self.fresh),
            part("ignored", self.ignored),
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _get(container: Mapping, dotted: str):
    node = container
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _config_warnings(ckpt: Mapping, cfg) -> list[str]:
    """Differences in what the projector sees (encoder, layer, grid, LLM) between the checkpoint and this run."""
    if cfg is None or CONFIG_KEY not in ckpt:
        return []
    from omegaconf import OmegaConf

    ours, theirs = OmegaConf.to_container(cfg, resolve=True), ckpt[CONFIG_KEY]
    fields = list(_FEATURE_FIELDS)
    for key, seeds in _RANDOM_INIT_FIELDS.items():
        if _get(ours, key) is None:  # random-init encoders/LLMs are rebuilt from their seeds
            fields += seeds
    return [
        f"{f}: checkpoint {_get(theirs, f)!r}, this run {_get(ours, f)!r}"
        for f in fields
        if _get(ours, f) != _get(theirs, f)
    ]


def warm_start(module: torch.nn.Module, source: PathLike, cfg=None) -> WarmStartReport:
    """Copy the checkpoint's trainable tensors into `module` (a `LlavaSPModule`) under the rules above.

    `source`: a `.ckpt` file or a run directory (its `checkpoints/last.ckpt`). `cfg`: this run's config, used
    only to warn when the checkpoint was trained on other vision features or another LLM.
    """
    path = resolve_checkpoint(source)
    ckpt = read_checkpoint(path)
    state: Mapping[str, torch.Tensor] = ckpt["state_dict"]
    params = dict(module.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}

    ours_proj = {n for n in trainable if n.startswith(PROJECTOR_PREFIX)}
    theirs_proj = {n for n in state if n.startswith(PROJECTOR_PREFIX)}
    problems = []
    missing = sorted(ours_proj - theirs_proj)
    if missing:
        problems.append(f"projector tensors missing from the checkpoint ({len(missing)}): {compact_keys(missing)}")
    extra = sorted(theirs_proj - ours_proj)
    if extra:
        problems.append(f"projector tensors this run does not have ({len(extra)}): {compact_keys(extra)}")
    shared = sorted(trainable & set(state))
    mismatched = [n for n in shared if tuple(state[n].shape) != tuple(params[n].shape)]
    if mismatched:
        problems.append(
            "shapes differ:\n"
            + "\n".join(
                f"    {n}: checkpoint {list(state[n].shape)}, this run {list(params[n].shape)}" for n in mismatched
            )
        )
    if problems:
        theirs_cfg = ckpt.get(CONFIG_KEY) or {}
        hint = ""
        if theirs_cfg:
            hint = (
                f"\n  (the checkpoint is projector '{_get(theirs_cfg, 'projector.name')}' with sp_width "
                f"{_get(theirs_cfg, 'projector.sp_width')}; this run's config must build the same projector)"
            )
        raise WarmStartError(f"init={source}: cannot warm-start from {path}:\n  " + "\n  ".join(problems) + hint)

    with torch.no_grad():
        for n in shared:
            params[n].copy_(state[n].to(device=params[n].device, dtype=params[n].dtype))
    report = WarmStartReport(
        source=str(path),
        loaded=shared,
        fresh=sorted(trainable - set(state)),
        ignored=sorted(set(state) - trainable),
        warnings=_config_warnings(ckpt, cfg),
    )
    log.info(report.summary())
    for w in report.warnings:
        log.warning("init: the checkpoint was trained with other inputs to the projector: %s", w)
    return report
