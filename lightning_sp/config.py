"""Config composition (OmegaConf) and validation against the typed schema (lightning_sp/schema.py).

A run's config is composed from `conf/base.yaml`, then one YAML per *group* (`model/`, `data/`, `stage/`,
`trainer/`, `variant/`), then the user's dotlist overrides. A group is selected with `group=name`
(`variant=pooling`); any other `a.b=value` overrides a field. Everything is merged into the structured schema
below, so an unknown key or a wrong type fails here, before any model is built, with a message that names the
key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from lightning_sp import schema as schemas
from lightning_sp.data.conversation import TEMPLATES
from lightning_sp.dtypes import dtype_named
from lightning_sp.errors import ConfigError, InputError  # noqa: F401 (re-exported)
from lightning_sp.global_batch import check_global_batch_config, derive_accumulation, global_batch_size
from lightning_sp.models.llm import LLM_BACKBONES, llm_backbone
from lightning_sp.models.projectors import PROJECTORS, ProjectorConfigError, projector_options
from lightning_sp.models.vision import VISION_BACKBONES, backbone_class
from lightning_sp.overrides import override_key, parse_dotlist
from lightning_sp.paths import SHIPPED
from lightning_sp.schema import (  # noqa: F401 (re-exported: the schema is part of this module's API)
    DataConfig,
    EvalConfig,
    LLMConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ProjectorConfig,
    RunConfig,
    StageConfig,
    SyntheticDataConfig,
    TrainerConfig,
    VisionConfig,
    VizConfig,
)

CONF_DIR = SHIPPED / "conf"  # package data: a wheel install composes the same configs (`conf/` links here)
log = logging.getLogger(__name__)

# Applied in this order: later groups refine earlier ones (a model preset may adjust the stage's learning
# rates, a variant the projector a model preset sized).
GROUPS = ("stage", "model", "vision", "llm", "data", "trainer", "variant")
# Groups that may stay unselected: `vision=<preset>` / `llm=<preset>` swap the model preset's encoder (conf/vision/)
# or LLM (conf/llm/) when given.
OPTIONAL_GROUPS = ("vision", "llm")


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def run_schema_class() -> type:
    """RunConfig with the option keys that registered components declare beyond it: a projector's ``Options``
    (`projector.*`), a vision or LLM backbone's ``Options`` (`model.vision.*`, `model.llm.*`). So a plug-in
    registered from outside the package brings its own keys, validated like every other."""
    try:
        return schemas.run_schema(
            projector_options=[c.Options for c in PROJECTORS.values()],
            vision_options=[c.Options for c in VISION_BACKBONES.values() if c.Options is not None],
            llm_options=[c.Options for c in LLM_BACKBONES.values() if c.Options is not None],
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def run_schema() -> DictConfig:
    """:func:`run_schema_class`, structured: what every config is merged onto."""
    return OmegaConf.structured(run_schema_class())


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors: say which file
        raise ConfigError(f"cannot parse {path}: {e}") from e


def _valid_keys(schema: DictConfig, dotted: str) -> list[str]:
    """The keys allowed at the parent of `dotted` (for error messages)."""
    node: Any = schema
    for part in dotted.split(".")[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(e: Exception, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        valid = _valid_keys(schema, key)
        hint = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        return ConfigError(f"unknown config key '{key}' (from {source}).{did} Valid keys here: {', '.join(valid)}")
    if isinstance(e, ValidationError):
        return ConfigError(f"bad value for config key '{key}' (from {source}): {e.msg}")
    return ConfigError(f"{source}: {e}")


def _merge(base: DictConfig, other: Any, schema: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError, ValidationError) as e:
        raise _explain(e, schema, source) from e


def _experiment_layers(experiment: Optional[str], config_files, conf_dir: Path) -> list[tuple[str, DictConfig]]:
    """The experiment file (`experiment=NAME`: conf/experiment/NAME.yaml) and then each `--config FILE.yaml`, as
    (source, YAML). Each may hold `defaults:` (group selections) and any config fields."""
    paths = []
    if experiment is not None:
        path = conf_dir / "experiment" / f"{experiment}.yaml"
        if not path.is_file():
            valid = group_choices("experiment", conf_dir) if path.parent.is_dir() else []
            raise ConfigError(
                f"unknown experiment '{experiment}'; valid choices: {', '.join(valid) or 'none'} "
                f"(files in {path.parent})"
            )
        paths.append(path)
    for f in config_files:
        path = Path(f).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {f}: no such file")
        paths.append(path)
    layers = []
    for path in paths:
        layer = _load_yaml(path)
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(layer).__name__}")
        layers.append((str(path), layer))
    return layers


def compose(
    overrides: list[str] | tuple[str, ...] = (),
    conf_dir: Path | str = CONF_DIR,
    config_files: list[str] | tuple[str, ...] = (),
) -> DictConfig:
    """Compose a validated, read-only RunConfig, later layers winning: base.yaml -> one file per group -> the
    experiment file (`experiment=NAME`) -> each of `config_files` (`--config FILE.yaml`) -> the command line's
    `a.b=value`. Group selections (`variant=pooling`) come from base.yaml's `defaults:`, then the experiment's and
    the config files' `defaults:`, then the command line."""
    conf_dir = Path(conf_dir)
    schema = run_schema()
    base = _load_yaml(conf_dir / "base.yaml")
    choices = dict(base.pop("defaults", {}) or {})
    field_overrides, cli_choices, experiment = [], {}, None
    for item in overrides:
        key, value = override_key(item, "variant=pooling or optim.lr_lora=1e-4"), item.split("=", 1)[1]
        if key in GROUPS:
            cli_choices[key] = value
        elif key == "experiment":
            experiment = value
        elif key == "defaults":
            raise ConfigError("'defaults' is reserved; select groups with group=name, e.g. variant=pooling")
        else:
            field_overrides.append(item)
    layers = _experiment_layers(experiment, config_files, conf_dir)
    for source, layer in layers:
        selected = layer.pop("defaults", None) or {}
        unknown = sorted(set(selected) - set(GROUPS))
        if unknown:
            raise ConfigError(f"{source}: defaults selects unknown groups {unknown}; groups: {', '.join(GROUPS)}")
        choices.update(selected)
    choices.update(cli_choices)

    cfg = _merge(schema, base, schema, str(conf_dir / "base.yaml"))
    for group in GROUPS:
        name = choices.get(group)
        if name is None and group in OPTIONAL_GROUPS:
            continue
        if name is None:
            raise ConfigError(f"no '{group}' selected; choose one of: {', '.join(group_choices(group, conf_dir))}")
        path = conf_dir / group / f"{name}.yaml"
        if not path.is_file():
            valid = group_choices(group, conf_dir)
            raise ConfigError(f"unknown {group} '{name}'; valid choices: {', '.join(valid)} (files in {path.parent})")
        cfg = _merge(cfg, _load_yaml(path), schema, str(path))
    for source, layer in layers:
        cfg = _merge(cfg, layer, schema, source)
    cfg = _merge(cfg, parse_dotlist(field_overrides, "overrides"), schema, "command line")
    cfg.choices = {g: choices[g] for g in GROUPS if g in choices} | ({"experiment": experiment} if experiment else {})
    given = {override_key(item) for item in field_overrides}
    derive_accumulation(cfg, explicit="trainer.accumulate_grad_batches" in given)
    _fill_open_defaults(cfg)
    _warn_unused_lora_overrides(cfg, given)
    _warn_unused_projector_overrides(cfg, given)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _registered(lookup, key):
    """``lookup(key)`` of a component registry (lightning_sp/registry.py), its unknown-name KeyError (which names
    the config key and the valid names) as a ConfigError."""
    try:
        return lookup(key)
    except KeyError as e:
        raise ConfigError(e.args[0]) from e


