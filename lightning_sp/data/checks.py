"""Before a run builds its model: every shard directory it reads holds an `index.json` (local or a URL)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lightning_sp.data import locations
from lightning_sp.errors import ConfigError


def check_data_paths(cfg: DictConfig) -> None:
    """Every shard directory the run reads must hold an `index.json` (train.py calls this after generating the
    synthetic data and before building the model). Not part of `validate`: saved configs of finished runs are
    validated too, and their data may be gone."""
    data = cfg.data
    for key, directory in (("data.train_dir", data.train_dir), ("data.val_dir", data.val_dir)):
        if directory is None:
            continue
        if locations.exists(directory, "index.json"):
            continue
        index = locations.join(directory, "index.json")
        state = (
            "cannot be read"
            if locations.is_url(directory)
            else "does not exist"
            if not Path(directory).exists()
            else "has no index.json"
        )
        source = (
            "data.synthetic is set but did not produce it"
            if data.synthetic is not None
            else "data.synthetic is unset, so nothing generates it"
        )
        fix = (
            f"make the shards with `python -m lightning_sp convert --json <llava.json> --image-root <images> "
            f"--out {directory}`, or point {key} at a shard directory"
        )
        if key == "data.val_dir":
            fix += ", or set data.val_dir=null (no validation)"
        raise ConfigError(
            f"{key}={directory} {state} ({index} missing; {source}): {fix}. data=synthetic generates its own data"
        )
