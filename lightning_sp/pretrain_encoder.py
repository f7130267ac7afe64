"""Pretrain the embedded default's tiny vision encoder: CLIP's contrastive objective on synthetic scenes.

Real LLaVA starts from a pretrained CLIP, whose patch features already separate objects and places. A random-init
tower's features are mostly one shared component, and the tiny LLM then spends most of a CPU budget learning to
look (README, "what it learns"). This script gives the embedded default what CLIP gives LLaVA, made here, offline,
in minutes, and shipped small in ``data/encoder`` (``make encoder`` rebuilds it; the recipe and a checksum are
written beside the weights).

What it learns from -- never the VQA questions or answers:
- images rendered by :func:`synthetic.render` from scenes drawn by :func:`synthetic.sample_scene` under their own
  seed namespace (``encoder:<seed>:<step>``), JPEG-encoded and preprocessed exactly as training images are;
- for each image, its caption as a *set of facts*, one (colour, shape, cell) per object.
Each batch holds pairs of scenes with the same objects in different cells: a caption is then matched only by an
encoder that knows where things are, not just which things are there (random batches almost never need that).

The caption encoder is one embedding per fact (6 colours x 3 shapes x 9 cells), summed over the scene's facts: a
caption here is an unordered set, so a text transformer would add parameters and nothing else. The image side is
CLIP's: the pooled (post-LayerNorm CLS) output of the vision model through a bias-free projection; the loss is
CLIP's symmetric InfoNCE with a learned temperature (``transformers``' ``clip_loss``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionModel, get_cosine_schedule_with_warmup
from transformers.models.clip.modeling_clip import clip_loss

from lightning_sp import config as config_lib
from lightning_sp.data import synthetic
from lightning_sp.data.images import ImageProcessor
from lightning_sp.models.vision import build_vision

log = logging.getLogger(__name__)

NUM_CELLS = 9
FACTS = [(c, s, cell) for c in synthetic.COLOURS for s in synthetic.SHAPES for cell in range(NUM_CELLS)]
FACT_INDEX = {fact: i for i, fact in enumerate(FACTS)}
WEIGHTS_FILE = "model.safetensors"


def moved(scene: synthetic.Scene, rng: random.Random) -> synthetic.Scene:
    """The same objects (colour, shape, size, jitter) in other cells: a hard negative for position."""
    while True:
        cells = rng.sample(range(NUM_CELLS), len(scene.items))
        items = tuple(
            synthetic.Item(it.colour, it.shape, cell // 3, cell % 3, it.dx, it.dy, it.half)
            for it, cell in zip(scene.items, cells)
        )
        other = synthetic.Scene(items, scene.background)
        if other.layout() != scene.layout():
            return other


def fact_ids(scene: synthetic.Scene) -> list[int]:
    return [FACT_INDEX[(it.colour, it.shape, it.row * 3 + it.col)] for it in scene.items]


class SceneBatches(torch.utils.data.IterableDataset):
    """Endless (pixels (B,3,S,S), facts (B, NUM_FACTS) multi-hot) batches of scene pairs, deterministic per step."""

    def __init__(self, batch_size: int, image_size: int, seed: int, start: int = 0) -> None:
        super().__init__()
        if batch_size % 2:
            raise ValueError(f"batch size must be even (scenes come in pairs), got {batch_size}")
        self.batch_size, self.image_size, self.seed, self.start = batch_size, image_size, seed, start
        self.process = ImageProcessor(image_size)

    def image(self, scene: synthetic.Scene) -> torch.Tensor:
        buffer = io.BytesIO()  # the JPEG round trip of the training data (synthetic.generate, quality 95)
        synthetic.render(scene, self.image_size).save(buffer, format="JPEG", quality=95)
        return self.process(buffer.getvalue())

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"encoder:{self.seed}:{step}")
        scenes = []
        for _ in range(self.batch_size // 2):
            scene = synthetic.sample_scene(rng)
            scenes += [scene, moved(scene, rng)]
        facts = torch.zeros(len(scenes), len(FACTS))
        for row, scene in enumerate(scenes):
            facts[row, fact_ids(scene)] = 1.0
        return torch.stack([self.image(s) for s in scenes]), facts

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


class SceneCLIP(nn.Module):
    """Vision tower (trained here) + projection, and the fact-set caption encoder, in a shared embedding space."""

    def __init__(self, vision: CLIPVisionModel, embed_dim: int = 64, position_layer: int | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.visual_projection = nn.Linear(vision.config.hidden_size, embed_dim, bias=False)
        self.fact_embedding = nn.Linear(len(FACTS), embed_dim, bias=False)  # multi-hot @ table = sum of facts
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        # Optional self-supervised position task: from each patch's feature at `position_layer` (the layer the
        # projector reads), a linear head names the patch's own place on the grid.
        self.position_layer = position_layer
        grid = vision.config.image_size // vision.config.patch_size
        self.position_head = nn.Linear(vision.config.hidden_size, grid * grid) if position_layer is not None else None
        self.last_position_loss: torch.Tensor | None = None

    def logits(self, pixels: torch.Tensor, facts: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels, output_hidden_states=self.position_head is not None)
        if self.position_head is not None:
            patches = out.hidden_states[self.position_layer][:, 1:]  # (B, G*G, C), CLS dropped as the projector does
            places = torch.arange(patches.shape[1], device=patches.device).repeat(patches.shape[0])
            self.last_position_loss = F.cross_entropy(self.position_head(patches).flatten(0, 1), places)
        image = F.normalize(self.visual_projection(out.pooler_output), dim=-1)
        text = F.normalize(self.fact_embedding(facts), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * text @ image.t()  # (captions, images), as CLIPModel


@torch.no_grad()
def retrieval_accuracy(model: SceneCLIP, pixels: torch.Tensor, facts: torch.Tensor) -> float:
    """Top-1 caption -> image accuracy within a batch of pairs (chance: 1/B; ignoring positions: <= 1/2)."""
    logits = model.logits(pixels, facts)
    return (logits.argmax(dim=1) == torch.arange(len(facts))).float().mean().item()


def pretrain(
    out: Path,
    overrides: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    position_weight: float = 0.0,
) -> dict:
    cfg = config_lib.compose(overrides)
    vision_cfg = cfg.model.vision
    if vision_cfg.name_or_path:
        raise ValueError(
            f"model.vision.name_or_path={vision_cfg.name_or_path}: this script pretrains the random-init "
            "encoder the config describes; run it with model.vision.name_or_path=null"
        )
    torch.manual_seed(seed)
    tower = build_vision(vision_cfg)  # the embedded default's own init (sincos positions included)
    vision = tower.model.requires_grad_(True).train()
    model = SceneCLIP(vision, position_layer=vision_cfg.select_layer if position_weight > 0 else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    held_out = SceneBatches(256, vision_cfg.image_size, seed + 1).batch(0)  # another seed: unseen scenes
    loader = torch.utils.data.DataLoader(
        SceneBatches(batch_size, vision_cfg.image_size, seed), batch_size=None, num_workers=1
    )
    started, history = time.perf_counter(), []
    bar = tqdm(total=steps, desc="pretraining the encoder", unit="step", disable=not progress)
    for step, (pixels, facts) in enumerate(loader):
        if step == steps:
            break
        loss = clip_loss(model.logits(pixels, facts))
        if position_weight > 0:
            loss = loss + position_weight * model.last_position_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.update()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            history.append((step, round(loss.item(), 4)))
    bar.close()
    vision.eval()
    accuracy = retrieval_accuracy(model, *held_out)

    out.mkdir(parents=True, exist_ok=True)
    vision.save_pretrained(out)
    recipe = {
        "what": "tiny CLIP vision encoder for the embedded default, contrastive on synthetic scene captions",
        "command": f"python -m lightning_sp.pretrain_encoder --out {out} --steps {steps} --batch-size {batch_size} "
        f"--lr {lr} --seed {seed}"
        + (f" --position-weight {position_weight}" if position_weight else "")
        + (" " + " ".join(overrides) if overrides else ""),
        "config_overrides": overrides,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "loss_history": history,
        "held_out_retrieval_top1": round(accuracy, 4),
        "held_out_chance": 1 / 256,
        "seconds": round(time.perf_counter() - started, 1),
        "sha256": {WEIGHTS_FILE: sha256(out / WEIGHTS_FILE)},
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/encoder"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--position-weight",
        type=float,
        default=0.0,
        help="weight of a self-supervised loss that names each patch's grid place from its feature at "
        "model.vision.select_layer (0: CLIP's loss alone, as the shipped encoder)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides describing the encoder (model.vision.*)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = pretrain(
        args.out,
        ["model.vision.name_or_path=null", *args.overrides],
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        position_weight=args.position_weight,
    )
    print(
        f"encoder written to {args.out}: held-out caption->image top-1 {recipe['held_out_retrieval_top1']:.3f} "
        f"(chance {recipe['held_out_chance']:.4f}) in {recipe['seconds']:.0f}s"
    )


if __name__ == "__main__":
    main()
