"""LightningModule: stage-aware trainable sets, AdamW param groups, cosine schedule, trainable-only checkpoints."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import get_cosine_schedule_with_warmup

from lightning_sp import rng
from lightning_sp.data.answers import normalize_answer
from lightning_sp.distributed import gather_objects
from lightning_sp.models.vlm import LlavaSP
from lightning_sp.trainable import parameter_table, set_trainable

log = logging.getLogger(__name__)


SP_CONV_SUFFIXES = ("sfe.weights", "dfi.kv_weight", "conv_tokens.weight")  # the full-window convolution weights of spatial projectors


def param_group(name: str) -> str:
    """Optimizer group of a trainable parameter: `sp_conv`, `projector` (the rest of it) or `lora` (the LLM)."""
    if not name.startswith("projector."):
        return "lora"
    return "sp_conv" if any(s in name for s in SP_CONV_SUFFIXES) else "projector"


class LlavaSPModule(L.LightningModule):
    def __init__(self, cfg, tokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = LlavaSP.from_config(cfg, tokenizer)
        set_trainable(self.model, cfg.stage)
        # Checkpoints hold trainable state only; frozen weights are rebuilt from the config on load.
        self.strict_loading = False
        self._val_hits: dict[str, list[int]] = defaultdict(list)
        self._step_start = 0.0
        self._fsdp_units = None  # set by configure_model under FSDP2Strategy
        self._rng_to_restore = None  # random streams of a checkpoint being resumed

    # ---- training -------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        supervised = (batch["labels"] != -100).sum()
        tokens = batch["attention_mask"].sum()
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/supervised_fraction", supervised.float() / tokens.float(), batch_size=bs)
        # Records the data pipeline dropped (named in its warnings) since the previous batch, summed per epoch.
        self.log("train/skipped_records", float(batch.get("skipped", 0)), reduce_fx="sum", on_step=False,
                 on_epoch=True, batch_size=bs, sync_dist=True)  # summed over ranks too
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False, batch_size=bs)
        return out.loss

    def on_train_batch_start(self, batch, batch_idx):
        if self._rng_to_restore is not None:
            rng.restore(self._rng_to_restore)
            self._rng_to_restore = None
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - self._step_start
        if elapsed > 0:
            bs = batch["input_ids"].shape[0]
            self.log("train/samples_per_sec", bs / elapsed, batch_size=bs)
            self.log("train/tokens_per_sec", batch["attention_mask"].numel() / elapsed, batch_size=bs)

    # ---- validation: teacher-forced loss + greedy answer accuracy ------------------------------------------
    def validation_step(self, batch, batch_idx):
        bs = batch["input_ids"].shape[0]
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            logit_positions=batch.get("logit_positions"),
        )
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=True)
        predictions = self.generate_answers(batch)
        for pred, ref, qtype in zip(predictions, batch["answers"], batch["qtypes"]):
            hit = int(normalize_answer(pred) == normalize_answer(ref))
            self._val_hits["all"].append(hit)
            self._val_hits[qtype].append(hit)

    def generate_answers(self, batch) -> list[str]:
        new_tokens = self.model.generate(
            batch["prompt_ids"],
            batch["prompt_attention_mask"],
            batch["pixel_values"],
            max_new_tokens=self.cfg.eval.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            # Sharded weights: every rank must run the same number of decoding steps (all-gathers in each).
            synced_gpus=self._fsdp_units is not None and self.trainer.world_size > 1,
        )
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def on_validation_epoch_end(self):
        # Pool (hits, count) over ranks first: every rank then logs the same keys (a question type seen on one
        # rank only would otherwise leave the ranks' sync_dist collectives mismatched) and accuracies are
        # weighted by sample count, not averaged per rank.
        counts = defaultdict(lambda: (0, 0))
        for rank_counts in gather_objects({key: (sum(hits), len(hits)) for key, hits in self._val_hits.items()}):
            for key, (h, n) in rank_counts.items():
                counts[key] = (counts[key][0] + h, counts[key][1] + n)
        for key, (h, n) in sorted(counts.items()):
            name = "val/accuracy" if key == "all" else f"val/accuracy_{key}"
            acc = torch.tensor(h / max(1, n), dtype=torch.float32)
            self.log(name, acc, prog_bar=key == "all", sync_dist=True)
        self._val_hits.clear()

    # ---- sharding (trainer.strategy=fsdp) --------------------------------------------------------------------
    def configure_model(self):
        """FSDP2 wrap (lightning_sp/distributed.py) under FSDP2Strategy; nothing under DDP or a single device.
        Lightning calls this before configure_optimizers, and again for each later fit/validate: idempotent."""
        from lightning_sp.distributed import BF16_PRECISIONS, FSDP2Strategy, describe_units, shard_model

        if self._fsdp_units is not None or not isinstance(self.trainer.strategy, FSDP2Strategy):
            return
        bf16 = str(self.trainer.precision) in BF16_PRECISIONS
        self._fsdp_units = shard_model(self.model, self.device_mesh["data_parallel"], bf16=bf16)
        rank_zero_info(f"FSDP2 units ({'bf16 compute, fp32 reduce' if bf16 else 'fp32'}):\n"
                       + describe_units(self._fsdp_units))

    # ---- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = {"projector": [], "sp_conv": [], "lora": []}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups[param_group(name)].append(p)
        if self._fsdp_units is not None:  # the optimizer must hold the sharded parameters, not stale originals
            from torch.distributed.tensor import DTensor

            plain = [n for n, p in self.model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
            if plain:
                raise RuntimeError(f"configure_optimizers ran before sharding: {plain[:3]} are not DTensors")
        optim = self.cfg.optim
        lr_sp_conv = optim.lr_sp_conv if optim.lr_sp_conv is not None else optim.lr_projector
        lrs = {"projector": optim.lr_projector, "sp_conv": lr_sp_conv, "lora": optim.lr_lora}
        param_groups = [
            {"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps
        ]
        optimizer = torch.optim.AdamW(
            param_groups, weight_decay=self.cfg.optim.weight_decay, betas=tuple(self.cfg.optim.betas)
        )
        total = self.trainer.max_steps
        warmup = int(round(self.cfg.optim.warmup_ratio * total))
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self):
        rank_zero_info("trainable parameters:\n" + parameter_table(self.model))

    # ---- checkpoints: trainable state only -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lightning_sp_config"] = self.cfg_container()
        checkpoint["rng_states"] = rng.capture()

    def on_load_checkpoint(self, checkpoint):
        # strict_loading is off only so that frozen weights may be absent; a missing *trainable* tensor
        # (say, the projector) must still be an error, never a silently random module.
        if "state_dict" in checkpoint:  # absent under FSDP: FSDP2Strategy.load_checkpoint checked and loaded it
            self.check_trainable_keys(checkpoint["state_dict"])
        # Restored just before the first resumed step, after everything Lightning does on the way there.
        self._rng_to_restore = checkpoint.get("rng_states")

    def check_trainable_keys(self, keys) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(keys))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:5]}")

    def cfg_container(self):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(self.cfg, resolve=True)
