"""LightningModule: stage-aware trainable sets, AdamW param groups, cosine schedule, trainable-only checkpoints."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from transformers import get_cosine_schedule_with_warmup, get_wsd_schedule

from lightning_sp import config as config_lib
from lightning_sp import rng
from lightning_sp.callbacks.throughput import batch_samples, batch_tokens
from lightning_sp.checkpoint import checkpoint_config, read_checkpoint, resolve_checkpoint
from lightning_sp.constants import IGNORE_INDEX, supervised_logit_positions
from lightning_sp.data.tokenizer import run_tokenizer
from lightning_sp.distributed import BF16_PRECISIONS, FSDP2Strategy, describe_units, shard_model
from lightning_sp.models.vlm import LlavaSP
from lightning_sp.ranks import gather_objects
from lightning_sp.trainable import llm_part, parameter_table, set_trainable

log = logging.getLogger(__name__)


def optimizer_groups(model) -> dict[str, list]:
    """Trainable parameters by optimizer group: `sp_conv` (what the projector declares, see
    Projector.sp_conv_parameters), `projector` (the rest of it), `lora` (the LLM's adapters and peft's saved
    modules) and `llm` (the LLM's own weights, trained in full under stage.full_llm)."""
    sp_conv = {id(p) for p in model.projector.sp_conv_parameters()}
    groups = {"projector": [], "sp_conv": [], "lora": [], "llm": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("projector."):
            group = "sp_conv" if id(p) in sp_conv else "projector"
        else:
            group = "llm" if llm_part(name) == "base" else "lora"
        groups[group].append(p)
    return groups


def teacher_forced_hits(logits: torch.Tensor, labels: torch.Tensor, logit_positions: torch.Tensor) -> torch.Tensor:
    """Teacher-forced exact match per sample: True iff the argmax predicts the label at every supervised position
    of the sample's last answer -- its tokens and the end-of-turn token after them.

    ``logits`` (B, P, V) are :meth:`LlavaSP.forward`'s, at the columns ``logit_positions`` (P, shared by the batch):
    column j holds the prediction of token ``logit_positions[j] + 1`` of every row. Each row's supervised targets
    are among those columns (the positions are the union over rows); columns another row needed are ignored.

    Equal to greedy decoding + exact token match (tests/test_val_scoring.py): greedy emits the reference answer
    then stops iff at each step the argmax given the reference prefix is the next reference token, EOS last; a
    wrong token, a missing EOS (decoding would run on) or an early one fails both. Only the last answer is scored
    because greedy decoding answers the last question, with the earlier reference answers in its prompt. A
    template without an end-of-turn token (``plain``) has nothing that marks where greedy output would stop.
    """
    supervised = labels != IGNORE_INDEX
    index = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(supervised, index, -1).amax(dim=1, keepdim=True)  # the last answer's end-of-turn token
    # The last answer starts after the last unsupervised position before its end (earlier turns lie before it).
    start = torch.where(~supervised & (index < last), index, -1).amax(dim=1, keepdim=True) + 1
    scored = supervised & (index >= start)
    targets = labels[:, 1:].index_select(1, logit_positions)  # column j predicts token logit_positions[j] + 1
    scored = scored[:, 1:].index_select(1, logit_positions)
    wrong = (logits.argmax(dim=-1) != targets) & scored
    return ~wrong.any(dim=1)


class LlavaSPModule(L.LightningModule):
    """`cfg`: the run config (a DictConfig, or the plain dict a checkpoint's `hyper_parameters` hold, which
    `LlavaSPModule.load_from_checkpoint(path)` passes back); `tokenizer`: loaded from `cfg.model.tokenizer` if None."""

    # No FLOP count per batch: Lightning's ThroughputMonitor then logs samples and tokens per second without MFU
    # (MFU on GPUs is what benchmarks/gpu_step_bench.py measures, with an explicit FLOP model).
    flops_per_batch = None

    def __init__(self, cfg, tokenizer=None) -> None:
        super().__init__()
        if not isinstance(cfg, DictConfig):
            cfg = config_lib.from_container(cfg, "checkpoint hyper_parameters")
        self.cfg = cfg
        # Plain data only: checkpoints are read with torch.load(weights_only=True), which refuses a DictConfig.
        # Not sent to the logger: train.log_hparams logs the keys that differ between runs, with final metrics.
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)}, logger=False)
        self.tokenizer = tokenizer if tokenizer is not None else run_tokenizer(cfg)
        self.model = LlavaSP.from_config(cfg, self.tokenizer)
        set_trainable(self.model, cfg.stage)
        # Checkpoints hold trainable state only; frozen weights are rebuilt from the config on load.
        self.strict_loading = False
        self._val_questions: list[tuple[str, str, bool]] = []  # (record id, qtype, hit) of this rank, this epoch
        self.val_questions: list[dict] = []  # every rank's, of the last validation: {"id", "qtype", "hit"}
        self.samples_trained = self.tokens_trained = 0  # training batches this process ran, this fit
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
        self.log(
            "train/skipped_records",
            float(batch.get("skipped", 0)),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            batch_size=bs,
            sync_dist=True,
        )  # summed over ranks too
        return out.loss

    def on_train_batch_start(self, batch, batch_idx):
        if self._rng_to_restore is not None:
            rng.restore(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # this fit's averages (train.run_summary), counted as ThroughputMonitor counts its window
        self.samples_trained += batch_samples(batch)
        self.tokens_trained += batch_tokens(batch)

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step % self.trainer.log_every_n_steps:
            return
        # The norm before clipping, over every trainable tensor: what gradient_clip_val compares against. Every
        # rank computes it (sharded gradients need the collective), on logging steps only.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            if hasattr(total, "full_tensor"):  # a DTensor under FSDP2
                total = total.full_tensor()
            self.log("train/grad_norm", total, batch_size=1)
        if self.device.type == "cuda":
            self.log("train/max_memory_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, batch_size=1)

    # ---- validation: teacher-forced loss and exact match from one forward -------------------------------------
    def validation_step(self, batch, batch_idx):
        bs = batch["input_ids"].shape[0]
        labels = batch["labels"]
        positions = batch.get("logit_positions")
        if positions is None:  # the model would compute the same; the hits need to know which columns it kept
            positions = supervised_logit_positions(labels)
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=labels,
            logit_positions=positions,
        )
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=True)
        hits = teacher_forced_hits(out.logits, labels, positions).tolist()
        self._val_questions.extend(zip(batch["ids"], batch["qtypes"], hits))

    @property
    def ranks_in_lockstep(self) -> bool:
        """Weights sharded by FSDP over several processes: every forward all-gathers, so every rank must run the same
        forwards (decoding steps, attention passes) even when it has nothing to compute."""
        return self._fsdp_units is not None and self._trainer is not None and self.trainer.world_size > 1

    def generate_tokens(
        self, batch, max_new_tokens: Optional[int] = None, streamer=None, stop_strings: Sequence[str] = ()
    ) -> torch.Tensor:
        """Greedy new tokens for the batch's left-padded prompts (B, <= max_new_tokens, default
        eval.max_new_tokens), pad after EOS; decoding also stops at ``stop_strings``. The module's greedy decoding
        call, over ``LlavaSP.generate_batch`` (which the attention maps share): evaluation (``inference.Predictor``),
        the lmms-eval adapter and ``generate`` go through here; validation scores by :func:`teacher_forced_hits`,
        which tests/test_val_scoring.py proves equal to this."""
        return self.model.generate_batch(
            batch,
            self.tokenizer,
            max_new_tokens or self.cfg.eval.max_new_tokens,
            # Sharded weights: every rank must run the same number of decoding steps (all-gathers in each).
            synced_gpus=self.ranks_in_lockstep,
            streamer=streamer,
            stop_strings=stop_strings,
        )

    def on_validation_epoch_end(self):
        # Every rank gathers all questions, so every rank logs the same keys (a question type seen on one rank
        # only would otherwise leave the ranks' sync_dist collectives mismatched) and accuracies are weighted by
        # question, not averaged per rank. Ranks hold disjoint questions (datamodule.split_samples).
        questions = [q for rank in gather_objects(self._val_questions) for q in rank]
        self._val_questions = []
        self.val_questions = [{"id": rid, "qtype": qtype, "hit": int(hit)} for rid, qtype, hit in questions]
        counts = defaultdict(lambda: [0, 0])
        for _, qtype, hit in questions:
            for key in ("all", qtype):
                counts[key][0] += hit
                counts[key][1] += 1
        for key, (h, n) in sorted(counts.items()):
            name = "val/accuracy" if key == "all" else f"val/accuracy_{key}"
            self.log(name, torch.tensor(h / n, dtype=torch.float32), prog_bar=key == "all", sync_dist=True)

    # ---- sharding (trainer.strategy=fsdp) --------------------------------------------------------------------
    def configure_model(self):
        """FSDP2 wrap (lightning_sp/distributed.py) under FSDP2Strategy; nothing under DDP or a single device.
        Lightning calls this before configure_optimizers, and again for each later fit/validate: idempotent."""

        if self._fsdp_units is not None or self._trainer is None:  # load_from_checkpoint calls it trainer-less
            return
        if not isinstance(self.trainer.strategy, FSDP2Strategy):
            return
        bf16 = str(self.trainer.precision) in BF16_PRECISIONS
        self._fsdp_units = shard_model(self.model, self.device_mesh["data_parallel"], bf16=bf16)
        rank_zero_info(
            f"FSDP2 units ({'bf16 compute, fp32 reduce' if bf16 else 'fp32'}):\n" + describe_units(self._fsdp_units)
        )

    # ---- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = optimizer_groups(self.model)  # after sharding: the projector hands out its DTensor parameters
        if self._fsdp_units is not None:  # the optimizer must hold the sharded parameters, not stale originals
            from torch.distributed.tensor import DTensor

            plain = [n for n, p in self.model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
            if plain:
                raise RuntimeError(f"configure_optimizers ran before sharding: {plain[:3]} are not DTensors")
        optim = self.cfg.optim
        lr_sp_conv = optim.lr_sp_conv if optim.lr_sp_conv is not None else optim.lr_projector
        lrs = {"projector": optim.lr_projector, "sp_conv": lr_sp_conv, "lora": optim.lr_lora, "llm": optim.lr_llm}
        param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps]
        optimizer = torch.optim.AdamW(
            param_groups, weight_decay=self.cfg.optim.weight_decay, betas=tuple(self.cfg.optim.betas)
        )
        total = self.trainer.max_steps
        warmup = int(round(self.cfg.optim.warmup_ratio * total))
        if self.cfg.optim.schedule == "wsd":
            decay = int(round(self.cfg.optim.decay_ratio * total))
            scheduler = get_wsd_schedule(optimizer, warmup, decay, num_training_steps=total)
        else:
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
            # The frozen weights were rebuilt from the config in __init__; handing them to the state-dict load
            # makes it complete, so neither Lightning (resume, load_from_checkpoint) nor anyone else lists every
            # frozen tensor as "missing". References, not copies.
            for name, tensor in self.state_dict(keep_vars=False).items():
                checkpoint["state_dict"].setdefault(name, tensor)
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


def load_module(path: str | Path, overrides: Iterable[str] = (), tokenizer=None) -> LlavaSPModule:
    """Rebuild `LlavaSPModule` from a checkpoint (config + frozen weights from their sources) and load its
    trainable tensors strictly: every trainable parameter must be in the file and nothing else may be.

    `overrides` change the stored config before building (say `model.llm.dtype=float32`, or a local
    `model.llm.name_or_path`). Returns the module in eval mode.
    """
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, overrides)
    module = LlavaSPModule(cfg, tokenizer)  # tokenizer None: the module loads the config's
    module.on_load_checkpoint(ckpt)  # raises if a trainable tensor is missing
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    if result.unexpected_keys:
        raise KeyError(
            f"{resolve_checkpoint(path)} holds {len(result.unexpected_keys)} tensors this model does not "
            f"have, e.g. {sorted(result.unexpected_keys)[:5]}"
        )
    module.eval()
    return module
