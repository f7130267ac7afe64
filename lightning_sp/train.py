"""`train(cfg) -> metrics`: build the model, the data and the Lightning Trainer, fit, summarise."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lightning_sp import config as config_lib
from lightning_sp.callbacks import AttentionMapLogger, AttentionMetrics
from lightning_sp.callbacks.checkpointing import BestAndLastCheckpoint
from lightning_sp.callbacks.nonfinite import NonFiniteGuard
from lightning_sp.callbacks.skip_limit import SkipLimit
from lightning_sp.callbacks.throughput import throughput_monitor
from lightning_sp.checkpoint import checkpoint_step, is_sharded_checkpoint
from lightning_sp.data.checks import check_data_paths
from lightning_sp.data.datamodule import ShardDataModule
from lightning_sp.data.prepare import ensure_synthetic
from lightning_sp.distributed import RankSummary, build_strategy
from lightning_sp.global_batch import check_global_batch
from lightning_sp.models.vision import image_stats
from lightning_sp.module import LlavaSPModule
from lightning_sp.paths import resolve
from lightning_sp.ranks import launched_rank
from lightning_sp.stats import VAL_QUESTIONS, write_questions
from lightning_sp.warm_start import warm_start

log = logging.getLogger(__name__)

# Two Lightning warnings that are false for our fit, silenced around `trainer.fit` only (the caller's process keeps
# its own filters):
# - the frozen vision tower is kept in eval mode on purpose (no dropout, whatever Lightning asks);
# - Lightning warns on any mid-epoch resume unless the DataLoader object has state_dict(). Our stream position is
#   not a DataLoader's: it is the datamodule's (data/train_stream.py: epoch, samples consumed per rank, the
#   shuffle RNG), saved and restored exactly through LightningDataModule.state_dict, which Lightning does not
#   consult for this warning.
_FALSE_FIT_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    "You're resuming from a checkpoint that ended before the epoch ended",
)


RUN_DIR_ENV = "LIGHTNING_SP_RUN_DIR"  # rank 0's timestamped run directory, inherited by the ranks it launches


def run_dir_for(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if launched_rank() != 0 and os.environ.get(RUN_DIR_ENV):  # a later timestamp would split the run in two
        return Path(os.environ[RUN_DIR_ENV])
    return Path("runs") / cfg.choices.get("variant", cfg.projector.name) / datetime.now().strftime("%Y%m%d-%H%M%S")


def build_datamodule(cfg: DictConfig, tokenizer, num_visual_tokens: int) -> ShardDataModule:
    data = cfg.data
    # The encoder's own normalisation (and LLaVA's pad colour, its mean), from the config: no model needed.
    stats = image_stats(cfg.model.vision)
    return ShardDataModule(
        train_dir=data.train_dir,
        val_dir=data.val_dir,
        tokenizer=tokenizer,
        template=cfg.stage.template,
        num_visual_tokens=num_visual_tokens,
        image_size=cfg.model.vision.image_size,
        image_stats=stats,
        batch_size=data.batch_size,
        val_batch_size=data.val_batch_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        length_group_batches=data.length_group_batches,
        max_length=data.max_length,
        seed=cfg.seed,
        # Sharded weights all-gather in every forward: each rank must run the same number of val batches.
        equal_val_shares=cfg.trainer.strategy == "fsdp",
    )


def validates(cfg: DictConfig) -> bool:
    """Whether a run validates at all (a validation split, and not limit_val_batches=0)."""
    return cfg.data.val_dir is not None and cfg.trainer.limit_val_batches != 0


def viz_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Attention-map images in TensorBoard (`viz` config section; lightning_sp/callbacks/attention.py)."""
    if not cfg.viz.enabled:
        return []

    return [
        AttentionMapLogger(every_n_val=cfg.viz.every_n_val, num_images=cfg.viz.num_images),
        AttentionMetrics(max_questions=cfg.viz.attention_questions),
    ]


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    t = cfg.trainer
    checkpoint = BestAndLastCheckpoint(
        run_dir / "checkpoints",
        save_top_k=cfg.save_top_k,
        validates=validates(cfg),
        every_n_train_steps=t.val_check_interval,
    )
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        max_epochs=t.max_epochs,
        fast_dev_run=t.fast_dev_run,
        deterministic=t.deterministic,
        profiler=t.profiler,
        strategy=build_strategy(cfg),
        precision=t.precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar,
        # No placeholder hp_metric: the HPARAMS tab gets the real final metrics at the end (log_hparams).
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False),
        callbacks=[
            checkpoint,
            LearningRateMonitor(logging_interval="step"),
            throughput_monitor(t.log_every_n_steps),
            RankSummary(run_dir),
            NonFiniteGuard(),
            SkipLimit(cfg.data.max_skipped_fraction),
            *viz_callbacks(cfg),
        ],
        default_root_dir=str(run_dir),
        inference_mode=t.strategy != "fsdp",  # FSDP's all-gathered weights must not become inference tensors
    )


