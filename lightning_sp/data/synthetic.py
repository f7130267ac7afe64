"""Synthetic spatial VQA: coloured shapes on a 3x3 grid, questions whose answers depend on *where* things are.

The embedded default trains on this so that a CPU run can show whether a projector keeps spatial layout: every
question type (which colour is in a cell, where is an object, how many in a row, is A left of B, which shape is
in a cell) is unanswerable from a bag of patch features without positions. Records are LLaVA-format JSON, so the
real pipeline (shards.py -> datamodule.py) consumes them unchanged.

Each record also carries its ``scene`` (colour, shape, row, col per object) and the question type(s), which
tests and per-type accuracy use; the conversation encoder ignores extra keys.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
ROW_NAMES, COL_NAMES = ("top", "middle", "bottom"), ("left", "middle", "right")
RELATIONS = ("left of", "right of", "above", "below")
QTYPES = ("position_colour", "locate", "count", "relation", "shape_at")

# Geometry in cell units (a cell is image_size / 3). Sizes and offsets are bounded so that every shape covers
# its cell centre (a triangle's inradius 0.575 * 0.24 = 0.138 > the largest offset 0.08 * sqrt(2) = 0.113) and
# stays inside its cell: a pixel at a cell centre always shows the colour of that cell's object, if any.
_HALF_RANGE = (0.24, 0.36)
_MAX_OFFSET = 0.08
_TRIANGLE_R = 1.15  # circumradius / half-size


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    row: int
    col: int
    dx: float = 0.0  # centre offset from the cell centre, cell units
    dy: float = 0.0
    half: float = 0.3  # half-size, cell units


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]
    background: tuple[int, int, int]

    def at(self, row: int, col: int) -> Item | None:
        return next((it for it in self.items if (it.row, it.col) == (row, col)), None)

    def layout(self) -> frozenset:
        """What the questions can see: objects and cells, not jitter (used to keep val layouts out of train)."""
        return frozenset((it.colour, it.shape, it.row, it.col) for it in self.items)


def sample_scene(rng: random.Random) -> Scene:
    n = rng.randint(2, 4)
    cells = rng.sample(range(9), n)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)  # unique (colour, shape) per image
    items = tuple(
        Item(
            colour,
            shape,
            cell // 3,
            cell % 3,
            rng.uniform(-_MAX_OFFSET, _MAX_OFFSET),
            rng.uniform(-_MAX_OFFSET, _MAX_OFFSET),
            rng.uniform(*_HALF_RANGE),
        )
        for cell, (colour, shape) in zip(cells, kinds)
    )
    background = tuple(rng.randint(225, 250) for _ in range(3))
    return Scene(items, background)


def render(scene: Scene, image_size: int = 336) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for it in scene.items:
        cx, cy, h = (it.col + 0.5 + it.dx) * cell, (it.row + 0.5 + it.dy) * cell, it.half * cell
        fill = COLOURS[it.colour]
        if it.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif it.shape == "square":
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:  # equilateral, pointing up, centroid at (cx, cy)
            r = _TRIANGLE_R * h
            draw.polygon([(cx, cy - r), (cx - 0.866 * r, cy + r / 2), (cx + 0.866 * r, cy + r / 2)], fill=fill)
    return image


# ---- questions -------------------------------------------------------------------------------------------


def _pick_cell(scene: Scene, rng: random.Random) -> tuple[int, int]:
    # Mostly occupied cells: 5-7 of 9 cells are empty, so uniform cells would make "none" the answer to learn.
    occupied = [(it.row, it.col) for it in scene.items]
    empty = [(r, c) for r in range(3) for c in range(3) if (r, c) not in occupied]
    return rng.choice(empty) if empty and rng.random() < 0.2 else rng.choice(occupied)


def _name(it: Item) -> str:
    return f"{it.colour} {it.shape}"


def _holds(a: Item, rel: str, b: Item) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[rel]


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of the given type about the scene."""
    if qtype in ("position_colour", "shape_at"):
        r, c = _pick_cell(scene, rng)
        it = scene.at(r, c)
        if qtype == "position_colour":
            return f"What color is the shape in the {POSITIONS[r][c]} cell?", it.colour if it else "none"
        return f"What shape is in the {POSITIONS[r][c]} cell?", it.shape if it else "none"
    if qtype == "locate":
        it = rng.choice(scene.items)
        return f"Where is the {_name(it)}?", POSITIONS[it.row][it.col]
    if qtype == "count":
        k = rng.randrange(6)
        if k < 3:
            return f"How many shapes are in the {ROW_NAMES[k]} row?", str(sum(it.row == k for it in scene.items))
        k -= 3
        return f"How many shapes are in the {COL_NAMES[k]} column?", str(sum(it.col == k for it in scene.items))
    if qtype == "relation":
        # Decide the answer first, so yes/no stay balanced whatever the layouts are.
        triples = [(a, rel, b) for a in scene.items for b in scene.items if a is not b for rel in RELATIONS]
        want = rng.random() < 0.5
        pool = [t for t in triples if _holds(*t) == want] or triples
        a, rel, b = rng.choice(pool)
        return f"Is the {_name(a)} {rel} the {_name(b)}?", "yes" if _holds(a, rel, b) else "no"
    raise ValueError(f"unknown qtype {qtype!r}; valid: {', '.join(QTYPES)}")


