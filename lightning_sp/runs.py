"""A finished run, for inspection: find it, load its model, take validation samples, draw its attention maps.

    run = load_run()                      # the newest runs/*/*/ (or runs/*/) with checkpoints/last.ckpt
    batch = val_batch(run, batch_size=4)  # the first validation batch of the run's own data config
    maps = attention_maps(run, batch)     # lightning_sp.viz.AttentionMaps per sample

The model comes from `<run>/checkpoints/last.ckpt` alone (trainable tensors + `lightning_sp_config`; frozen
weights rebuilt from that config) through :func:`lightning_sp.module.load_module`. This is what
`notebooks/attention_maps.ipynb` calls; the notebook holds no logic of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.data.conversation import expanded_prompt_ids
from lightning_sp.data.prepare import ensure_synthetic
from lightning_sp.module import load_module
from lightning_sp.paths import anchored, resolve
from lightning_sp.train import build_datamodule
from lightning_sp.viz import compute_maps, compute_sample_maps, qa_markdown, question_markers, save_pngs

PathLike = Union[str, Path]
CHECKPOINT = Path("checkpoints") / "last.ckpt"
NO_RUN_HELP = (
    "No run with checkpoints/last.ckpt under {root}/. Train one first (a few minutes on CPU):\n"
    "    make train VARIANT=pooling\n"
    "or point RUN_DIR at a run directory (runs/<variant>/<timestamp>)."
)


@dataclass
class Run:
    run_dir: Path
    module: object  # LlavaSPModule, eval mode

    @property
    def cfg(self):
        return self.module.cfg

    @property
    def model(self):
        return self.module.model

    @property
    def tokenizer(self):
        return self.module.tokenizer

    def describe(self) -> str:
        cfg = self.cfg
        step = torch.load(self.run_dir / CHECKPOINT, map_location="cpu", weights_only=True).get("global_step")
        layout = self.model.projector.layout
        return (
            f"{self.run_dir}: projector {cfg.projector.name} ({layout.num_sp_tokens} SP tokens + "
            f"{layout.patch_grid[0]}x{layout.patch_grid[1]} patches), stage {cfg.stage.name}, step {step}"
        )


def latest_run(root: PathLike = "runs") -> Optional[Path]:
    """The run directory under `root` (`root/<variant>/<timestamp>/` or `root/<name>/`) whose last.ckpt is newest."""

    root = resolve(root)
    found = [p for pattern in ("*/*" / CHECKPOINT, "*" / CHECKPOINT) for p in root.glob(str(pattern))]
    if not found:
        return None
    return max(found, key=lambda p: p.stat().st_mtime).parent.parent


def load_run(run_dir: Optional[PathLike] = None, overrides: Iterable[str] = (), root: PathLike = "runs") -> Run:
    """Load a run's model from `<run_dir>/checkpoints/last.ckpt` (default: :func:`latest_run`); eval mode, CPU.
    `overrides` (`a.b=value`) change the stored config before building (say a local `model.llm.name_or_path`)."""

    if run_dir is None:
        run_dir = latest_run(root)
        if run_dir is None:
            raise FileNotFoundError(NO_RUN_HELP.format(root=root))
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT}; " + NO_RUN_HELP.format(root=root).split(". ", 1)[1])
    return Run(run_dir, load_module(run_dir, overrides))


def val_batch(run: Run, batch_size: int = 4) -> dict:
    """The first validation batch of the run's data config (regenerating synthetic data if it was removed)."""
    from omegaconf import OmegaConf

    cfg = run.cfg
    if not cfg.data.val_dir:
        raise ValueError(f"run {run.run_dir} has no data.val_dir: nothing to take samples from")
    # This process reads the batch itself: the requested size, no worker processes to start.
    data = {
        "train_dir": anchored(cfg.data.train_dir),
        "val_dir": anchored(cfg.data.val_dir),
        "val_batch_size": batch_size,
        "num_workers": 0,
    }
    if cfg.data.synthetic is not None:
        data["synthetic"] = {"raw_dir": anchored(cfg.data.synthetic.raw_dir)}
    cfg = OmegaConf.merge(cfg, {"data": data})
    if not (Path(cfg.data.val_dir) / "index.json").is_file():
        if cfg.data.synthetic is None:
            raise FileNotFoundError(f"validation shards {cfg.data.val_dir} are missing (data.val_dir of {run.run_dir})")
        ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)
    datamodule = build_datamodule(cfg, run.tokenizer, run.model.num_visual_tokens)
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


def prompt_ids(run: Run, question: str) -> torch.Tensor:
    """Prompt ids for a question of your own about an image, in the run's template, image placeholder expanded."""

    record = {
        "id": "custom",
        "image": "custom",
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}],
    }
    return expanded_prompt_ids(record, run.tokenizer, run.cfg.stage.template, run.model.num_visual_tokens)


def sample_maps(run: Run, batch: dict, index: int = 0, question: Optional[str] = None):
    """Attention maps of sample `index` of `batch`, asked its own question or `question` (then no target)."""

    if question is None:
        return attention_maps(run, batch, [index])[0]
    return compute_sample_maps(
        run.model,
        run.tokenizer,
        batch["pixel_values"][index],
        prompt_ids(run, question),
        sample_id=str(batch["ids"][index]) if "ids" in batch else str(index),
        max_new_tokens=run.cfg.eval.max_new_tokens,
        markers=question_markers(run.cfg.stage.template),
    )


def export_pngs(
    run: Run, out_dir: PathLike, index: int = 0, prefix: Optional[str] = None, batch_size: int = 4
) -> list[Path]:
    """PNGs of the maps of validation sample `index` (``<prefix>_dfi.png``, ``<prefix>_llm.png``) plus
    ``<prefix>_qa.md``; prefix defaults to the projector name."""

    maps = sample_maps(run, val_batch(run, batch_size), index)
    prefix = prefix or run.cfg.projector.name
    paths = save_pngs(maps, out_dir, prefix)
    qa = Path(out_dir) / f"{prefix}_qa.md"
    qa.write_text(qa_markdown(maps) + "\n")
    return [*paths, qa]


def attention_maps(run: Run, batch: dict, indices: Optional[Sequence[int]] = None):
    """:func:`lightning_sp.viz.compute_maps` with the run's generation length and question markers."""

    return compute_maps(
        run.model,
        run.tokenizer,
        batch,
        indices,
        max_new_tokens=run.cfg.eval.max_new_tokens,
        markers=question_markers(run.cfg.stage.template),
    )
