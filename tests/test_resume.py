"""resume= continues a run (weights, optimizer, schedule, step); init= only warm-starts weights."""

import json
import warnings

import pytest
import torch
from evalkit import small_data

from lightning_sp.config import ConfigError
from lightning_sp.train import train


def run(tiny_cfg, tmp_path, *extra):
    return train(
        tiny_cfg(
            *small_data(tmp_path / "data"),
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "viz.enabled=false",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        )
    )


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


# ---- exact resume: same batches, same random draws, same weights as a run that never stopped ----------------

EXACT = [
    "trainer.max_steps=10",
    "trainer.val_check_interval=3",
    "model.lora.dropout=0.2",
    "data.num_workers=2",
    "data.shard_size=4",
    "trainer.log_every_n_steps=1",
]


class Crash(Exception):
    pass


def record_steps(monkeypatch, crash_at=None):
    """Patch the training step to log (step, first sample id, loss) and optionally die at a given step."""
    from lightning_sp.module import LlavaSPModule

    log, original = [], LlavaSPModule.training_step

    def step(self, batch, batch_idx):
        if self.global_step == crash_at[0]:
            raise Crash(f"simulated crash at step {self.global_step}")
        loss = original(self, batch, batch_idx)
        log.append((self.global_step, batch["ids"][0], loss.item()))
        return loss

    crash_at = crash_at or [None]
    monkeypatch.setattr(LlavaSPModule, "training_step", step)
    return log


def trainable(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 2])
def test_crash_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_cfg, monkeypatch, groups):
    """6 batches per epoch, checkpoints at steps 3, 6, 9, two data workers (so the resumed loader must start
    with the second worker), LoRA dropout (so the random stream must be restored too). With length groups of 2
    batches per worker, the step-3 checkpoint falls inside the second worker's first group."""
    data = small_data(tmp_path / "data")
    common = [
        *data,
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "viz.enabled=false",
        *EXACT,
        f"data.length_group_batches={groups}",
    ]
    crash_at = [None]
    steps = record_steps(monkeypatch, crash_at)
    train(tiny_cfg(*common, f"run_dir={tmp_path / 'whole'}"))
    whole = list(steps)
    steps.clear()

    crash_at[0] = 4  # after the step-3 checkpoint, mid-way through the first epoch
    with pytest.raises(Crash):
        train(tiny_cfg(*common, f"run_dir={tmp_path / 'broken'}"))
    crash_at[0] = None
    steps.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_cfg(*common, f"run_dir={tmp_path / 'broken'}", "resume=auto"))

    assert [s for s, _, _ in steps] == list(range(3, 10))
    assert steps == whole[3:]  # same samples in the same order, bit-identical losses
    a, b = trainable(tmp_path / "whole"), trainable(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The resume was exact, so Lightning's mid-epoch "dataloader is not resumable" warning (it does not look at
    # the datamodule's stream position) would be false: train.py silences exactly it, and a user must not see it.
    assert not [w for w in caught if "not resumable" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkilled_subprocess_resumes_to_the_uninterrupted_result(tmp_path):
    """The issue's scenario for real: `python -m lightning_sp train` killed with SIGKILL once it has written a
    mid-epoch checkpoint, then `resume=auto`; the final weights equal those of a run that was never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import TINY

    from lightning_sp.paths import REPO_ROOT

    common = [
        *TINY,
        *small_data(tmp_path / "data"),
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "viz.enabled=false",
        *EXACT,
        "trainer.max_steps=16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_sp", "train", *common, f"run_dir={tmp_path / run}", *extra],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    whole = launch("whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()[-3000:]

    victim = launch("killed")
    first = tmp_path / "killed" / "checkpoints" / "step000003.ckpt"
    deadline = time.monotonic() + 300
    while not first.is_file() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = launch("killed", "resume=auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]
    a, b = trainable(tmp_path / "whole"), trainable(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("whole", "killed")]
    assert metrics[0]["train/loss"] == metrics[1]["train/loss"] and metrics[1]["global_step"] == 16


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_last_checkpoint_and_old_ones_rotate(tmp_path, tiny_cfg):
    # No validation: the kept files are the newest (with validation, the best by val/accuracy:
    # test_lightning_conventions.py).
    run(tiny_cfg, tmp_path, "trainer.max_steps=6", "save_top_k=2", "trainer.limit_val_batches=0")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step000004.ckpt", "step000006.ckpt"]

    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])  # a copy cut short
    (ckpts / "step000006.ckpt").write_bytes(b"")
    from lightning_sp.train import resume_checkpoint

    cfg = tiny_cfg("resume=auto", f"run_dir={tmp_path / 'run'}")
    assert resume_checkpoint(cfg, tmp_path / "run") == str(ckpts / "step000004.ckpt")
    resumed = run(
        tiny_cfg, tmp_path, "trainer.max_steps=8", "save_top_k=2", "resume=auto", "trainer.limit_val_batches=0"
    )
    assert resumed["global_step"] == 8


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from lightning_sp import rng

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save({"rng": rng.capture()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_resume_auto_skips_a_sharded_checkpoint_whose_save_was_cut_short(tmp_path, tiny_cfg):
    """Lightning writes a sharded checkpoint's meta.pt in place after the DCP shards: a kill during that write
    leaves `.metadata` and a truncated meta.pt. resume=auto must continue from the older whole checkpoint."""
    import io

    from lightning_sp.checkpoint import checkpoint_step
    from lightning_sp.train import resume_checkpoint

    ckpts = tmp_path / "run" / "checkpoints"
    older, cut = ckpts / "step000002.ckpt", ckpts / "step000004.ckpt"
    for directory, step in ((older, 2), (cut, 4)):
        directory.mkdir(parents=True)
        (directory / ".metadata").write_bytes(b"dcp")
        buffer = io.BytesIO()
        torch.save({"global_step": step, "pad": torch.zeros(4096)}, buffer)
        (directory / "meta.pt").write_bytes(buffer.getvalue())
    assert checkpoint_step(cut) == 4
    (cut / "meta.pt").write_bytes((cut / "meta.pt").read_bytes()[:3000])  # the kill landed mid-write
    with pytest.raises(Exception):
        checkpoint_step(cut)
    cfg = tiny_cfg("resume=auto", f"run_dir={tmp_path / 'run'}")
    assert resume_checkpoint(cfg, tmp_path / "run") == str(older)
