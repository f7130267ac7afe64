"""Recipe knobs of the embedded default: the learning-rate schedule and the random LLM's init scale."""

import math

import pytest
import torch
from evalkit import budget_trainer

from lightning_sp.config import ConfigError, compose
from lightning_sp.models.llm import build_llm
from lightning_sp.module import LlavaSPModule


def _lrs(module: LlavaSPModule, steps: int) -> list[float]:
    module.trainer = budget_trainer(steps)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedule_shapes(tiny_cfg, tokenizer, schedule, one_thread):
    cfg = tiny_cfg(
        "variant=mlp",
        f"optim.schedule={schedule}",
        "optim.warmup_ratio=0.1",
        "optim.decay_ratio=0.3",
        "optim.lr_projector=1e-3",
    )
    module = LlavaSPModule(cfg, tokenizer)
    lrs = _lrs(module, 100)
    peak = 1e-3
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(peak)  # linear warmup over 10 steps in both
    assert lrs[5] == pytest.approx(peak / 2)
    if schedule == "wsd":
        assert all(lr == pytest.approx(peak) for lr in lrs[10:70])  # stable until the last 30 %
        # then a cosine from the peak to 0 over 30 steps: halfway at step 85
        assert lrs[85] == pytest.approx(peak / 2, rel=1e-6)
        assert lrs[99] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 29 / 30)), rel=1e-6)
    else:  # cosine from the end of warmup to step 100: halfway at step 55
        assert lrs[55] == pytest.approx(peak / 2, rel=1e-6)
        assert lrs[40] < peak


def test_schedule_fields_are_checked():
    with pytest.raises(ConfigError, match="optim.schedule"):
        compose(["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="optim.decay_ratio"):
        compose(["optim.decay_ratio=1.5"])


def test_initializer_range_sets_the_random_llm_weight_scale(tiny_cfg, tokenizer, one_thread):
    for std in (0.02, 0.1):
        cfg = tiny_cfg(f"model.llm.initializer_range={std}")
        llm = build_llm(cfg.model.llm, tokenizer)
        weights = torch.cat([layer.self_attn.q_proj.weight.flatten() for layer in llm.model.layers])
        assert weights.std().item() == pytest.approx(std, rel=0.05)
        assert llm.config.initializer_range == std
