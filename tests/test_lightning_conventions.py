"""Lightning's own conventions hold for our module and runs: load_from_checkpoint, best-and-last checkpoints
without duplicate bytes, warnings that stay inside our calls, plain errors for files that are not checkpoints."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from evalkit import small_data
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_sp.callbacks.checkpointing import BestAndLastCheckpoint
from lightning_sp.module import load_module
from lightning_sp.module import LlavaSPModule
from lightning_sp.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fit_record():
    """What trained_run's fit really did: its training batches' shapes and attention-mask sums, the wall time of
    the whole `train` call."""
    return {"batches": [], "wall_s": None}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fit_record):
    import time

    from lightning_sp.config import compose
    from conftest import TINY

    root = tmp_path_factory.mktemp("conventions")
    cfg = compose(
        [
            *TINY,
            *small_data(root / "data"),
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "viz.enabled=false",
            f"run_dir={root / 'run'}",
        ]
    )
    original = LlavaSPModule.training_step

    def recorded(self, batch, batch_idx):
        mask = batch["attention_mask"]
        fit_record["batches"].append((batch["input_ids"].shape[0], batch["input_ids"].numel(), int(mask.sum())))
        return original(self, batch, batch_idx)

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        patch.setattr(LlavaSPModule, "training_step", recorded)
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        started = time.perf_counter()
        metrics = train(cfg)
        fit_record["wall_s"] = time.perf_counter() - started
        filters_after = list(warnings.filters)
    return root / "run", metrics, caught, (filters_before, filters_after)


def test_load_from_checkpoint_rebuilds_the_module_like_load_module(trained_run):
    run_dir, _, _, _ = trained_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = LlavaSPModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    # Frozen weights are rebuilt, not reported missing; nothing unexpected.
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message)[:200] for w in caught]
    reference = load_module(ckpt)
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The trained tensors are the checkpoint's, not a fresh init's.
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    projector = next(k for k in saved if k.startswith("model.projector."))
    assert torch.equal(ours[projector], saved[projector])
    assert module.cfg.trainer.max_steps == 4 and module.tokenizer is not None


def test_run_keeps_best_and_last_without_duplicate_bytes(trained_run):
    run_dir, metrics, _, _ = trained_run
    ckpts = run_dir / "checkpoints"
    kept = sorted(p for p in ckpts.glob("step*.ckpt"))
    assert len(kept) == 1  # save_top_k=1: the best validation's state
    last = ckpts / "last.ckpt"
    last_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    best_step = torch.load(kept[0], map_location="cpu", weights_only=True)["global_step"]
    assert last_step == 4
    # The newest state is either the kept best (then last.ckpt links to it) or a file of its own: never two copies.
    if best_step == last_step:
        assert last.is_symlink() and last.resolve() == kept[0].resolve()
    else:
        assert not last.is_symlink()


class _ScriptedAccuracy(BoringModel):
    """Validates every 2 steps and logs the next of a scripted list as val/accuracy."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def on_validation_epoch_end(self):
        self.log("val/accuracy", float(self.scores.pop(0)))


def _fit_scripted(tmp_path, scores, save_top_k=1, max_steps=None):
    callback = BestAndLastCheckpoint(tmp_path, save_top_k=save_top_k, validates=True, every_n_train_steps=2)
    trainer = L.Trainer(
        max_steps=max_steps or 2 * len(scores),
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_ScriptedAccuracy(scores))
    return callback


def _step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_last_is_the_newest_state_when_the_newest_is_not_the_best(tmp_path):
    # Lightning's own save_last="link" would link last.ckpt to step 4 here: a resume would go back two steps.
    _fit_scripted(tmp_path, [0.5, 0.7, 0.6])
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step000004.ckpt"]
    assert not (tmp_path / "last.ckpt").is_symlink() and _step(tmp_path / "last.ckpt") == 6
    assert _step(tmp_path / "step000004.ckpt") == 4


def test_last_links_to_the_best_when_the_newest_is_the_best(tmp_path):
    callback = _fit_scripted(tmp_path, [0.5, 0.6, 0.4, 0.9])  # a file at 6, then a link at 8 replaces it
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step000008.ckpt"]
    assert (tmp_path / "last.ckpt").is_symlink() and _step(tmp_path / "last.ckpt") == 8
    assert callback.best_model_score == pytest.approx(0.9)


def test_best_file_survives_when_last_stops_linking_to_it(tmp_path):
    _fit_scripted(tmp_path, [0.9, 0.1], save_top_k=1)  # last.ckpt links to step 2, then must become its own file
    assert _step(tmp_path / "step000002.ckpt") == 2  # not overwritten through the link
    assert _step(tmp_path / "last.ckpt") == 4 and not (tmp_path / "last.ckpt").is_symlink()


def test_last_holds_the_final_steps_after_the_last_validation(tmp_path):
    _fit_scripted(tmp_path, [0.5, 0.7], max_steps=5)  # validations at 2 and 4, training ends at 5
    assert _step(tmp_path / "last.ckpt") == 5 and _step(tmp_path / "step000004.ckpt") == 4


