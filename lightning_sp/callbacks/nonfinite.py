"""Stop at the first non-finite gradient, naming the parameter, before the optimizer can apply it."""

from __future__ import annotations

import lightning as L
import torch


class NonFiniteGradientError(FloatingPointError):
    """A NaN/Inf gradient; the message names the first parameter and the step, and where the last checkpoint is."""


class NonFiniteGuard(L.Callback):
    """After each backward, one fused finiteness check over all gradients (a single host sync per step); only when
    it fails are the parameters walked to name the first bad one. Raising here aborts before `optimizer.step`, so
    the weights and the last checkpoint on disk stay those of the last good step."""

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # FSDP2 gradients are DTensors: each rank checks its own shard, and the verdict is agreed on by all ranks
        # so that they all stop together instead of one leaving the others in a collective.
        named = [
            (n, getattr(p.grad, "to_local", lambda g=p.grad: g)())
            for n, p in pl_module.named_parameters()
            if p.grad is not None
        ]
        local_ok = bool(torch.stack([torch.isfinite(g).all() for _, g in named]).all()) if named else True
        if trainer.strategy.reduce_boolean_decision(local_ok, all=True):
            return
        name = next((n for n, g in named if not bool(torch.isfinite(g).all())), "a parameter sharded on another rank")
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
        raise NonFiniteGradientError(
            f"non-finite gradient in '{name}' at step {trainer.global_step} (loss or activations upstream of it "
            f"overflowed); the weights were not updated; last checkpoint: {checkpoint}. Lower the learning rate "
            "of its group, use bf16 instead of fp16, or resume from the checkpoint with resume=auto."
        )
