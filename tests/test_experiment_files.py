"""A run as one file under version control (`experiment=NAME`, `--config FILE.yaml`) and the Trainer's everyday
arguments (num_nodes, max_epochs, fast_dev_run, deterministic, profiler) wired through."""

import contextlib
import io

import pytest
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import OmegaConf

from lightning_sp.cli import main
from lightning_sp.config import ConfigError, compose
from lightning_sp.global_batch import global_batch_size
from lightning_sp.train import build_trainer


def write(path, text):
    path.write_text(text)
    return str(path)


def test_experiment_file_selects_groups_and_sets_keys_and_the_command_line_wins():
    cfg = compose(["experiment=default_x2"])
    assert cfg.choices["experiment"] == "default_x2" and cfg.choices["variant"] == "cropping"
    assert cfg.projector.name == "cropping" and cfg.trainer.max_steps == 3600 and cfg.trainer.val_check_interval == 900
    again = compose(["experiment=default_x2", "variant=mlp", "trainer.max_steps=10"])
    assert again.projector.name == "mlp" and again.trainer.max_steps == 10 and again.trainer.val_check_interval == 900


def test_config_files_layer_after_the_experiment_and_before_the_command_line(tmp_path):
    first = write(tmp_path / "a.yaml", "defaults: {variant: mlp}\ntrainer: {max_steps: 7, log_every_n_steps: 3}\n")
    second = write(tmp_path / "b.yaml", "trainer: {max_steps: 8}\nseed: 5\n")
    cfg = compose(["experiment=default_x2", "seed=6"], config_files=[first, second])
    assert cfg.projector.name == "mlp"  # the file's group selection over the experiment's
    assert cfg.trainer.max_steps == 8 and cfg.trainer.log_every_n_steps == 3 and cfg.trainer.val_check_interval == 900
    assert cfg.seed == 6


def test_config_option_may_sit_anywhere_among_the_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", "trainer: {max_steps: 7}\n")
    for argv in (
        ["config", "--config", path, "seed=4"],
        ["config", "seed=4", "--config", path],
        ["config", "seed=4", f"--config={path}", "trainer.log_every_n_steps=2"],
    ):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
        assert "max_steps: 7" in out.getvalue() and "seed: 4" in out.getvalue(), argv


def test_bad_experiment_and_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; valid choices: .*default_x2"):
        compose(["experiment=nope"])
    with pytest.raises(ConfigError, match="no such file"):
        compose([], config_files=[str(tmp_path / "missing.yaml")])
    bad_group = write(tmp_path / "g.yaml", "defaults: {varient: mlp}\n")
    with pytest.raises(ConfigError, match=r"g\.yaml: defaults selects unknown groups \['varient'\]"):
        compose([], config_files=[bad_group])
    bad_key = write(tmp_path / "k.yaml", "trainer: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"max_stepz.*k\.yaml.*Did you mean 'max_steps'"):
        compose([], config_files=[bad_key])


def test_trainer_arguments_reach_lightning(tmp_path):
    cfg = compose(
        [
            "trainer.max_epochs=3",
            "trainer.deterministic=true",
            "trainer.profiler=simple",
            "trainer.enable_progress_bar=false",
            "trainer.num_nodes=2",
        ]
    )
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.max_epochs == 3 and trainer.num_nodes == 2 and isinstance(trainer.profiler, SimpleProfiler)
    assert build_trainer(compose(["trainer.fast_dev_run=2"]), tmp_path / "f").fast_dev_run == 2
    for bad, key in (
        ("trainer.profiler=fancy", "profiler"),
        ("trainer.num_nodes=0", "num_nodes"),
        ("trainer.deterministic=maybe", "deterministic"),
        ("trainer.max_epochs=0", "max_epochs"),
    ):
        with pytest.raises(ConfigError, match=key):
            compose([bad])


def test_global_batch_counts_nodes():
    cfg = compose(["trainer.devices=2", "trainer.num_nodes=2", "data.batch_size=4", "trainer.global_batch_size=32"])
    assert cfg.trainer.accumulate_grad_batches == 2 and global_batch_size(cfg) == 32
    with pytest.raises(ConfigError, match="trainer.num_nodes"):
        compose(
            [
                "trainer.devices=2",
                "trainer.num_nodes=2",
                "data.batch_size=4",
                "trainer.global_batch_size=12",
                "trainer.accumulate_grad_batches=1",
            ]
        )


def _help(command, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_command_help_lists_every_option_with_its_default_and_meaning(capsys):
    from lightning_sp.config import flatten

    text = _help("train", capsys)
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and "." in line.split()[0]}
    cfg = compose([])
    every = {k for k in flatten(OmegaConf.to_container(cfg)) if not k.startswith("choices.")}
    assert every <= listed | {"seed", "run_dir", "save_top_k", "init", "resume"}, sorted(every - listed)
    row = next(line for line in text.splitlines() if line.strip().startswith("model.llm.initializer_range"))
    assert "0.088" in row and "Std of the random-init weights" in row  # the embedded default's value, the comment
    assert "variant=pooling  (also: " in text and "experiment=NAME" in text
    eval_text = _help("eval", capsys)
    assert any(line.split()[:3] == ["benchmark", "(required)", "pope"] for line in eval_text.splitlines())
