"""Config composition and validation: every YAML loads; bad keys and values fail early and say why."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lightning_sp.config import CONF_DIR, GROUPS, ConfigError, compose, group_choices, load_saved, save


@pytest.mark.parametrize("group", GROUPS)
def test_every_yaml_in_every_group_composes(group):
    choices = group_choices(group)
    assert choices, f"conf/{group}/ is empty"
    for name in choices:
        cfg = compose([f"{group}={name}"])
        assert cfg.choices[group] == name


def test_defaults_are_the_embedded_default():
    cfg = compose()
    assert dict(cfg.choices) == {"stage": "finetune", "model": "tiny", "data": "synthetic", "trainer": "cpu",
                                 "variant": "pooling"}
    assert cfg.projector.name == "pooling" and cfg.model.llm.name_or_path is None
    assert cfg.model.vision.image_size // cfg.model.vision.patch_size == 24


def test_overrides_and_group_selection():
    cfg = compose(["variant=cropping", "trainer.max_steps=50", "seed=3", "run_dir=runs/x"])
    assert (cfg.projector.name, cfg.trainer.max_steps, cfg.seed, cfg.run_dir) == ("cropping", 50, 3, "runs/x")
    # a later override beats the group file
    assert compose(["variant=pooling", "projector.dfi=false"]).projector.dfi is False


def test_unknown_key_names_the_key_and_valid_choices():
    with pytest.raises(ConfigError, match=r"trainer\.max_step'.*Did you mean 'max_steps'.*Valid keys"):
        compose(["trainer.max_step=5"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        compose(["trainer.max_steps=many"])


def test_unknown_group_choice_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown variant 'pooling2'.*cropping.*mlp.*pooling"):
        compose(["variant=pooling2"])


def test_unknown_projector_name_lists_registry():
    with pytest.raises(ConfigError, match=r"unknown projector 'convnext'.*valid: .*\bcropping, .*\bmlp, pooling\b"):
        compose(["projector.name=convnext"])


def test_grid_the_projector_cannot_use_fails_at_config_time():
    with pytest.raises(ConfigError, match="grid"):
        compose(["model.vision.image_size=56"])  # 4x4 grid: no six distinct windows


def test_saved_config_round_trips(tmp_path):
    cfg = compose(["variant=mlp", "seed=7"])
    save(cfg, tmp_path / "config.yaml")
    again = load_saved(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_cli_reports_config_errors_without_traceback():
    out = subprocess.run([sys.executable, "-m", "lightning_sp", "config", "trainer.max_step=5"],
                         capture_output=True, text=True, cwd=CONF_DIR.parent)
    assert out.returncode == 2
    assert "unknown config key 'trainer.max_step'" in out.stderr and "Traceback" not in out.stderr