def run_summary(module: LlavaSPModule, trainer: L.Trainer, cfg: DictConfig, fit_seconds: float) -> dict[str, float]:
    """Size and speed of a run, for ablation tables (lightning_sp/ablate.py): parameter counts, visual tokens,
    fit time (validation included) and the samples and non-padding tokens per second it amounts to, over this
    fit's own steps (a resumed run counts from its resume). Every rank must call it (a sum over ranks)."""
    params = list(module.model.named_parameters())
    counted = torch.tensor([module.samples_trained, module.tokens_trained], dtype=torch.float64, device=module.device)
    samples, tokens = (float(x) for x in trainer.strategy.reduce(counted, reduce_op="sum"))
    return {
        "num_visual_tokens": float(module.model.num_visual_tokens),
        "params/total": float(sum(p.numel() for _, p in params)),
        "params/trainable": float(sum(p.numel() for _, p in params if p.requires_grad)),
        "params/projector": float(sum(p.numel() for n, p in params if n.startswith("projector."))),
        "global_step": float(trainer.global_step),
        "fit_time_s": fit_seconds,
        "fit_samples_per_sec": samples / fit_seconds if fit_seconds > 0 else 0.0,
        "fit_tokens_per_sec": tokens / fit_seconds if fit_seconds > 0 else 0.0,
    }


# ---- TensorBoard's HPARAMS tab ----------------------------------------------------------------------------------

HPARAM_KEYS = (
    "seed",
    "stage.name",
    "stage.lora",
    "stage.full_llm",
    "data.batch_size",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "optim.lr_projector",
    "optim.lr_sp_conv",
    "optim.lr_lora",
    "optim.lr_llm",
    "optim.warmup_ratio",
    "model.vision.hidden_size",
    "model.vision.num_layers",
    "model.vision.backbone",
    "model.llm.hidden_size",
    "model.llm.num_layers",
)
NOT_HPARAMS = ("run_dir", "resume", "choices.variant")  # where and how a run ran; the variant is `variant`


def hyperparameters(cfg: DictConfig) -> dict:
    """The flat dict a run shows in TensorBoard's HPARAMS tab: ``variant``, every ``projector.*`` field,
    :data:`HPARAM_KEYS`, and every other key whose value differs from the default config's (a command-line or
    study override, or what a selected group file sets), so that runs differing in any key differ there."""
    flat = config_lib.flatten(OmegaConf.to_container(cfg, resolve=True))
    default = config_lib.flatten(OmegaConf.to_container(config_lib.compose(), resolve=True))
    params = {"variant": cfg.choices.get("variant", cfg.projector.name)}
    params.update(
        {
            k: v
            for k, v in flat.items()
            if k in HPARAM_KEYS
            or k.startswith("projector.")
            or (k not in NOT_HPARAMS and (k not in default or v != default[k]))
        }
    )
    return params


