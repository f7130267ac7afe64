"""Our checkpoints outside Lightning's fit loop: find, read, rebuild a module from, and write them.

A checkpoint (what `LlavaSPModule.on_save_checkpoint` writes) holds `state_dict` with the *trainable* tensors only
(projector, LoRA, peft `modules_to_save`) under the module's parameter names, and `lightning_sp_config`, the
resolved run config. Frozen weights (vision tower, base LLM) are rebuilt from that config, so a checkpoint plus
the config's `name_or_path` models (or, for random-init models, their seeds) is the whole model.

A run directory stands for its `checkpoints/last.ckpt`.

Under `trainer.sharded_checkpoints` (FSDP2) a checkpoint is a *directory*: torch distributed checkpoint (DCP)
files, one per rank, for the model (`state_dict`) and the optimizer, and Lightning's `meta.pt` with everything
else (config, step, loop and data-stream state). Every function here takes either form; reading a directory needs
no process group and loads the trainable tensors only, never the optimizer's shards.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_sp import config as config_lib

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CONFIG_KEY = "lightning_sp_config"


SHARDED_META = "meta.pt"  # Lightning ModelParallelStrategy's non-tensor part of a sharded checkpoint


def is_sharded_checkpoint(path: PathLike) -> bool:
    """A directory written by `ModelParallelStrategy(save_distributed_checkpoint=True)`: DCP's `.metadata` and
    Lightning's `meta.pt`."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and (p / SHARDED_META).is_file()


def checkpoint_step(path: PathLike) -> int:
    """The global step a checkpoint file (or sharded directory) holds. Raises when it cannot be read: truncated,
    not a checkpoint, or a sharded directory whose save was cut short. Lightning writes a single-file checkpoint
    through a temporary file and a rename, but a sharded one's `meta.pt` with a plain `torch.save` after the
    shards, so a kill mid-save can leave that file present and incomplete."""
    p = Path(path)
    if p.is_dir():  # sharded: the step is in Lightning's meta.pt, the shards need not be read
        if not is_sharded_checkpoint(p):
            raise FileNotFoundError(f"{p}: a directory without DCP's .metadata and {SHARDED_META} (a save cut short?)")
        p = p / SHARDED_META
    ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)  # mmap: tensors stay on disk
    return int(ckpt["global_step"])


def resolve_checkpoint(path: PathLike) -> Path:
    """A `.ckpt` file (or sharded checkpoint directory) as given; a run directory -> its `checkpoints/last.ckpt`
    (or `last.ckpt`)."""
    p = Path(path).expanduser()
    if p.is_file() or is_sharded_checkpoint(p):
        return p
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file() or is_sharded_checkpoint(candidate):
                return candidate
        raise FileNotFoundError(f"{p} is a directory without checkpoints/last.ckpt (nor last.ckpt); pass a .ckpt file")
    raise FileNotFoundError(f"checkpoint not found: {p}")


class CheckpointError(pickle.UnpicklingError, config_lib.InputError):
    """A file that is not a lightning_sp checkpoint we can read: the CLI prints it as one line (exit 2)."""


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's weights-only error that names the refused object (not its advice to unpickle)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            detail = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return detail or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else repr(error)


def sharded_tensor_keys(path: PathLike) -> dict[str, Any]:
    """The model tensors a sharded checkpoint holds: parameter name -> DCP's metadata (size, dtype)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    return {
        k[len(prefix) :]: m
        for k, m in metadata.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }


def read_sharded_checkpoint(path: PathLike) -> dict:
    """A sharded checkpoint directory as the dict a single file would hold, without its optimizer state: `meta.pt`
    (torch.load, weights only) plus `state_dict` assembled from every rank's shards (DCP's own reader, no process
    group: `torch.distributed.checkpoint.load(..., no_dist=True)` into tensors sized from its metadata)."""
    import torch.distributed.checkpoint as dcp

    p = Path(path)
    ckpt = dict(torch.load(p / SHARDED_META, map_location="cpu", weights_only=True))
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in sharded_tensor_keys(p).items()}
    if not state:
        raise CheckpointError(f"{p}: a sharded checkpoint without model tensors")
    dcp.load({"state_dict": state}, checkpoint_id=str(p), no_dist=True)
    ckpt["state_dict"] = state
    return ckpt


def read_checkpoint(path: PathLike) -> dict:
    """The checkpoint dict (tensors on CPU), read with `torch.load(weights_only=True)`: never unpickles code.
    Raises CheckpointError for a file that is not a readable checkpoint or that holds objects other than data.
    A sharded checkpoint directory gives the same dict without the optimizer state."""
    p = resolve_checkpoint(path)
    if is_sharded_checkpoint(p):
        return read_sharded_checkpoint(p)

    def unreadable(reason: str) -> CheckpointError:
        return CheckpointError(
            f"{p} is not a readable checkpoint ({reason}); pass a .ckpt written by lightning_sp, or a run directory"
        )

    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # "Unsupported global": the file references a class or function to call, the shape of a code-running
        # pickle. Anything else (an unknown opcode, a bad load key) is a file that is not a pickle at all.
        if "Unsupported global" not in str(e):
            raise unreadable(f"torch.load: {_unpickler_reason(e)}") from e
        raise CheckpointError(
            f"{p}: refused to load: it holds objects other than tensors and plain containers (a file that could run "
            f"code when unpickled). Checkpoints are only read with torch.load(weights_only=True); lightning_sp never "
            f"writes such objects, so this file was not written by it or was altered ({_unpickler_reason(e)})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:  # not a zip archive, cut short, unreadable
        raise unreadable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a lightning_sp checkpoint (no 'state_dict')")
    return dict(ckpt)


def checkpoint_config(ckpt: Mapping, overrides: Iterable[str] = ()) -> DictConfig:
    """The run config stored in a checkpoint, validated against the schema; `overrides` as `a.b=value`."""
    if CONFIG_KEY not in ckpt:
        raise ValueError(f"checkpoint has no '{CONFIG_KEY}': it was not written by lightning_sp")
    return config_lib.from_container(OmegaConf.create(ckpt[CONFIG_KEY]), "checkpoint config", list(overrides))


def save_module_checkpoint(module, run_dir: PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `run_dir/config.yaml` and `run_dir/checkpoints/last.ckpt` as a training run would (trainable tensors
    + `lightning_sp_config`, via `module.on_save_checkpoint`), with step 0 and no optimizer state: the file
    serves `init=` and evaluation, not `resume`. `extra`: more top-level entries (plain data and tensors)."""
    import lightning

    run_dir = Path(run_dir)
    checkpoint: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in checkpoint["state_dict"].items()}
    checkpoint.update(extra or {})
    config_lib.save(module.cfg, run_dir / "config.yaml")
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    log.info("wrote %s (%d trainable tensors)", path, len(checkpoint["state_dict"]))
    return path