def _fill_open_defaults(cfg: DictConfig) -> None:
    """What the run decides when the config leaves it open, filled in so a saved config names what the run used.
    The LLM backbone (the model, not the stage, owns its format): stage.template null -> its chat format;
    model.lora.target_modules empty -> its LoRA targets. trainer.sharded_checkpoints null -> sharded exactly when
    every LLM weight trains under FSDP (a gathered 7B full fine-tuning checkpoint is ~92 GB through rank 0)."""
    backbone = _registered(llm_backbone, cfg.model.llm)
    if cfg.stage.template is None:
        cfg.stage.template = backbone.chat_format
    if not cfg.model.lora.target_modules:
        cfg.model.lora.target_modules = list(backbone.lora_targets)
    if cfg.trainer.sharded_checkpoints is None:
        cfg.trainer.sharded_checkpoints = bool(cfg.stage.full_llm and cfg.trainer.strategy == "fsdp")


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that a type schema cannot express; all run before any model is built."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"missing required config keys: {', '.join(sorted(missing))}")
    projector, options = _registered(projector_options, cfg.projector)
    vision = cfg.model.vision
    # The grid is image_size // patch_size: a convolutional patch embedding drops the remainder (SigLIP SO400M/14
    # at 384 px: 27x27, its last 6 pixel rows and columns unused), as timm and transformers do.
    if vision.patch_size < 1 or vision.image_size < vision.patch_size:
        raise ConfigError(
            f"model.vision.image_size ({vision.image_size}) must be at least "
            f"model.vision.patch_size ({vision.patch_size}), which must be positive"
        )
    vision_backbone = _registered(backbone_class, vision)
    try:
        vision_backbone.check_config(vision)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    grid = vision.image_size // vision.patch_size
    try:
        projector.check_config(options, grid=grid)
    except ProjectorConfigError as e:
        raise ConfigError(
            f"{e} [projector.name={cfg.projector.name} on a {grid}x{grid} patch grid: model.vision.image_size="
            f"{vision.image_size} / model.vision.patch_size={vision.patch_size}; the paper's grid is 24x24 = 336/14]"
        ) from e
    if cfg.stage.name not in ("align", "finetune"):
        raise ConfigError(f"stage.name must be 'align' or 'finetune', got '{cfg.stage.name}'")
    if cfg.stage.name == "align" and cfg.stage.lora:
        raise ConfigError(
            "stage.lora=true with stage.name=align: the align stage trains the projector only (LLM frozen, no "
            "LoRA; docs/METHOD.md §4). Set stage.lora=false, or train LoRA in stage=finetune "
            "(init=<align run> carries the projector over)"
        )
    if cfg.stage.full_llm and (cfg.stage.name != "finetune" or cfg.stage.lora):
        raise ConfigError(
            f"stage.full_llm=true trains every LLM weight in stage=finetune without LoRA (got "
            f"stage.name={cfg.stage.name}, stage.lora={cfg.stage.lora}): use stage=finetune_full"
        )
    chat_format = _registered(llm_backbone, cfg.model.llm).chat_format
    if cfg.stage.template not in TEMPLATES:
        raise ConfigError(
            f"unknown template '{cfg.stage.template}' (key stage.template); valid: {', '.join(TEMPLATES)}"
        )
    if cfg.stage.template not in ("plain", chat_format):
        raise ConfigError(
            f"stage.template={cfg.stage.template} but model.llm.backbone={cfg.model.llm.backbone} speaks "
            f"{chat_format}: leave stage.template unset (the backbone's format) or plain (the align stage's)"
        )
    if cfg.resume is not None and cfg.init is not None:
        raise ConfigError("init= (warm start: weights only) and resume= (continue a run) exclude each other")
    if cfg.resume == "auto" and not cfg.run_dir:
        raise ConfigError("resume=auto continues the run in run_dir: set run_dir=<the run directory>")
    if cfg.optim.schedule not in ("cosine", "wsd"):
        raise ConfigError(f"optim.schedule must be 'cosine' or 'wsd', got '{cfg.optim.schedule}'")
    if not 0.0 <= cfg.optim.decay_ratio <= 1.0 - cfg.optim.warmup_ratio:
        raise ConfigError(f"optim.decay_ratio must be in [0, 1 - optim.warmup_ratio], got {cfg.optim.decay_ratio}")
    if cfg.model.vision.position_init not in ("sincos", "hf"):
        raise ConfigError(
            f"model.vision.position_init must be 'sincos' or 'hf', got '{cfg.model.vision.position_init}'"
        )
    dtype_named(cfg.model.llm.dtype, "model.llm.dtype")
    if not 0.0 <= cfg.data.max_skipped_fraction <= 1.0:
        raise ConfigError(
            f"data.max_skipped_fraction must be in [0, 1] (1 never stops), got {cfg.data.max_skipped_fraction}"
        )
    if cfg.trainer.sharded_checkpoints and cfg.trainer.strategy != "fsdp":
        raise ConfigError(
            f"trainer.sharded_checkpoints=true needs trainer.strategy=fsdp (the shards are FSDP2's), got "
            f"trainer.strategy={cfg.trainer.strategy}"
        )
    if cfg.data.length_group_batches < 1:
        raise ConfigError(
            f"data.length_group_batches must be >= 1 (1 = off; LLaVA-style length grouping over that "
            f"many batches otherwise), got {cfg.data.length_group_batches}"
        )
    if cfg.viz.every_n_val < 1 or cfg.viz.num_images < 1:
        raise ConfigError(
            f"viz.every_n_val and viz.num_images must be >= 1 (viz.enabled=false turns the "
            f"attention maps off), got {cfg.viz.every_n_val} and {cfg.viz.num_images}"
        )
    _validate_distribution(cfg)


