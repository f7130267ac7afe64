"""Command-line entry points: thin wrappers that parse arguments and call library functions.

    python -m lightning_sp train variant=pooling trainer.max_steps=50 seed=3 run_dir=runs/x
    python -m lightning_sp prepare-data [overrides]      # generate + shard the synthetic data of a config
    python -m lightning_sp convert --json X.json --image-root DIR --out data/shards/NAME
    python -m lightning_sp config variant=cropping       # print the composed, validated config
"""

from __future__ import annotations

import argparse
import logging
import sys

from lightning_sp.config import ConfigError


def _train(args) -> None:
    from lightning_sp.train import train_from_overrides

    train_from_overrides(args.overrides)


def _config(args) -> None:
    from omegaconf import OmegaConf

    from lightning_sp.config import compose

    print(OmegaConf.to_yaml(compose(args.overrides)))


def _prepare(args) -> None:
    from lightning_sp.config import compose
    from lightning_sp.data.prepare import ensure_synthetic

    cfg = compose(args.overrides)
    if cfg.data.synthetic is None:
        raise ConfigError(f"data '{cfg.choices['data']}' is not synthetic; use `convert` for real data")
    ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)


def _convert(args) -> None:
    from lightning_sp.data.shards import convert

    index = convert(args.json, args.image_root, args.out, shard_size=args.shard_size, workers=args.workers,
                    seed=args.seed)
    print(f"wrote {len(index['shards'])} shards to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_sp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("train", _train, "train a model (config overrides as key=value)"),
        ("config", _config, "print the composed config without building anything"),
        ("prepare-data", _prepare, "generate and shard the synthetic data of a config"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("overrides", nargs="*", help="group=name (variant=pooling) or key=value (seed=3)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("convert", help="LLaVA JSON + image root -> WebDataset shards + index")
    p.add_argument("--json", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Our own logger only: Lightning configures its own, and a root handler would print its lines twice.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_log = logging.getLogger("lightning_sp")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0
