"""Every command reads key=value arguments the same way: a bare word and an unparseable value are ConfigErrors
that name the argument, from train's overrides, eval/export's options and a study's own keys alike."""

import pytest

from lightning_sp.ablate import parse_ablate_args
from lightning_sp.command_options import parse_command_options
from lightning_sp.config import ConfigError, compose
from lightning_sp.overrides import override_key, parse_dotlist
from lightning_sp.evaluate import EvalOptions


def test_key_and_dotlist():
    assert override_key(" optim.lr_lora =1e-4") == "optim.lr_lora"
    assert parse_dotlist(["seeds=[0,1]", "a.b=x=y"]) == {"seeds": [0, 1], "a": {"b": "x=y"}}


@pytest.mark.parametrize(
    "read",
    [
        lambda args: compose(args),
        lambda args: parse_command_options(args, EvalOptions, "eval", "ckpt=RUN"),
        lambda args: parse_ablate_args(args),
    ],
    ids=["train", "eval", "ablate"],
)
def test_every_command_names_a_bare_word(read):
    with pytest.raises(ConfigError, match="argument 'pooling' is not of the form key=value"):
        read(["pooling"])


def test_an_unparseable_value_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"cannot parse overrides \['optim.lr_lora=\[1e-4'\]"):
        compose(["optim.lr_lora=[1e-4"])
    with pytest.raises(ConfigError, match=r"cannot parse study options \['seeds=\[0,'\]"):
        parse_ablate_args(["seeds=[0,"])