@pytest.mark.slow
def test_a_run_without_validation_keeps_the_newest_and_links_last_to_it(tmp_path):
    """No validation (trainer.limit_val_batches=0): ModelCheckpoint saves every val_check_interval steps, keeps the
    newest save_top_k by step, and last.ckpt is a link to the newest kept file, not a second copy of its bytes."""
    from lightning_sp.config import compose
    from conftest import TINY

    train(
        compose(
            [
                *TINY,
                *small_data(tmp_path / "data"),
                "trainer.max_steps=4",
                "trainer.val_check_interval=2",
                "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
                "viz.enabled=false",
                f"run_dir={tmp_path / 'run'}",
            ]
        )
    )
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step000004.ckpt"]  # step 2 dropped (top 1)
    last = ckpts / "last.ckpt"
    assert last.is_symlink() and os.path.samefile(last, ckpts / "step000004.ckpt")
    assert _step(last) == 4


def test_without_validation_last_holds_the_final_steps_after_the_last_save(tmp_path):
    """max_steps not a multiple of the interval: the newest by step is kept (step 4, not 2), and last.ckpt is the
    final step's own file, never a link back to the older step-4 state."""
    callback = BestAndLastCheckpoint(tmp_path, save_top_k=1, validates=False, every_n_train_steps=2)
    L.Trainer(
        max_steps=5,
        limit_val_batches=0,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(BoringModel())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step000004.ckpt"]
    assert not (tmp_path / "last.ckpt").is_symlink() and _step(tmp_path / "last.ckpt") == 5
    assert _step(tmp_path / "step000004.ckpt") == 4


def test_fit_leaves_the_callers_warning_filters_and_hides_no_resume_warning(trained_run):
    _, _, caught, (before, after) = trained_run
    assert before == after
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "eval mode" in m or "resuming from a checkpoint" in m]


def test_importing_the_package_changes_no_warning_filter():
    # Our dependencies add filters of their own when imported (torch, numpy, urllib3 do): import them first.
    code = (
        "import warnings, torch, torchvision.io, numpy, lightning.pytorch, lightning.pytorch.loggers, transformers, "
        "peft, webdataset, omegaconf\n"
        "before = list(warnings.filters)\n"
        "import lightning_sp.train, lightning_sp.data.images, lightning_sp.evaluate\n"
        "ours = [f for f in warnings.filters if f not in before]\n"
        "assert not [f for f in ours if f[1] is not None and any(s in f[1].pattern for s in "
        "('eval mode', 'resuming from', 'TorchVision'))], ours\n"
        "assert not ours, ours"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_logs_learning_rate_per_group_throughput_without_padding_and_grad_norm(trained_run, fit_record):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics, _, _ = trained_run
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr-AdamW/projector", "lr-AdamW/sp_conv", "lr-AdamW/lora", "train/grad_norm"} <= tags, tags
    grad_norms = [e.value for e in acc.Scalars("train/grad_norm")]
    assert grad_norms and all(v > 0 for v in grad_norms)

    batches = fit_record["batches"]  # (samples, padded tokens, attention-mask sum) of each training batch
    assert len(batches) == 4 and all(size == 4 for size, _, _ in batches)
    samples, padded, real = (sum(b[i] for b in batches) for i in range(3))
    assert 0 < real < padded  # the batches do carry padding, so counting it would show
    # The fit's averages in metrics.json are the fit's totals over its own time: the samples trained and the tokens
    # of the attention masks (not the padded size), divided by a fit time inside the wall time of train().
    fit_s = metrics["fit_time_s"]
    assert 0 < fit_s <= fit_record["wall_s"]
    assert metrics["fit_samples_per_sec"] * fit_s == pytest.approx(samples, rel=1e-9)
    assert metrics["fit_tokens_per_sec"] * fit_s == pytest.approx(real, rel=1e-9)
    # Lightning's ThroughputMonitor (a window of 2 timestamps at log_every_n_steps=1: each rate covers the newest
    # batch alone) divides the same elapsed time into samples and items, so items / samples is that batch's real
    # tokens per sample -- the padded width would give padded / size instead.
    per_sample = [
        v.value / s.value
        for v, s in zip(acc.Scalars("train/device/items_per_sec"), acc.Scalars("train/device/samples_per_sec"))
    ]
    expected = [r / size for size, _, r in batches]
    assert per_sample and per_sample == pytest.approx(expected[-len(per_sample) :], rel=1e-5), (per_sample, expected)
    assert all(p < n / size for p, (size, n, _) in zip(per_sample, batches[-len(per_sample) :]))


@pytest.mark.parametrize("content", [os.urandom(4000), b"PK\x03\x04 cut short", b""])
def test_eval_of_a_file_that_is_not_a_checkpoint_is_one_plain_line(tmp_path, content):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sp", "eval", f"ckpt={path}", "benchmark=synthetic"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "not a readable checkpoint" in done.stderr, done.stderr[-2000:]
    assert "could run code" not in done.stderr
