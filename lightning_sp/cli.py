"""Command-line entry points: thin wrappers that parse arguments and call library functions.

python -m lightning_sp train variant=pooling trainer.max_steps=50 seed=3 run_dir=runs/x
python -m lightning_sp prepare-data [overrides]      # generate + shard the synthetic data of a config
python -m lightning_sp convert --json X.json --image-root DIR --out data/shards/NAME
python -m lightning_sp config variant=cropping       # print the composed, validated config
python -m lightning_sp eval ckpt=RUN/checkpoints/last.ckpt benchmark=pope questions=F.jsonl image_root=DIR
python -m lightning_sp generate ckpt=RUN image=F.png question="Where is the red circle?"   # streamed answer
python -m lightning_sp ablate study=default trainer.max_steps=20   # every arm x seed, then results.md/csv
python -m lightning_sp export ckpt=RUN out=DIR [dtype=bfloat16]   # merged HF dir (Llava / trust_remote_code)
python -m lightning_sp import-official --lora-dir DIR --variant pooling --llm ID --vision ID --out RUN
python -m lightning_sp export-official --ckpt RUN --out DIR         # back to adapter + non_lora_trainables.bin

Each command imports its module inside its wrapper, on purpose: `--help` and a mistyped command answer without
loading torch, transformers and Lightning (seconds), and a command pays only for what it uses. Everywhere else in
the package imports are at module level (tests/test_layering.py checks that they only look down).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lightning_sp.config import ConfigError, InputError


def _train(args) -> None:
    from lightning_sp.train import train_from_overrides

    train_from_overrides(args.overrides, config_files=args.config)


def _config(args) -> None:
    from omegaconf import OmegaConf

    from lightning_sp.config import compose

    print(OmegaConf.to_yaml(compose(args.overrides, config_files=args.config)))


def _prepare(args) -> None:
    from lightning_sp.config import compose
    from lightning_sp.data.prepare import ensure_synthetic

    cfg = compose(args.overrides, config_files=args.config)
    if cfg.data.synthetic is None:
        raise ConfigError(f"data '{cfg.choices['data']}' is not synthetic; use `convert` for real data")
    ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)


def _convert(args) -> None:
    from lightning_sp.data.shards import convert

    index = convert(
        args.json, args.image_root, args.out, shard_size=args.shard_size, workers=args.workers, seed=args.seed
    )
    print(f"wrote {len(index['shards'])} shards to {args.out}")


def _one_line_errors(fn):
    """Missing files and unusable inputs (InputError: unreadable checkpoints, bad benchmark files, release layouts
    that do not match) end the command with their message (exit 2), not a traceback."""

    def run(args) -> None:
        try:
            fn(args)
        except (FileNotFoundError, InputError) as e:
            print(f"{args.command} error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


@_one_line_errors
def _eval(args) -> None:
    from lightning_sp.evaluate import evaluate_from_args

    evaluate_from_args(args.overrides)


@_one_line_errors
def _generate(args) -> None:
    from lightning_sp.generate import generate_from_args

    generate_from_args(args.overrides)


def _ablate(args) -> None:
    from lightning_sp.ablate import ablate_from_args

    if ablate_from_args(args.overrides)["failed"]:
        raise SystemExit(1)


@_one_line_errors
def _export(args) -> None:
    from lightning_sp.export import export_from_args

    print(f"exported to {export_from_args(args.overrides)}")


@_one_line_errors
def _import_official(args) -> None:
    from lightning_sp.import_official import import_official

    path = import_official(
        args.lora_dir,
        args.variant,
        args.out,
        llm=args.llm,
        vision=args.vision,
        tokenizer=args.tokenizer,
        preset=args.preset,
        overrides=args.overrides,
    )
    print(f"wrote {path} (use init={args.out} to warm-start a run from it)")


@_one_line_errors
def _export_official(args) -> None:
    from lightning_sp.import_official import export_official

    print(f"wrote {export_official(args.ckpt, args.out)}")


def _run_options() -> str:
    from lightning_sp.options_help import run_options_help

    return run_options_help()


def _command_options(module: str, cls: str):
    def text() -> str:
        import importlib

        from lightning_sp.options_help import command_options_help

        return command_options_help(getattr(importlib.import_module(module), cls))

    return text


# What `<command> --help` lists, generated from the schema when asked (composing the config takes a moment).
_OPTION_HELP = {
    "train": _run_options,
    "config": _run_options,
    "prepare-data": _run_options,
    "eval": _command_options("lightning_sp.evaluate", "EvalOptions"),
    "export": _command_options("lightning_sp.export", "ExportOptions"),
    "generate": _command_options("lightning_sp.generate", "GenerateOptions"),
}


# What each command's key=value arguments are. Only the commands that compose a config take group selections and
# experiment=; eval/export/generate work on a trained run whose checkpoint fixes the model, and refuse them
# (command_options.parse_command_options).
_COMPOSE_HELP = "group=name (variant=pooling), experiment=NAME (conf/experiment/NAME.yaml) or key=value (seed=3)"
_RUN_CONFIG_HELP = (
    "dotted keys (model.llm.dtype=bfloat16) override the run's stored config; no group=name or experiment="
)
_OVERRIDES_HELP = {
    "train": _COMPOSE_HELP,
    "config": _COMPOSE_HELP,
    "prepare-data": _COMPOSE_HELP,
    "ablate": "study options (study=default, seeds=[0,1], arms=[mlp,pooling], root=DIR, isolate=auto|true|false), "
    "then key=value overrides for every arm (trainer.max_steps=20; not seed= or run_dir=, which the study sets)",
    "eval": "ckpt=<run or .ckpt> benchmark=pope|vqa|synthetic and the options below (questions=F, image_root=DIR, "
    "...); " + _RUN_CONFIG_HELP,
    "export": "ckpt=<run or .ckpt> out=DIR and the options below (dtype=bfloat16, ...); " + _RUN_CONFIG_HELP,
    "generate": 'ckpt=<run, .ckpt or HF export> image=PATH [question="..."] and the options below '
    "(max_new_tokens=64, ...); no config overrides, no group=name or experiment=",
}


class _HelpWithOptions(argparse.Action):
    """-h/--help that appends the command's options (options_help.py), built only when help is asked for."""

    def __init__(self, option_strings, dest, options=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.options = options

    def __call__(self, parser, namespace, values, option_string=None):
        if self.options is not None:
            parser.epilog = self.options()
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_sp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("train", _train, "train a model (config overrides as key=value)"),
        ("config", _config, "print the composed config without building anything"),
        ("prepare-data", _prepare, "generate and shard the synthetic data of a config"),
        ("eval", _eval, "evaluate a checkpoint: ckpt=PATH benchmark=pope|vqa|synthetic [questions=F key=value]"),
        ("generate", _generate, "ask about an image, answer streamed: ckpt=RUN|.ckpt|EXPORT image=F [question=...]"),
        ("ablate", _ablate, "run an ablation study (study=default) and write its results table"),
        ("export", _export, "merged Hugging Face dir of a checkpoint: ckpt=PATH out=DIR [dtype=bfloat16]"),
    ):
        p = sub.add_parser(name, help=help_, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument(
            "-h",
            "--help",
            action=_HelpWithOptions,
            options=_OPTION_HELP.get(name),
            help="show this command's options with their defaults and meanings, then exit",
        )
        p.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP[name])
        if name in ("train", "config", "prepare-data"):
            p.add_argument(
                "--config",
                action="append",
                default=[],
                metavar="FILE.yaml",
                help="a YAML of config keys (and optional `defaults:` group selections), merged after "
                "the groups and experiment=, before the command line's key=value; repeatable",
            )
        p.set_defaults(fn=fn)
    p = sub.add_parser("convert", help="LLaVA JSON + image root -> WebDataset shards + index")
    p.add_argument("--json", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_convert)
    p = sub.add_parser("import-official", help="released LLaVA-SP LoRA dir + base LLM + vision -> our run dir")
    p.add_argument("--lora-dir", required=True, help="adapter_config.json, adapter_model.*, non_lora_trainables.bin")
    p.add_argument("--variant", required=True, choices=["pooling", "cropping"], help="the release does not record it")
    p.add_argument("--llm", help="base LLM id or dir (default: adapter_config's base_model_name_or_path)")
    p.add_argument("--vision", help="vision encoder id or dir (default: config.json's mm_vision_tower)")
    p.add_argument("--tokenizer", help="default: the LLM's")
    p.add_argument("--preset", default="llava7b", help="model config group the run config starts from")
    p.add_argument("--out", required=True, help="run directory to write (config.yaml + checkpoints/last.ckpt)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.llm.dtype=float32")
    p.set_defaults(fn=_import_official)
    p = sub.add_parser("export-official", help="our pooling/cropping checkpoint -> the released LoRA layout")
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_export_official)
    return parser


def _config_options_last(argv: list[str]) -> list[str]:
    """`--config FILE` may sit anywhere among the key=value overrides: argparse lets options follow a `nargs="*"`
    positional but not interrupt it, so every `--config FILE` / `--config=FILE` moves to the end."""
    rest, options, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            options += argv[i : i + 2]
            i += 2
            continue
        (options if argv[i].startswith("--config=") else rest).append(argv[i])
        i += 1
    return rest + options


def main(argv: list[str] | None = None) -> int:
    # Our own logger only: Lightning configures its own, and a root handler would print its lines twice.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_log = logging.getLogger("lightning_sp")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    args = build_parser().parse_args(_config_options_last(sys.argv[1:] if argv is None else argv))
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0
