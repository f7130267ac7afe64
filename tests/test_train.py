"""End-to-end: a few-step fit of every variant from synthetic data through shards to checkpoints and logs."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_sp.data.tokenizer import load_tokenizer
from lightning_sp.module import LlavaSPModule
from lightning_sp.paths import resolve
from lightning_sp.stats import VAL_QUESTIONS, read_questions
from lightning_sp.train import train
from evalkit import small_data


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["pooling", "mlp", "cropping"])
def test_few_step_fit_writes_config_metrics_checkpoint_and_logs(tmp_path, tiny_cfg, variant):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(
        f"variant={variant}",
        *small_data(tmp_path / "data"),
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
    )
    metrics = train(cfg)
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["val/loss"] == pytest.approx(metrics["val/loss"])

    events = list((run_dir / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # Lightning's LearningRateMonitor (every named group) and ThroughputMonitor (tokens exclude padding).
    lr_tags = {"lr-AdamW/projector", "lr-AdamW/lora"} | ({"lr-AdamW/sp_conv"} if variant != "mlp" else set())
    assert {
        "train/loss",
        "val/loss",
        "val/accuracy",
        "train/grad_norm",
        "train/device/samples_per_sec",
        "train/device/items_per_sec",
    } | lr_tags <= tags, tags
    assert "hp_metric" not in tags  # no placeholder: the HPARAMS tab shows the real metrics
    # The HPARAMS tab: the variant, projector fields, the curated keys and the overrides, with final metrics.
    hparams = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.session_start_info.hparams.items()}
    assert values["variant"] == variant and values["projector.name"] == variant
    assert values["trainer.max_steps"] == 4 and values["data.batch_size"] == 4 and values["seed"] == 0
    assert values["model.llm.hidden_size"] == 64 and values["data.synthetic.n_train"] == 24  # TINY, small_data
    assert values["trainer.limit_val_batches"] == 1 and "run_dir" not in values
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"val/accuracy", "val/loss", "train/loss"} <= metric_tags and any("val/accuracy_" in t for t in metric_tags)

    # Validation's per-question hits: as many as the val batches hold, averaging to the logged accuracy.
    questions = read_questions(run_dir / VAL_QUESTIONS)
    assert len(questions) == 4 and len({q["id"] for q in questions}) == 4  # limit_val_batches=1 x val_batch_size
    assert sum(q["hit"] for q in questions) / 4 == pytest.approx(metrics["val/accuracy"])

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    names = set(ckpt["state_dict"])
    assert names and all(not n.startswith("model.vision.") for n in names)  # frozen weights are not stored
    assert any(n.startswith("model.projector.") for n in names)
    assert ckpt["lightning_sp_config"]["projector"]["name"] == variant

    # Rebuilt from the config, the checkpoint restores the exact model.
    tokenizer = load_tokenizer(str(resolve(cfg.model.tokenizer)))
    fresh = LlavaSPModule(cfg, tokenizer)
    missing, unexpected = fresh.load_state_dict(ckpt["state_dict"], strict=False)
    assert not unexpected and all(not n.startswith("model.projector.") for n in missing)
    trained = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    assert set(trained) == {n for n in names}


def test_checkpoint_missing_a_trainable_tensor_is_refused(tiny_cfg, tokenizer):
    module = LlavaSPModule(tiny_cfg(), tokenizer)
    state = {n: p for n, p in module.named_parameters() if p.requires_grad}
    state.pop(next(n for n in state if n.startswith("model.projector.")))
    with pytest.raises(KeyError, match="lacks 1 trainable"):
        module.on_load_checkpoint({"state_dict": state})
