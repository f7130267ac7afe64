"""`AttentionMapLogger`: after validation, draw what the model attends to for a few fixed validation images.

The images are the first `num_images` samples with an image of the first validation batch (later batches fill
in if it has fewer), kept on CPU the first time validation runs, so every later picture shows the same samples
and their maps can be compared across steps.
Every `every_n_val`-th validation (sanity checks excluded) it runs :func:`lightning_sp.viz.compute_maps` on
them -- greedy generation plus ONE eager-attention forward per image, outside the training step, so the
training graph and its attention kernel are untouched -- and logs to TensorBoard:

    attention/<kind>/<i>   image: SP-token attention (kind `dfi`, or `extractor` for attending SP arms
                           without DFI); absent for projectors without one (mlp, conv49, SFE without DFI)
    attention/llm/<i>      image: answer -> patch tokens over the image, answer -> SP tokens as bars
    attention/qa/<i>       text: sample id, question, target, prediction
    attention/llm_sp_share, attention/llm_visual_share   scalars: mean share of the answer's attention on the
                           SP tokens / on all visual tokens (of these images; the same questions over the whole
                           validation split are `val/attention_*`, callbacks/attention_metrics.py)

Every rank computes the same number of samples (the minimum over ranks) with generation synced under FSDP:
a sharded model would hang if only one rank ran a forward. Rank zero logs. A failure is reported as a warning
and training goes on: a plotting problem must not end a long run.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_sp.viz import compute_sample_maps, qa_markdown, question_markers, render_llm, render_sp_attention

log = logging.getLogger(__name__)


def image_samples(batch: dict, limit: int) -> list[dict]:
    """Up to `limit` samples with an image from an eval batch, as CPU copies with the prompt unpadded."""
    if "prompt_ids" not in batch or "pixel_values" not in batch:
        return []
    out = []
    has_image = batch.get("has_image")
    for i in range(batch["pixel_values"].shape[0]):
        if len(out) == limit:
            break
        if has_image is not None and not bool(has_image[i]):
            continue
        prompt = batch["prompt_ids"][i][batch["prompt_attention_mask"][i].bool()]
        out.append(
            {
                "pixel_values": batch["pixel_values"][i].detach().cpu().clone(),
                "prompt_ids": prompt.detach().cpu().clone(),
                "target": batch["answers"][i] if "answers" in batch else None,
                "sample_id": str(batch["ids"][i]) if "ids" in batch else str(i),
                "qtype": str(batch["qtypes"][i]) if "qtypes" in batch else "",
            }
        )
    return out


class AttentionMapLogger(L.Callback):
    def __init__(self, every_n_val: int = 1, num_images: int = 2, max_new_tokens: Optional[int] = None) -> None:
        if every_n_val < 1 or num_images < 1:
            raise ValueError(f"every_n_val and num_images must be >= 1, got {every_n_val}, {num_images}")
        self.every_n_val, self.num_images, self.max_new_tokens = every_n_val, num_images, max_new_tokens
        self.kept: list[dict] = []
        self.val_runs = 0

    # ---- state: the count survives a resume, so the logging cadence does too -----------------------------
    def state_dict(self) -> dict:
        return {"val_runs": self.val_runs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))

    # ---- hooks --------------------------------------------------------------------------------------------
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if len(self.kept) < self.num_images and dataloader_idx == 0:
            self.kept += image_samples(batch, self.num_images - len(self.kept))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.val_runs % self.every_n_val:
            return
        started = time.perf_counter()
        try:
            maps = self.compute(trainer, pl_module)
        except Exception as e:  # noqa: BLE001 -- see the module docstring
            log.warning("attention maps failed at step %d", trainer.global_step, exc_info=True)
            rank_zero_warn(f"AttentionMapLogger: attention maps failed at step {trainer.global_step}: {e!r}")
            return
        if trainer.is_global_zero and maps:
            self.log_maps(trainer, maps)
        log.info("attention maps for %d images in %.1fs", len(maps), time.perf_counter() - started)

    def compute(self, trainer, pl_module) -> list:
        count = torch.tensor(len(self.kept), device=pl_module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)  # same forwards on every rank
        cfg = pl_module.cfg
        sharded = pl_module.ranks_in_lockstep
        return [
            compute_sample_maps(
                pl_module.model,
                pl_module.tokenizer,
                **sample,
                synced_gpus=sharded,
                max_new_tokens=self.max_new_tokens or cfg.eval.max_new_tokens,
                markers=question_markers(cfg.stage.template),
            )
            for sample in self.kept[: int(count)]
        ]

    def log_maps(self, trainer, maps: list) -> None:
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        step = trainer.global_step
        pictures = [(m, render_sp_attention(m), render_llm(m), qa_markdown(m)) for m in maps]
        visual_share = sum(m.llm_visual_share for m in maps) / len(maps)
        sp_share = sum(float(m.llm_sp.sum()) for m in maps) / len(maps) if maps[0].num_sp_tokens else None
        for writer in writers:
            for i, (m, sp, llm, qa) in enumerate(pictures):
                if sp is not None:
                    writer.add_image(f"attention/{m.sp_attention_kind}/{i}", sp, step, dataformats="HWC")
                writer.add_image(f"attention/llm/{i}", llm, step, dataformats="HWC")
                writer.add_text(f"attention/qa/{i}", qa, step)
            writer.add_scalar("attention/llm_visual_share", visual_share, step)
            if sp_share is not None:
                writer.add_scalar("attention/llm_sp_share", sp_share, step)
            writer.flush()