def _warn_unused_lora_overrides(cfg: DictConfig, given: set[str]) -> None:
    """Command-line LoRA settings in a run without LoRA (stage.lora=false, always so in stage=align) change
    nothing. They are warned about, not refused: one override list often serves both stages."""
    if cfg.stage.lora:
        return
    unused = sorted(k for k in given if k.startswith("model.lora.") or k == "optim.lr_lora")
    if unused:
        log.warning(
            "%s: no effect in this run: stage.lora=false (stage %s) attaches no LoRA adapters",
            ", ".join(unused),
            cfg.stage.name,
        )


def _warn_unused_projector_overrides(cfg: DictConfig, given: set[str]) -> None:
    """Command-line `projector.*` keys that the chosen projector does not declare among its options change
    nothing. Warned about, not refused: a study's overrides go to every arm (projector.sp_width to mlp too)."""
    cls, options = _registered(projector_options, cfg.projector)
    own = {f"projector.{f.name}" for f in dataclasses.fields(options)} | {"projector.name"}
    unused = sorted(k for k in given if k.startswith("projector.") and k not in own)
    if unused:
        log.warning(
            "%s: no effect in this run: projector '%s' reads only %s",
            ", ".join(unused),
            cls.registry_name,
            ", ".join(sorted(own - {"projector.name"})) or "no projector options",
        )


