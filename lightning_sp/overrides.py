"""`key=value` command-line arguments, the one way every command reads them (train's overrides, eval's and
export's options, a study's own keys): each must have an `=`, and a list of them parses as an OmegaConf dotlist
(`a.b=1`, `seeds=[0,1]`) with a ConfigError, not an OmegaConf traceback, when it cannot."""

from __future__ import annotations

from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from lightning_sp.errors import ConfigError


def override_key(item: str, example: str = "a.b=value") -> str:
    """The key of a `key=value` argument; ConfigError naming the argument (and a valid `example`) without '='."""
    if "=" not in item:
        raise ConfigError(f"argument '{item}' is not of the form key=value (e.g. {example})")
    return item.split("=", 1)[0].strip()


def parse_dotlist(items: Iterable[str], source: str = "the command line") -> DictConfig:
    """`key=value` arguments -> a config; ConfigError naming `source` when one cannot be parsed."""
    items = list(items)
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as exc:  # omegaconf's grammar errors have no common base class worth naming
        raise ConfigError(f"cannot parse {source} {items}: {exc}") from exc
