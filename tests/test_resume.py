"""resume= continues a run (weights, optimizer, schedule, step); init= only warm-starts weights."""

import json

import pytest
import torch
from evalkit import small_data

from lightning_sp.config import ConfigError
from lightning_sp.train import train


def run(tiny_cfg, tmp_path, *extra):
    return train(tiny_cfg(*small_data(tmp_path / "data"), "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                          "trainer.enable_progress_bar=false", "viz.enabled=false", f"run_dir={tmp_path / 'run'}",
                          *extra))


@pytest.mark.slow
def test_resume_auto_continues_from_last_checkpoint(tmp_path, tiny_cfg):
    first = run(tiny_cfg, tmp_path, "trainer.max_steps=4", "resume=auto")  # nothing to resume yet: fresh start
    assert first["global_step"] == 4
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and saved["optimizer_states"] and saved["lr_schedulers"]

    second = run(tiny_cfg, tmp_path, "trainer.max_steps=6", "resume=auto")
    assert second["global_step"] == 6  # 2 more steps, not 6 from scratch
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6
    # the schedule continued: its step counter went on from 4
    assert resumed["lr_schedulers"][0]["last_epoch"] == saved["lr_schedulers"][0]["last_epoch"] + 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 6


def test_resume_and_init_exclude_each_other(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        tiny_cfg("resume=auto", f"run_dir={tmp_path}", f"init={tmp_path}")
    with pytest.raises(ConfigError, match="run_dir"):
        tiny_cfg("resume=auto")


def test_resume_from_a_missing_file_is_an_error(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run(tiny_cfg, tmp_path, "trainer.max_steps=2", f"resume={tmp_path / 'nope.ckpt'}")
