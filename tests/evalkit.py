"""Shared by the evaluation tests: one tiny trained run per test session, and hand-written benchmark files."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import TINY


# Narrower LLM and projector than the embedded default's (conftest.TINY also narrows the encoder).
NARROW = [
    "model.llm.hidden_size=64",
    "model.llm.intermediate_size=128",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "projector.sp_width=16",
]


def few_step_fit(tmp_path: Path) -> list[str]:
    """Overrides for a 3-step `train` on :func:`small_data` with one validation batch, run in ``tmp_path/run``."""
    return [
        *small_data(tmp_path / "data"),
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        f"run_dir={tmp_path / 'run'}",
    ]


def budget_trainer(max_steps: int):
    """A Trainer with a step budget and nothing else (no logger, checkpoints or progress bar), to attach to a module
    through Lightning's public ``module.trainer = ...`` where only ``configure_optimizers`` is called (it reads the
    budget: the schedule's length)."""
    import lightning as L

    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def first_and_last_loss(module, batch: dict, steps: int = 3) -> tuple[float, float]:
    """The loss before the first and the last of ``steps`` AdamW steps on one fixed batch, with the module's own
    optimizer groups and learning rates."""
    module.trainer = budget_trainer(10)
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module.model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    return losses[0], losses[-1]


def small_data(root: Path) -> list[str]:
    """The tiny synthetic data of tests/test_train.py, under ``root``."""
    return [
        f"data.synthetic.raw_dir={root}/raw",
        f"data.train_dir={root}/shards/train",
        f"data.val_dir={root}/shards/val",
        "data.synthetic.n_train=24",
        "data.synthetic.n_val=8",
        "data.shard_size=8",
        "data.batch_size=4",
        "data.val_batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
    ]


def trained_run(tmp_path_factory, variant: str = "pooling") -> Path:
    """Train the tiny model 2 steps (once per session and variant); returns the run directory."""
    from lightning_sp.config import compose
    from lightning_sp.train import train

    base = tmp_path_factory.getbasetemp() / f"trained-{variant}"
    run_dir = base / "run"
    if not (run_dir / "metrics.json").is_file():
        cfg = compose(
            [
                *TINY,
                f"variant={variant}",
                *small_data(base / "data"),
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                f"run_dir={run_dir}",
            ]
        )
        train(cfg)
    return run_dir


def write_benchmark_files(root: Path, n: int = 5) -> dict[str, Path]:
    """A LLaVA question file (+ answers file) and a POPE file over synthetic-scene images of several sizes."""
    from lightning_sp.data import synthetic

    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = random.Random(0)
    questions, answers, pope = [], [], []
    lengths = [
        "Which colour is it?",
        "What shape is in the top left cell of this picture, if any at all?",
        "Where is the red circle?",
        "How many shapes are in the middle row of the grid?",
        "Describe it.",
    ]
    for i in range(n):
        scene = synthetic.sample_scene(rng)
        image = synthetic.render(scene, image_size=96 + 40 * i)  # non-336 sizes: the processor resizes
        if i % 2:
            image = image.crop((0, 0, image.width, image.height * 2 // 3))  # non-square: padded to square
        name = f"img{i}.png"
        image.save(root / "images" / name)
        questions.append(
            {
                "question_id": 100 + i,
                "image": name,
                "text": lengths[i % len(lengths)],
                "category": "short" if len(lengths[i % len(lengths)]) < 25 else "long",
            }
        )
        answers.append({"question_id": 100 + i, "answers": ["red"] * 3 + ["blue"] * 7})
        obj = scene.items[0]
        pope.append(
            {
                "question_id": f"p{i}",
                "image": name,
                "label": "yes" if i % 2 == 0 else "no",
                "text": f"Is there a {obj.colour if i % 2 == 0 else 'grey'} {obj.shape} in the image?",
                "category": "adversarial" if i < 3 else "random",
            }
        )
    paths = {"questions": root / "questions.jsonl", "answers": root / "answers.jsonl", "pope": root / "pope.jsonl"}
    for key, rows in (("questions", questions), ("answers", answers), ("pope", pope)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["image_root"] = root / "images"
    return paths
