"""The global batch: samples per optimizer step = data.batch_size x devices (x nodes) x accumulate_grad_batches.
`trainer.global_batch_size` states the recipe's number (LLaVA's 128 / 256); accumulation is derived from it where
the device count is known, and a config or a launch that cannot reach it is refused with the numbers and a fix."""

from __future__ import annotations

import logging
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from lightning_sp.errors import ConfigError

log = logging.getLogger(__name__)


def device_count(cfg: DictConfig) -> Optional[int]:
    """Devices per node as the config states them (None while `trainer.devices` is -1/"auto", which only the
    launcher resolves)."""
    devices = cfg.trainer.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    n = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else devices
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    return n


def total_devices(cfg: DictConfig) -> Optional[int]:
    """Devices over all nodes: `trainer.devices` x `trainer.num_nodes` (None while devices is -1/"auto")."""
    n = device_count(cfg)
    return None if n is None else n * cfg.trainer.num_nodes


def global_batch_size(cfg: DictConfig) -> Optional[int]:
    """Samples per optimizer step: per-device batch x devices x accumulation (None while `trainer.devices`
    is -1/"auto", which only the launcher resolves; train.py logs the resolved value)."""
    n = total_devices(cfg)
    if n is None:
        return None
    return cfg.data.batch_size * n * cfg.trainer.accumulate_grad_batches


def derive_accumulation(cfg: DictConfig, explicit: bool) -> None:
    """`trainer.global_batch_size` set, `trainer.accumulate_grad_batches` left at 1 (not on the command line) and
    the device count known: accumulation = global / (per-device batch x devices), when that divides evenly
    (otherwise `validate` refuses the config with the numbers)."""
    t = cfg.trainer
    n = total_devices(cfg)
    if t.global_batch_size is None or explicit or t.accumulate_grad_batches != 1 or n is None:
        return
    per_step = cfg.data.batch_size * n
    if per_step >= 1 and t.global_batch_size > per_step and t.global_batch_size % per_step == 0:
        t.accumulate_grad_batches = t.global_batch_size // per_step
        log.info(
            "trainer.accumulate_grad_batches=%d derived from trainer.global_batch_size=%d = data.batch_size "
            "%d x %d devices x %d",
            t.accumulate_grad_batches,
            t.global_batch_size,
            cfg.data.batch_size,
            n,
            t.accumulate_grad_batches,
        )


def _global_batch_fix(cfg: DictConfig, devices: int) -> str:
    """How to reach `trainer.global_batch_size` on `devices` devices, for error messages."""
    g, b = cfg.trainer.global_batch_size, cfg.data.batch_size
    per_step = b * devices
    if g % per_step == 0:
        return (
            f"set trainer.accumulate_grad_batches={g // per_step} (or leave it out and give trainer.devices "
            f"as a number: it is then derived)"
        )
    batches = [d for d in range(min(b, g // devices), 0, -1) if (g // devices) % d == 0] if g % devices == 0 else []
    hint = (
        f"data.batch_size={batches[0]} (with trainer.accumulate_grad_batches={g // devices // batches[0]}), "
        if batches
        else ""
    )
    return (
        f"{g} is not a multiple of data.batch_size x devices = {b} x {devices} = {per_step}: use {hint}"
        f"another device count, or trainer.global_batch_size={per_step * max(1, round(g / per_step))}"
    )


def check_global_batch(cfg: DictConfig, world_size: int) -> None:
    """Runtime half of the `trainer.global_batch_size` rule, once the launcher knows the world size (train.py
    calls it before fitting): data.batch_size x world size x accumulate_grad_batches must equal it."""
    g = cfg.trainer.global_batch_size
    if g is None:
        return
    b, a = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    if b * world_size * a != g:
        raise ConfigError(
            f"trainer.global_batch_size={g}, but this launch gives data.batch_size {b} x {world_size} devices x "
            f"trainer.accumulate_grad_batches {a} = {b * world_size * a}: {_global_batch_fix(cfg, world_size)}"
        )


def check_global_batch_config(cfg: DictConfig) -> None:
    """Config-time half of the `trainer.global_batch_size` rule (compose and saved configs): positive sizes, and
    where the device count is known, batch x devices x accumulation equal to it."""
    t = cfg.trainer
    b, a, g = cfg.data.batch_size, t.accumulate_grad_batches, t.global_batch_size
    if b < 1 or a < 1:
        raise ConfigError(f"data.batch_size ({b}) and trainer.accumulate_grad_batches ({a}) must be >= 1")
    if g is None:
        return
    if g < 1:
        raise ConfigError(f"trainer.global_batch_size must be >= 1 (or null: not checked), got {g}")
    n = total_devices(cfg)
    if n is not None:
        if b * n * a != g:
            devices = (
                f"trainer.devices {n}"
                if t.num_nodes == 1
                else f"{n} devices (trainer.devices {n // t.num_nodes} x trainer.num_nodes {t.num_nodes})"
            )
            raise ConfigError(
                f"trainer.global_batch_size={g}, but data.batch_size {b} x {devices} x "
                f"trainer.accumulate_grad_batches {a} = {b * n * a}: {_global_batch_fix(cfg, n)}"
            )
    elif g % (b * a):
        raise ConfigError(
            f"trainer.global_batch_size={g} is not a multiple of data.batch_size {b} x "
            f"trainer.accumulate_grad_batches {a} = {b * a}, so no device count reaches it; change data.batch_size "
            f"or trainer.accumulate_grad_batches (trainer.devices={t.devices} is resolved at launch)"
        )
