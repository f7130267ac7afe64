"""Make the embedded default's data exist: synthetic LLaVA-format JSON + images -> WebDataset shards."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_sp.data import shards, synthetic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticSpec:
    n_train: int
    n_val: int
    turns: int
    seed: int
    image_size: int


def _stamp_matches(path: Path, payload: dict) -> bool:
    return path.is_file() and json.loads(path.read_text()) == payload


def ensure_synthetic(data_cfg, image_size: int) -> None:
    """Generate the raw synthetic set and convert it to shards, unless up-to-date copies already exist.

    A stamp file records the parameters each step was made with, so changing `data.synthetic.n_train` (say)
    regenerates instead of silently training on stale data.
    """
    syn = data_cfg.synthetic
    spec = SyntheticSpec(syn.n_train, syn.n_val, syn.turns, syn.seed, image_size)
    raw = Path(syn.raw_dir)
    raw_stamp = raw / "spec.json"
    if not _stamp_matches(raw_stamp, asdict(spec)):
        log.info("generating synthetic spatial-VQA data in %s", raw)
        synthetic.generate(
            raw, n_train=spec.n_train, n_val=spec.n_val, seed=spec.seed, image_size=image_size, turns=spec.turns
        )
        raw_stamp.write_text(json.dumps(asdict(spec)))
    for split, out in (("train", data_cfg.train_dir), ("val", data_cfg.val_dir)):
        if out is None:
            continue
        out = Path(out)
        stamp = out / "source.json"
        payload = {"spec": asdict(spec), "shard_size": data_cfg.shard_size}
        if not _stamp_matches(stamp, payload):
            if out.exists():
                for old in out.iterdir():  # stale shards from another spec
                    old.unlink()
            log.info("converting %s split to shards in %s", split, out)
            shards.convert(raw / f"{split}.json", raw, out, shard_size=data_cfg.shard_size, seed=spec.seed)
            stamp.write_text(json.dumps(payload))
