"""`key=value` options of the commands that work on a trained run (eval, export, generate): the command's own
options (a dataclass) apart from dotted overrides of the run's stored config."""

from __future__ import annotations

import difflib

from omegaconf import OmegaConf

from lightning_sp.config import GROUPS
from lightning_sp.errors import ConfigError
from lightning_sp.overrides import override_key, parse_dotlist


def parse_command_options(args, options_cls, command: str, usage: str) -> tuple[dict, list[str]]:
    """`key=value` arguments of a command that works on an existing run (eval, export) -> (the command's own
    options, a `options_cls` dataclass, as a dict; the dotted `a.b=value` overrides of the run's stored config).
    A group selection (`variant=pooling`) is refused with the reason: the checkpoint fixes the model."""
    plain, dotted = [], []
    for item in args:
        (dotted if "." in override_key(item, f"{command} {usage}") else plain).append(item)
    valid = list(OmegaConf.structured(options_cls).keys())
    for item in plain:
        key = override_key(item)
        if key in GROUPS or key == "experiment":
            raise ConfigError(
                f"{command}: '{item}' selects a config group, but {command} works on a trained run "
                f"whose config (model, variant, data, ...) is stored in its checkpoint; name the run "
                f"with ckpt=... ({usage}). Dotted keys such as model.llm.dtype=bfloat16 override the "
                f"stored config"
            )
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown {command} option '{key}'.{hint} Valid: {', '.join(valid)} (dotted keys such as "
                f"model.llm.dtype=bfloat16 override the run's config)"
            )
    schema = OmegaConf.structured(options_cls)
    try:
        opts = OmegaConf.merge(schema, parse_dotlist(plain, f"{command} options"))
        missing = sorted(OmegaConf.missing_keys(opts))
    except Exception as exc:  # type errors: batch_size=many
        raise ConfigError(f"bad {command} option: {exc}") from exc
    if missing:
        raise ConfigError(f"{command} needs {', '.join(missing)}: {usage}")
    return OmegaConf.to_container(opts), dotted
