"""`python -m lightning_sp <command> --help`: every option with its default and a one-line meaning, generated
from the config schema (the dataclasses of schema.py and the commands' option dataclasses) so it cannot drift.

A field's meaning is its trailing `# comment`, else the first sentence of the comment block just above it;
fields without either are listed with their default only.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from omegaconf import OmegaConf

from lightning_sp.config import GROUPS, SyntheticDataConfig, compose, group_choices, run_schema_class

_FIELD = re.compile(r"^\s+(\w+)\s*:[^=]*(?:=.*?)?(?:#\s*(.*))?$")


def _first_sentence(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?)\.(\s|$)", text)
    text = match.group(1) if match else text
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def field_meanings(cls) -> dict[str, str]:
    """field name -> one-line meaning, from the comments of `cls`'s source (and its bases': a schema section that
    plug-ins extended is made at run time and has no source of its own)."""
    meanings, block = {}, []
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        bases = [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)]
        return {k: v for base in reversed(bases) for k, v in field_meanings(base).items()}
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("# "))
            continue
        match = _FIELD.match(line) if stripped and not stripped.startswith(('"""', "def ", "@")) else None
        if match and not stripped.startswith(("return", "raise")):
            trailing = (match.group(2) or "").strip()
            meaning = trailing or (_first_sentence(" ".join(block)) if block else "")
            if meaning:
                meanings[match.group(1)] = meaning
        block = []
    return meanings


def _walk(cls, prefix: str = ""):
    """(dotted key, meaning) for every leaf field of a dataclass tree."""
    meanings = field_meanings(cls)
    for f in dataclasses.fields(cls):
        name = f.name
        key = f"{prefix}{name}"
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            yield from _walk(type(nested), key + ".")
        else:
            yield key, meanings.get(name, "")


def run_options_help() -> str:
    """The groups with their choices, then every key with its embedded-default value and meaning."""

    cfg = compose([])
    lines = ["groups (group=name; default first):"]
    for group in GROUPS:
        chosen = cfg.choices.get(group)
        others = [c for c in group_choices(group) if c != chosen]
        if chosen is None:  # an optional group (config.OPTIONAL_GROUPS): the model preset's choice stands
            lines.append(f"  {group}=NAME  (optional; conf/{group}/: {', '.join(others) or '-'})")
        else:
            lines.append(f"  {group}={chosen}  (also: {', '.join(others) or '-'})")
    lines.append(f"  experiment=NAME  (conf/experiment/: {', '.join(group_choices('experiment')) or '-'})")
    lines.append("")
    lines.append("keys (key=value; the value shown is the embedded default's):")
    rows = list(_walk(run_schema_class()))  # plug-ins' own keys included
    rows += [(f"data.synthetic.{k}", m) for k, m in _walk(SyntheticDataConfig)]  # Optional: not reached above
    width = max(len(k) for k, _ in rows)
    for key, meaning in rows:
        if key in ("choices", "data.synthetic"):  # the group record; the synthetic section is listed key by key
            continue
        value = OmegaConf.select(cfg, key, default="(unset)")
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        lines.append(f"  {key:<{width}}  {value!s:<12}  {meaning}".rstrip())
    return "\n".join(lines)


def command_options_help(options_cls) -> str:
    """A command's own options (eval, export, generate): name, default, meaning."""
    meanings = field_meanings(options_cls)
    fields = dataclasses.fields(options_cls)
    width = max(len(f.name) for f in fields)
    lines = ["options (key=value; dotted keys such as model.llm.dtype=bfloat16 override the run's stored config):"]
    for f in fields:
        default = "(required)" if f.default is dataclasses.MISSING or str(f.default) == "???" else f.default
        lines.append(f"  {f.name:<{width}}  {default!s:<12}  {meanings.get(f.name, '')}".rstrip())
    return "\n".join(lines)
