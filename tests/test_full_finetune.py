"""stage=finetune_full: LLaVA-1.5 "full" (the paper's main baseline): every LLM weight trains, no LoRA, at the
recipe's rates, in float32 master weights; FSDP2 gives every decoder layer a trainable unit. The 2-process FSDP2
run and its exact resume are in tests/test_distributed.py."""

import pytest
import torch
from evalkit import small_data

from lightning_sp.config import ConfigError, compose
from lightning_sp.distributed import check_units, plan_units
from lightning_sp.module import LlavaSPModule, optimizer_groups


def test_the_stage_carries_llava_full_recipe():
    cfg = compose(["model=llava7b", "data=llava665k", "stage=finetune_full"])  # the embedded default has its own rates
    assert cfg.stage.full_llm and not cfg.stage.lora and cfg.stage.name == "finetune"
    assert (
        cfg.optim.lr_llm,
        cfg.optim.lr_projector,
        cfg.optim.warmup_ratio,
        cfg.optim.weight_decay,
        cfg.optim.schedule,
    ) == (2e-5, 2e-5, 0.03, 0.0, "cosine")
    assert cfg.stage.template == "vicuna_v1" and cfg.trainer.global_batch_size == 128


@pytest.mark.parametrize(
    "bad, why",
    [
        (["stage=align", "stage.full_llm=true"], "stage.name=align"),
        (["stage=finetune", "stage.full_llm=true"], "stage.lora=True"),
    ],
)
def test_full_llm_outside_finetune_without_lora_is_refused(bad, why):
    with pytest.raises(ConfigError, match=f"stage.full_llm=true .*{why}.*use stage=finetune_full"):
        compose(bad)


def test_every_llm_weight_trains_in_float32_in_its_own_optimizer_group(tiny_cfg, tokenizer):
    cfg = tiny_cfg("stage=finetune_full", "model.llm.dtype=bfloat16")
    model = LlavaSPModule(cfg, tokenizer).model
    llm = dict(model.llm.named_parameters())
    assert llm and all(p.requires_grad and p.dtype == torch.float32 for p in llm.values())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    groups = optimizer_groups(model)
    assert {id(p) for p in groups["llm"]} == {id(p) for p in llm.values()} and not groups["lora"]
    assert {id(p) for g in ("projector", "sp_conv") for p in groups[g]} == {id(p) for p in model.projector.parameters()}
    units = plan_units(model)
    check_units(units, model)  # no unit mixes trainable and frozen weights
    layers = list(model.llm.model.layers)
    assert all(any(u.modules == [layer] and u.trainable for u in units) for layer in layers)


def test_a_full_run_trains_and_saves_every_llm_weight(tmp_path, tiny_cfg, tokenizer):
    from lightning_sp.module import load_module
    from lightning_sp.train import train

    cfg = tiny_cfg(
        "stage=finetune_full",
        *small_data(tmp_path / "data"),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "viz.enabled=false",
        "trainer.enable_progress_bar=false",
        "optim.lr_llm=1e-3",
        f"run_dir={tmp_path / 'run'}",
    )
    before = {n: p.detach().clone() for n, p in LlavaSPModule(cfg, tokenizer).model.llm.named_parameters()}
    metrics = train(cfg)
    assert metrics["global_step"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = {k[len("model.llm.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.llm.")}
    assert saved.keys() == before.keys()
    changed = [n for n in before if not torch.equal(before[n], saved[n])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))[:5]  # every weight moved
    assert [g["name"] for g in ckpt["optimizer_states"][0]["param_groups"]] == ["projector", "sp_conv", "llm"]
    module = load_module(tmp_path / "run")  # rebuilt from the config, trained LLM weights loaded
    assert all(torch.equal(p, saved[n]) for n, p in module.model.llm.named_parameters())
    # What gathered_checkpoint_warning says a gathered checkpoint costs, against the bytes of the one written here:
    # the trainable tensors and AdamW's moments (its per-parameter step counters aside).
    written = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    for state in ckpt["optimizer_states"][0]["state"].values():
        written += sum(v.numel() * v.element_size() for k, v in state.items() if k != "step")
    trainable = sum(p.numel() for p in LlavaSPModule(cfg, tokenizer).parameters() if p.requires_grad)
    assert written == trainable * 12


def test_full_checkpoints_under_fsdp_are_sharded_unless_turned_off_and_then_warned_about(tiny_cfg, tokenizer):
    from lightning_sp.train import gathered_checkpoint_warning

    assert tiny_cfg("stage=finetune_full", "trainer=fsdp").trainer.sharded_checkpoints  # on by default there
    assert not tiny_cfg("stage=finetune", "trainer=fsdp").trainer.sharded_checkpoints  # LoRA: one small file
    assert not tiny_cfg("stage=finetune_full").trainer.sharded_checkpoints  # nothing to shard without FSDP
    cfg = tiny_cfg("stage=finetune_full", "trainer=fsdp", "trainer.sharded_checkpoints=false")
    module = LlavaSPModule(cfg, tokenizer)
    trainable = sum(p.numel() for p in module.model.llm.parameters()) + sum(
        p.numel() for p in module.model.projector.parameters()
    )
    message = gathered_checkpoint_warning(cfg, module)
    assert message == (
        "stage.full_llm=true under trainer.strategy=fsdp with trainer.sharded_checkpoints=false: every checkpoint "
        f"is gathered on rank 0, {trainable / 1e9:.2f} B trainable parameters x 12 bytes (fp32 weight + AdamW's "
        f"two fp32 moments) = {trainable * 12 / 1e9:.1f} GB through rank 0's host memory each time; set "
        "trainer.sharded_checkpoints=true to write per-rank shards instead (nothing gathered)"
    )
    for quiet in (
        tiny_cfg("stage=finetune_full", "trainer=fsdp", "trainer.sharded_checkpoints=true"),
        tiny_cfg("stage=finetune_full"),  # no FSDP: one process or DDP, nothing to shard
        tiny_cfg("stage=finetune", "trainer=fsdp"),  # LoRA: a small gathered file
    ):
        assert gathered_checkpoint_warning(quiet, module) is None


def test_sharded_checkpoints_need_fsdp():
    with pytest.raises(ConfigError, match="trainer.sharded_checkpoints=true needs trainer.strategy=fsdp"):
        compose(["trainer=ddp_cpu", "trainer.sharded_checkpoints=true"])
    assert compose(["trainer=fsdp", "trainer.sharded_checkpoints=true"]).trainer.sharded_checkpoints
