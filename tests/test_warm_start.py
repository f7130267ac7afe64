"""`init=<checkpoint>`: warm start of the trainable tensors (projector strict, LoRA optional), not a resume."""

import logging

import pytest
import torch

from lightning_sp.checkpoint import read_checkpoint, save_module_checkpoint
from lightning_sp.module import LlavaSPModule
from lightning_sp.train import train
from lightning_sp.warm_start import WarmStartError, warm_start


def small_data(tmp_path):
    root = tmp_path / "data"
    return [
        f"data.synthetic.raw_dir={root}/raw",
        f"data.train_dir={root}/shards/train",
        "data.val_dir=null",
        "data.synthetic.n_train=16",
        "data.synthetic.n_val=4",
        "data.synthetic.turns=1",  # the plain (align) template takes one caption pair
        "data.shard_size=8",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]


def trainable(module, prefix=""):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad and n.startswith(prefix)}


@pytest.mark.slow
def test_finetune_starts_from_the_align_projector(tmp_path, tiny_cfg, monkeypatch, caplog):
    align_dir, finetune_dir = tmp_path / "align", tmp_path / "finetune"
    train(tiny_cfg("stage=align", *small_data(tmp_path), f"run_dir={align_dir}"))
    align = read_checkpoint(align_dir / "checkpoints" / "last.ckpt")
    assert not any("lora_" in n for n in align["state_dict"])  # align: projector only

    seen = {}
    original = LlavaSPModule.on_fit_start

    def record(self):
        seen["projector"] = trainable(self, "model.projector.")
        seen["lora"] = trainable(self, "model.llm.")
        seen["step"] = self.trainer.global_step
        return original(self)

    monkeypatch.setattr(LlavaSPModule, "on_fit_start", record)
    caplog.set_level(logging.INFO, logger="lightning_sp")
    train(tiny_cfg("stage=finetune", *small_data(tmp_path), f"run_dir={finetune_dir}", f"init={align_dir}"))

    # The projector starts exactly where align ended; LoRA starts fresh; so do the step and the optimizer.
    projector = {n: t for n, t in align["state_dict"].items() if n.startswith("model.projector.")}
    assert set(seen["projector"]) == set(projector)
    for n, t in projector.items():
        assert torch.equal(seen["projector"][n], t), n
    assert any("lora_B" in n for n in seen["lora"])
    assert all(not t.any() for n, t in seen["lora"].items() if "lora_B" in n)  # peft's fresh init: B = 0
    assert seen["step"] == 0
    finetune = read_checkpoint(finetune_dir / "checkpoints" / "last.ckpt")
    assert finetune["global_step"] == 2
    assert any("lora_A" in n for n in finetune["state_dict"])
    assert finetune["lightning_sp_config"]["init"] == str(align_dir)
    text = caplog.text
    assert "init: warm start from" in text and "loaded (" in text and "fresh (" in text


@pytest.fixture
def ckpt_of(tmp_path, tiny_cfg, tokenizer):
    def make(name, *overrides):
        module = LlavaSPModule(tiny_cfg(*overrides), tokenizer)
        with torch.no_grad():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(0.5)  # differ from any fresh init
        save_module_checkpoint(module, tmp_path / name)
        return tmp_path / name, module

    return make


def test_warm_start_loads_projector_and_lora_and_reports(ckpt_of, tiny_cfg, tokenizer):
    path, source = ckpt_of("ft", "stage=finetune")
    target = LlavaSPModule(tiny_cfg("stage=finetune"), tokenizer)
    report = warm_start(target, path)
    want = trainable(source)
    assert set(report.loaded) == set(want) and not report.fresh and not report.ignored
    for n, t in trainable(target).items():
        assert torch.equal(t, want[n]), n

    # finetune checkpoint -> align run: the LoRA tensors have nowhere to go and are reported as ignored.
    align = LlavaSPModule(tiny_cfg("stage=align"), tokenizer)
    report = warm_start(align, path / "checkpoints" / "last.ckpt")
    assert report.ignored and all("model.llm." in n for n in report.ignored)
    assert all(n.startswith("model.projector.") for n in report.loaded)


def test_projector_is_strict(ckpt_of, tiny_cfg, tokenizer, tmp_path):
    path, _ = ckpt_of("mlp", "stage=align", "variant=mlp")
    pooling = LlavaSPModule(tiny_cfg("stage=align"), tokenizer)
    with pytest.raises(WarmStartError, match=r"(?s)projector tensors missing.*model\.projector\.sfe\.weights") as e:
        warm_start(pooling, path)
    assert "projector 'mlp'" in str(e.value)

    path, _ = ckpt_of("narrow", "stage=align", "projector.sp_width=8")
    with pytest.raises(
        WarmStartError, match=r"(?s)shapes differ:\n.*model\.projector\.dfi\.kv_weight: checkpoint \[8,"
    ):
        warm_start(pooling, path)

    path, _ = ckpt_of("wide", "stage=align")
    ckpt = read_checkpoint(path)
    del ckpt["state_dict"]["model.projector.patch_head.0.bias"]
    torch.save(ckpt, tmp_path / "holed.ckpt")
    before = trainable(pooling)
    with pytest.raises(
        WarmStartError, match=r"missing from the checkpoint \(1\): model\.projector\.patch_head\.0\.bias"
    ):
        warm_start(pooling, tmp_path / "holed.ckpt")
    assert all(torch.equal(t, before[n]) for n, t in trainable(pooling).items())  # nothing half-loaded


def test_lora_shape_mismatch_is_an_error(ckpt_of, tiny_cfg, tokenizer):
    path, _ = ckpt_of("r8", "stage=finetune")
    target = LlavaSPModule(tiny_cfg("stage=finetune", "model.lora.r=4"), tokenizer)
    with pytest.raises(WarmStartError, match=r"lora_A\.default\.weight: checkpoint \[8, .*this run \[4,"):
        warm_start(target, path)
