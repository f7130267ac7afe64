"""Synthetic spatial VQA: answers agree with the pixels, output is deterministic and valid LLaVA JSON."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_sp.data import synthetic as syn

SIZE = 96
POS = {p: (r, c) for r, row in enumerate(syn.POSITIONS) for c, p in enumerate(row)}
LINES = {"row": ("top", "middle", "bottom"), "column": ("left", "middle", "right")}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    syn.generate(out, n_train=30, n_val=40, seed=3, image_size=SIZE, turns=3, progress=False)
    return out, json.loads((out / "train.json").read_text()), json.loads((out / "val.json").read_text())


def cell_colours(path: Path) -> dict:
    """Colour name at each cell centre, read from the JPEG ("none" for background), by nearest palette colour."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    palette = dict(syn.COLOURS, none=tuple(pixels[0, 0]))  # a corner pixel is always background
    cell = SIZE / 3
    out = {}
    for r in range(3):
        for c in range(3):
            px = pixels[int((r + 0.5) * cell), int((c + 0.5) * cell)]
            out[r, c] = min(palette, key=lambda k: np.abs(px - np.array(palette[k])).sum())
    return out


def solve(question: str, scene: list[dict]) -> str:
    """Independent answer key, written from the question text and the scene."""
    at = {(o["row"], o["col"]): o for o in scene}
    find = {f"{o['colour']} {o['shape']}": o for o in scene}
    if m := re.fullmatch(r"What color is the shape in the (.+) cell\?", question):
        o = at.get(POS[m[1]])
        return o["colour"] if o else "none"
    if m := re.fullmatch(r"What shape is in the (.+) cell\?", question):
        o = at.get(POS[m[1]])
        return o["shape"] if o else "none"
    if m := re.fullmatch(r"Where is the (.+)\?", question):
        o = find[m[1]]
        return next(p for p, rc in POS.items() if rc == (o["row"], o["col"]))
    if m := re.fullmatch(r"How many shapes are in the (\w+) (row|column)\?", question):
        k = LINES[m[2]].index(m[1])
        return str(sum((o["row"] if m[2] == "row" else o["col"]) == k for o in scene))
    if m := re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
        a, b = find[m[1]], find[m[3]]
        holds = {
            "left of": a["col"] < b["col"],
            "right of": a["col"] > b["col"],
            "above": a["row"] < b["row"],
            "below": a["row"] > b["row"],
        }[m[2]]
        return "yes" if holds else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_scene_matches_pixels_and_answers_match_scene(generated):
    out, train, val = generated
    for rec in train + val:
        seen = cell_colours(out / rec["image"])
        expected = {(r, c): "none" for r in range(3) for c in range(3)}
        expected.update({(o["row"], o["col"]): o["colour"] for o in rec["scene"]})
        assert seen == expected, rec["id"]
        conv = rec["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            assert a["value"] == solve(q["value"].removeprefix("<image>\n"), rec["scene"]), rec["id"]


def test_llava_format(generated):
    out, train, val = generated
    assert len(train) == 30 and len(val) == 40
    for rec, turns in [(r, 3) for r in train] + [(r, 1) for r in val]:
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * turns
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
        assert all(t["value"] == t["value"].lower() and t["value"] for t in conv[1::2])
        assert rec["image"] == f"images/{rec['id'].split('_')[0]}/{rec['id']}.jpg"
        assert Image.open(out / rec["image"]).size == (SIZE, SIZE)
        kinds = [(o["colour"], o["shape"]) for o in rec["scene"]]
        assert 2 <= len(kinds) <= 4 and len(set(kinds)) == len(kinds)
    assert all(len(r["qtypes"]) == 3 and set(r["qtypes"]) <= set(syn.QTYPES) for r in train)
    assert sorted({r["qtype"] for r in val}) == sorted(syn.QTYPES)  # val rotates through all types
    layouts = {frozenset(map(json.dumps, r["scene"])) for r in train}
    assert not any(frozenset(map(json.dumps, r["scene"])) in layouts for r in val)


def test_deterministic(tmp_path, generated):
    out, train, val = generated
    again = tmp_path / "again"
    syn.generate(again, n_train=30, n_val=40, seed=3, image_size=SIZE, turns=3, progress=False)
    assert (again / "train.json").read_text() == (out / "train.json").read_text()
    assert (again / "val.json").read_text() == (out / "val.json").read_text()
    for rec in train[:5] + val[:5]:
        assert (again / rec["image"]).read_bytes() == (out / rec["image"]).read_bytes()
    other = tmp_path / "other"
    syn.generate(other, n_train=30, n_val=0, seed=4, image_size=SIZE, turns=3, progress=False)
    assert (other / "train.json").read_text() != (out / "train.json").read_text()


def test_relation_answers_balanced():
    rng = random.Random(0)
    answers = [syn.ask(syn.sample_scene(rng), "relation", rng)[1] for _ in range(2000)]
    assert 0.45 < answers.count("yes") / len(answers) < 0.55


def test_majority_baseline():
    def rec(qtype, answer):
        return {"qtype": qtype, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]}

    records = [
        rec("count", "2"),
        rec("count", "2"),
        rec("count", "1"),
        rec("relation", "yes"),
        rec("relation", "no"),
        rec("relation", "no"),
        rec("relation", "no"),
    ]
    base = syn.majority_baseline(records)
    assert base["majority_answer"] == {"count": "2", "relation": "no"}
    assert base["per_qtype"] == {"count": pytest.approx(2 / 3), "relation": pytest.approx(3 / 4)}
    assert base["overall"] == pytest.approx(5 / 7)
    # Majority answers learnt from a reference split (e.g. train) and applied to another.
    assert syn.majority_baseline(records[:3], reference=[rec("count", "1")])["overall"] == pytest.approx(1 / 3)
    multi = {
        "qtypes": ["count", "relation"],
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "2"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "yes"},
        ],
    }
    assert syn.majority_baseline([multi])["count"] == {"count": 1, "relation": 1}