def _validate_distribution(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.strategy == "fsdp" and str(t.precision) in ("16-mixed", "16", "16-true", "half"):
        raise ConfigError(
            f"trainer.precision={t.precision} with trainer.strategy=fsdp: fp16 overflows in LLaVA-style training and "
            "FSDP2 has no loss scaler here; use trainer.precision=bf16-mixed (bf16 compute, fp32 trainable weights)"
        )
    if t.strategy == "fsdp" and str(t.precision) == "bf16-true":
        raise ConfigError(
            "trainer.precision=bf16-true with trainer.strategy=fsdp would store the trainable weights and optimizer "
            "state in bf16; use trainer.precision=bf16-mixed (FSDP2 computes in bf16, keeps fp32 trainable weights) "
            "and model.llm.dtype=bfloat16 for bf16 frozen weights"
        )
    if not isinstance(t.num_nodes, int) or t.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be a positive integer, got {t.num_nodes!r}")
    if t.profiler not in (None, "simple", "advanced", "pytorch"):
        raise ConfigError(f"trainer.profiler must be simple, advanced, pytorch or null, got {t.profiler!r}")
    if t.deterministic not in (None, True, False, "warn"):
        raise ConfigError(f"trainer.deterministic must be true, false, warn or null, got {t.deterministic!r}")
    if not (isinstance(t.fast_dev_run, bool) or (isinstance(t.fast_dev_run, int) and t.fast_dev_run >= 0)):
        raise ConfigError(f"trainer.fast_dev_run must be true, false or a number of batches, got {t.fast_dev_run!r}")
    if t.max_epochs is not None and t.max_epochs != -1 and t.max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be >= 1, -1 (no limit) or null, got {t.max_epochs}")
    check_global_batch_config(cfg)
    total = global_batch_size(cfg)
    nodes = f" x {t.num_nodes} nodes" if t.num_nodes != 1 else ""
    log.info(
        "global batch = %d per device x %s devices%s x %d accumulation%s",
        cfg.data.batch_size,
        t.devices,
        nodes,
        t.accumulate_grad_batches,
        f" = {total}" if total else " (devices resolved at launch)",
    )


def save(cfg: DictConfig, path: Path | str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def from_container(container: Any, source: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """A resolved config stored as plain data (a checkpoint's, a run directory's YAML), merged onto the schema,
    `overrides` (``a.b=value``) applied, validated and made read-only."""
    schema = run_schema()
    cfg = _merge(schema, container, schema, source)
    if overrides:
        cfg = _merge(cfg, parse_dotlist(overrides, "overrides"), schema, "overrides")
    _fill_open_defaults(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_saved(path: Path | str) -> DictConfig:
    """Load a resolved config saved in a run directory, re-validated against the schema."""
    return from_container(_load_yaml(Path(path)), str(path))


def flatten(container: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one dict keyed by dotted paths (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if isinstance(container, dict):
        out = {}
        for k, v in container.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: container}