def make_record(split: str, index: int, scene: Scene, qas: list[tuple[str, str, str]]) -> dict:
    """LLaVA record; ``qas`` is [(qtype, question, answer)]. Only the first human turn carries <image>."""
    rid = f"{split}_{index:06d}"
    conversations = []
    for turn, (_, q, a) in enumerate(qas):
        conversations += [{"from": "human", "value": f"<image>\n{q}" if turn == 0 else q}, {"from": "gpt", "value": a}]
    record = {"id": rid, "image": f"images/{split}/{rid}.jpg", "conversations": conversations}
    if len(qas) == 1:
        record["qtype"] = qas[0][0]
    else:
        record["qtypes"] = [qt for qt, _, _ in qas]
    record["scene"] = [
        {k: v for k, v in asdict(it).items() if k in ("colour", "shape", "row", "col")} for it in scene.items
    ]
    return record


def _questions(scene: Scene, rng: random.Random, qtypes: list[str]) -> list[tuple[str, str, str]]:
    qas, seen = [], set()
    for qt in qtypes:
        for _ in range(10):  # re-ask a few times rather than repeat a question within one record
            q, a = ask(scene, qt, rng)
            if q not in seen:
                break
        seen.add(q)
        qas.append((qt, q, a))
    return qas


# ---- generation ------------------------------------------------------------------------------------------


def _render_job(job: tuple[Scene, int, str]) -> None:
    scene, size, path = job
    render(scene, size).save(path, format="JPEG", quality=95)


def _build_split(split: str, n: int, seed: int, turns: int, exclude: set) -> tuple[list[dict], list[Scene]]:
    records, scenes = [], []
    for i in range(n):
        # One RNG per record: record i does not depend on how many others were made or on worker count.
        rng = random.Random(f"{seed}:{split}:{i}")
        scene = sample_scene(rng)
        while scene.layout() in exclude:  # no val layout also appears in train
            scene = sample_scene(rng)
        qtypes = [QTYPES[i % len(QTYPES)]] if split == "val" else [rng.choice(QTYPES) for _ in range(turns)]
        records.append(make_record(split, i, scene, _questions(scene, rng, qtypes)))
        scenes.append(scene)
    return records, scenes


def generate(
    out_dir,
    n_train: int,
    n_val: int,
    seed: int = 0,
    image_size: int = 336,
    turns: int = 3,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write ``train.json``, ``val.json`` and ``images/<split>/<id>.jpg`` under ``out_dir``.

    Train records have ``turns`` Q/A turns (their types in record key ``qtypes``; ``qtype`` when single-turn),
    val records one (record key ``qtype``, types in rotation so every type gets the same number of questions).
    Deterministic given ``seed`` (and independent of ``workers``).
    """
    out = Path(out_dir)
    train, train_scenes = _build_split("train", n_train, seed, turns, exclude=set())
    val, val_scenes = _build_split("val", n_val, seed, 1, exclude={s.layout() for s in train_scenes})
    jobs = []
    for split, records, scenes in (("train", train, train_scenes), ("val", val, val_scenes)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(scene, image_size, str(out / rec["image"])) for rec, scene in zip(records, scenes)]

    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    bar = tqdm(total=len(jobs), desc="rendering synthetic images", unit="img", disable=not progress)
    if workers > 1 and len(jobs) >= 1000:  # a pool is worth its start-up only for big sets
        # fork where there is one: spawn would re-import the caller's __main__ in every worker.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=64):
                bar.update()
    else:
        for job in jobs:
            _render_job(job)
            bar.update()
    bar.close()

    for split, records in (("train", train), ("val", val)):  # JSON last: it exists only once its images do
        tmp = out / f"{split}.json.tmp"
        tmp.write_text(json.dumps(records))
        os.replace(tmp, out / f"{split}.json")
    return {
        "train_json": str(out / "train.json"),
        "val_json": str(out / "val.json"),
        "n_train": n_train,
        "n_val": n_val,
    }


# ---- baseline --------------------------------------------------------------------------------------------


def qa_pairs(record: dict) -> list[tuple[str, str]]:
    """(qtype, answer) for every answered turn of a record; "all" where the record has no type."""
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    qtypes = record.get("qtypes") or [record.get("qtype", "all")] * len(answers)
    return list(zip(qtypes, answers))


def majority_baseline(records: list[dict], reference: list[dict] | None = None) -> dict:
    """Accuracy of always answering the most common answer of the question's type.

    Majority answers come from ``reference`` (e.g. train records) if given, else from ``records`` themselves.
    A model must beat ``overall`` to show it reads the image at all; per type, it shows what guessing gets.
    """
    by_type = defaultdict(Counter)
    for rec in reference if reference is not None else records:
        for qt, a in qa_pairs(rec):
            by_type[qt][a] += 1
    majority = {qt: c.most_common(1)[0][0] for qt, c in sorted(by_type.items())}
    hits, totals = Counter(), Counter()
    for rec in records:
        for qt, a in qa_pairs(rec):
            totals[qt] += 1
            hits[qt] += a == majority.get(qt)
    n = sum(totals.values())
    return {
        "overall": sum(hits.values()) / n if n else 0.0,
        "per_qtype": {qt: hits[qt] / totals[qt] for qt in sorted(totals)},
        "majority_answer": majority,
        "count": dict(sorted(totals.items())),
    }