def log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Hyperparameters with the run's final validation metrics and train loss, so that runs compare in the
    HPARAMS tab. Lightning's logger writes the metrics as scalars too (the tab reads them from there), at the last
    step: the same values the last validation logged."""
    final = {k: v for k, v in metrics.items() if k.startswith("val/") or k == "train/loss"}
    trainer.logger.log_hyperparams(hyperparameters(cfg), metrics=final, step=trainer.global_step)
    trainer.logger.finalize("success")  # the fit's end closed the event file; this writes and closes the new one


def _readable_step(path: Path) -> int | None:
    """`checkpoint_step`, or None (with a warning) when the checkpoint cannot be read."""
    try:
        return checkpoint_step(path)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is skipped, and said so
        log.warning("resume=auto: skipping unreadable checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
        return None


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint `resume=` names: None (fresh), `auto` or an explicit path.

    `auto` takes the readable checkpoint of `run_dir/checkpoints` with the highest step (last.ckpt when it is
    intact). A checkpoint that cannot be read (a sharded save cut short by a kill, a full disk, a copy cut short) is
    skipped with a warning, so the run continues from the newest whole one."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        directory = run_dir / "checkpoints"
        found = sorted(directory.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name))
        steps = {p: step for p in found if (step := _readable_step(p)) is not None}
        if not steps:
            log.info("resume=auto: no complete checkpoint in %s yet, starting fresh", directory)
            return None
        best = max(steps, key=steps.get)  # ties: last.ckpt, sorted first
        log.info("resume=auto: continuing from %s (step %d)", best, steps[best])
        return str(best)
    path = resolve(cfg.resume)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(
            f"resume={cfg.resume}: no such checkpoint file or sharded checkpoint directory (use "
            "resume=auto or a .ckpt path)"
        )
    return str(path)


def gathered_checkpoint_warning(cfg: DictConfig, module: LlavaSPModule) -> str | None:
    """What a full fine-tune under FSDP without sharded checkpoints costs at every checkpoint, or None. Left null,
    trainer.sharded_checkpoints is on exactly there (config._fill_open_defaults); this speaks when a user turned
    it off."""
    if not (cfg.stage.full_llm and cfg.trainer.strategy == "fsdp") or cfg.trainer.sharded_checkpoints:
        return None
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return (
        f"stage.full_llm=true under trainer.strategy=fsdp with trainer.sharded_checkpoints=false: every checkpoint "
        f"is gathered on rank 0, {trainable / 1e9:.2f} B trainable parameters x 12 bytes (fp32 weight + AdamW's "
        f"two fp32 moments) = {trainable * 12 / 1e9:.1f} GB through rank 0's host memory each time; set "
        f"trainer.sharded_checkpoints=true to write per-rank shards instead (nothing gathered)"
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one run; returns the final logged metrics (also written to `<run_dir>/metrics.json`)."""
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if launched_rank() == 0:
        os.environ[RUN_DIR_ENV] = str(run_dir)
        config_lib.save(cfg, run_dir / "config.yaml")
        log.info("run directory %s (resolved config in config.yaml)", run_dir)

    if cfg.data.synthetic is not None:
        ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)
    check_data_paths(cfg)  # missing shards fail here, before any model is built
    module = LlavaSPModule(cfg)  # loads the config's tokenizer
    tokenizer = module.tokenizer
    if launched_rank() == 0 and (message := gathered_checkpoint_warning(cfg, module)):
        log.warning(message)
    if cfg.init:  # warm start: weights only; optimizer, schedule and step start fresh
        warm_start(module, resolve(cfg.init), cfg)
    datamodule = build_datamodule(cfg, tokenizer, module.model.num_visual_tokens)
    trainer = build_trainer(cfg, run_dir)
    check_global_batch(cfg, trainer.world_size)  # trainer.global_batch_size, devices now resolved
    if launched_rank() == 0:
        log.info(
            "global batch %d = %d per device x %d devices x %d accumulation",
            trainer.world_size * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches,
            cfg.data.batch_size,
            trainer.world_size,
            cfg.trainer.accumulate_grad_batches,
        )
    fit_started = time.perf_counter()
    ckpt_path = resume_checkpoint(cfg, run_dir)
    with warnings.catch_warnings():
        # Resuming writes into the run's own checkpoint directory by design: Lightning's "exists and is not
        # empty" is then false (for a fresh run in a used run_dir it stays, and is true).
        resumed = (r"Checkpoint directory .* exists and is not empty",) if ckpt_path else ()
        for message in _FALSE_FIT_WARNINGS + resumed:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True
        )  # resume never unpickles code, whatever torch's default or environment
    fit_seconds = time.perf_counter() - fit_started

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(run_summary(module, trainer, cfg, fit_seconds))
    metrics["wall_time_s"] = time.perf_counter() - started
    if trainer.is_global_zero:
        if module.val_questions:  # before metrics.json, which marks the run finished (ablate.py reads both)
            write_questions(run_dir / VAL_QUESTIONS, module.val_questions)
        log_hparams(trainer, cfg, metrics)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("train/loss", "val/loss", "val/accuracy") if k in metrics)
        print(f"run finished in {metrics['wall_time_s']:.0f}s: {shown} -> {run_dir}", flush=True)
    leave_process_group()
    return metrics


def leave_process_group() -> None:
    """Close the run's process group before the interpreter exits. Left to interpreter shutdown, a rank whose
    peer (rank 0 hosts the rendezvous store) has already exited can abort in gloo's thread teardown ("terminate
    called without an active exception", exit -6) after a successful run; seen with one process per node."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody leaves while a peer may still talk to the store
        torch.distributed.destroy_process_group()


def train_from_overrides(overrides: list[str], config_files: list[str] = ()) -> dict[str, float]:
    return train(config_lib.compose(overrides, config_files=config_files))
