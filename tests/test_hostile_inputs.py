"""Hostile inputs at both layers -- the converter (LLaVA JSON + image root -> shards) and the training stream
(shards -> batches) -- and the run-level limit on skipped records.

Every bad input must end as a counted skip, logged with the record id, the shard and the reason, or as a clear error
before any work starts: never a crash mid-run, a hang, or a sample whose labels are all IGNORE_INDEX.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from lightning_sp.callbacks import SkipLimit, SkippedRecordsError
from lightning_sp.config import ConfigError, compose
from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.data import shards, synthetic
from lightning_sp.data.collate import collate_train
from lightning_sp.data.datamodule import ShardDataModule
from lightning_sp.data.images import ImageDecodeError, ImageProcessor
from lightning_sp.paths import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29

N_VIS, SIZE, BATCH, MAX_LENGTH = 6, 32, 2, 64


# ---- hostile bytes ---------------------------------------------------------------------------------------


def encoded(fmt: str = "JPEG", size: tuple[int, int] = (32, 24), seed: int = 0) -> bytes:
    """A valid image of `size` (width, height): random pixels, so a cut anywhere lands in real data."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 16x16 PNG whose header (CRC fixed, so it is structurally valid) claims `width` x `height`: a
    decompression bomb when large, a PNG whose rows do not match its data when only slightly wider."""
    data = bytearray(encoded("PNG", (16, 16)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR payload starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header claims `width` x `height` (libjpeg pads the missing rows with grey)."""
    data = bytearray(encoded("JPEG", (16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encoded("JPEG", (320, 240), seed=1)
    return data[: len(data) // 2]  # headers intact, the scan cut: PIL's verify() does not notice


def conv(question: str = "<image>\nWhat is it?", answer: str = "A shape.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ---- images ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [png_claiming(30000, 30000), png_claiming(12000, 12000), jpeg_claiming(12000, 12000)],
    ids=["png-30000", "png-12000", "jpeg-12000"],
)
def test_huge_image_is_refused_from_its_header(data):
    # Without the header check the JPEG decodes to 432 MB of grey (and then some in the resize).
    with pytest.raises(ImageDecodeError, match="too large|exceeds max_pixels") as info:
        ImageProcessor(SIZE)(data)
    assert info.value.reason == "too_large"


def test_max_pixels_bounds_the_padded_square():
    proc = ImageProcessor(SIZE, max_pixels=60 * 60)
    assert proc(encoded("PNG", (60, 20))).shape == (3, SIZE, SIZE)  # pads to 60x60: at the limit
    with pytest.raises(ImageDecodeError, match="10x61 image: its padded 61x61 square exceeds max_pixels=3600"):
        proc(encoded("PNG", (10, 61)))  # only 610 pixels, but the padded square is what gets allocated


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"not an image at all" * 4, "corrupt"), (truncated_jpeg(), "corrupt")],
    ids=["zero-byte", "garbage", "truncated"],
)
def test_bad_image_bytes_have_a_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        ImageProcessor(SIZE)(data)
    assert info.value.reason == reason


def test_corrupt_pngs_raise_instead_of_crashing_the_process(tmp_path):
    """torchvision's PNG decoder dies with SIGSEGV on a PNG whose data does not match its header (and on most PNGs
    with a flipped byte): in a data worker that ends the whole run. Run in a subprocess so that a
    regression fails this test instead of killing the test session."""
    (tmp_path / "short.png").write_bytes(png_claiming(20, 16))
    (tmp_path / "valid.png").write_bytes(encoded("PNG", (64, 48)))
    script = """
import json, random, sys
from lightning_sp.data.images import ImageDecodeError, ImageProcessor
short, valid = (open(p, "rb").read() for p in sys.argv[1:3])
rng, proc, outcomes = random.Random(0), ImageProcessor(32), []
for i in range(40):
    blob = bytearray(short if i == 0 else valid)
    for _ in range(0 if i == 0 else rng.randint(1, 4)):
        blob[rng.randrange(len(blob))] = rng.randrange(256)
    try:
        proc(bytes(blob))
        outcomes.append("ok")
    except ImageDecodeError as e:
        outcomes.append(e.reason)
print(json.dumps(outcomes))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "short.png"), str(tmp_path / "valid.png")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes[0] == "corrupt" and set(outcomes) <= {"ok", "corrupt"}


# ---- the converter ---------------------------------------------------------------------------------------


def test_converter_lists_hostile_images_and_records_in_skipped_jsonl(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    files = {
        "good.jpg": encoded(),
        "zero.jpg": b"",
        "garbage.jpg": b"not an image" * 10,
        "cut.jpg": truncated_jpeg(),
        "short.png": png_claiming(20, 16),
        "bomb.png": png_claiming(30000, 30000),
        "huge.jpg": jpeg_claiming(12000, 12000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    expected = {
        "zero": "empty",
        "garbage": "corrupt",
        "cut": "corrupt",
        "short": "corrupt",
        "bomb": "too_large",
        "huge": "too_large",
        "nofile": "missing",
        "value_int": "malformed",
        "turns_dict": "malformed",
        "empty_conversation": "malformed",
        "no_conversations": "malformed",
        "surrogate": "not_utf8",
    }
    records = [
        {"id": "good", "image": "good.jpg", "conversations": conv()},
        {"id": "text", "conversations": conv("Say hi.", "hi")},
        # Template-dependent problems pass the converter; training skips and counts them (see below).
        {"id": "gpt_first", "conversations": conv()[::-1]},
        {"id": "two_images", "image": "good.jpg", "conversations": conv("<image> <image>\nSame?", "Yes.")},
    ]
    records += [
        {"id": rid, "image": f"{rid}.{'png' if rid in ('short', 'bomb') else 'jpg'}", "conversations": conv()}
        for rid in ("zero", "garbage", "cut", "short", "bomb", "huge", "nofile")
    ]
    records += [
        {"id": "value_int", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]},
        {"id": "turns_dict", "conversations": {"from": "human", "value": "hi"}},
        {"id": "empty_conversation", "conversations": []},
        {"id": "no_conversations", "image": "good.jpg"},
        {"id": "surrogate", "conversations": conv("Say \ud800.", "no")},  # written as a "\ud800" escape
        "a string, not a record",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))  # ensure_ascii: the file is valid UTF-8, the surrogate an escape
    out = tmp_path / "shards"
    index = shards.convert(path, root, out, shard_size=4, workers=1, progress=False)

    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["id"]: s["reason"] for s in skipped}
    string_key = next(rid for rid in reasons if rid not in expected)  # the non-dict record, named by its key
    assert reasons == {**expected, string_key: "malformed"}
    assert all(s["detail"] for s in skipped)
    assert index["totals"]["samples"] == 4 and index["totals"]["skipped"] == len(expected) + 1
    kept = {
        json.loads(tarfile.open(out / s["name"]).extractfile(m).read())["id"]
        for s in index["shards"]
        for m in tarfile.open(out / s["name"]).getmembers()
        if m.name.endswith(".json")
    }
    assert kept == {"good", "text", "gpt_first", "two_images"}


def test_converter_refuses_a_json_file_that_is_not_utf8(tmp_path):
    raw = json.dumps(
        [{"id": "a", "conversations": conv("Say hi.", "hi")}, {"id": "b", "conversations": conv("Say cafe.", "cafe")}]
    ).encode()
    bad = raw.replace(b'cafe."', b'caf\xe9."', 1)  # latin-1 e-acute
    (tmp_path / "data.json").write_bytes(bad)
    offset = bad.index(b"\xe9")
    with pytest.raises(shards.ConvertError, match=rf"not UTF-8 \(invalid continuation byte at byte {offset}\).*iconv"):
        shards.convert(tmp_path / "data.json", tmp_path, tmp_path / "out", shard_size=1, progress=False)
    assert not (tmp_path / "out").exists()  # stopped before any work: nothing to clean up before a re-run
    (tmp_path / "data.json").write_bytes(raw)
    assert (
        shards.convert(tmp_path / "data.json", tmp_path, tmp_path / "out", shard_size=1, progress=False)["totals"][
            "samples"
        ]
        == 2
    )


# ---- the training stream, from shards written by hand -----------------------------------------------------


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def record_json(rid: str, conversations, image: bool = True) -> bytes:
    record = {"id": rid, **({"image": f"{rid}.jpg"} if image else {}), "conversations": conversations}
    return json.dumps(record).encode()


def good(i: int) -> tuple[str, dict[str, bytes]]:
    return f"good{i}", {"json": record_json(f"good{i}", conv()), "jpg": encoded(seed=i)}


# (key, members, reason the stream must skip it for)
HOSTILE = [
    (
        "corrupt_jpeg",
        {"json": record_json("corrupt_jpeg", conv()), "jpg": b"\xff\xd8\xff" + b"garbage" * 20},
        "image_corrupt",
    ),
    ("zero_byte", {"json": record_json("zero_byte", conv()), "jpg": b""}, "image_empty"),
    ("cut_jpeg", {"json": record_json("cut_jpeg", conv()), "jpg": truncated_jpeg()}, "image_corrupt"),
    ("short_png", {"json": record_json("short_png", conv()), "png": png_claiming(20, 16)}, "image_corrupt"),
    ("bomb_png", {"json": record_json("bomb_png", conv()), "png": png_claiming(30000, 30000)}, "image_too_large"),
    ("huge_jpeg", {"json": record_json("huge_jpeg", conv()), "jpg": jpeg_claiming(12000, 12000)}, "image_too_large"),
    ("no_image", {"json": record_json("no_image", conv())}, "image_missing"),
    ("orphan", {"jpg": encoded()}, "malformed"),  # an image member without its record
    ("latin1", {"json": b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}'}, "not_utf8"),
    ("surrogate", {"json": record_json("surrogate", conv("Say \ud800.", "no"), image=False)}, "not_utf8"),
    ("cut_json", {"json": b'{"id": "cut_json", "conversa'}, "bad_json"),
    ("a_list", {"json": b'["human", "gpt"]'}, "malformed"),
    ("no_conversations", {"json": b'{"id": "no_conversations"}'}, "malformed"),
    ("wrong_types", {"json": record_json("wrong_types", [{"from": "human", "value": 5}], image=False)}, "malformed"),
    ("empty_conversation", {"json": record_json("empty_conversation", [], image=False)}, "empty_conversation"),
    ("gpt_first", {"json": record_json("gpt_first", conv()[::-1], image=False)}, "gpt_first"),
    (
        "two_images",
        {"json": record_json("two_images", conv("<image>\n<image> Same?", "Yes.")), "jpg": encoded()},
        "multiple_images",
    ),
    # Member names no converter of ours writes: refused, whatever the record holds.
    ("../escape", {"json": record_json("escape", conv(), image=False)}, "unsafe_member_name"),
    ("/abs/olute", {"json": record_json("absolute", conv(), image=False)}, "unsafe_member_name"),
    # A question longer than max_length: no answer token survives truncation.
    ("long_question", {"json": record_json("long_question", conv("Why? " * 80, "Because."), image=False)}, "too_long"),
]


@pytest.fixture(scope="module")
def hostile_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile")
    # A long answer is truncated, not dropped: its first answer tokens stay supervised.
    long_answer = ("long_answer", {"json": record_json("long_answer", conv("Why?", "Because " * 80), image=False)})
    parts = [
        [good(i) for i in range(4)] + [(k, m) for k, m, _ in HOSTILE[:9]],
        [good(i) for i in range(4, 8)] + [(k, m) for k, m, _ in HOSTILE[9:]] + [long_answer],
        [good(i) for i in range(8, 12)],
    ]
    for i, part in enumerate(parts):
        write_tar(out / f"shard-{i:06d}.tar", part)
    # The last shard is truncated in the middle of its third record's image (a copy that died, a full disk).
    with tarfile.open(out / "shard-000002.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == "good10.jpg").offset_data + 100
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[:cut])
    listed = [
        {"name": f"shard-{i:06d}.tar", "samples": len(part), "images": 0, "text_only": 0}
        for i, part in enumerate(parts)
    ]
    (out / "index.json").write_text(json.dumps({"shards": listed, "totals": {"samples": sum(map(len, parts))}}))
    return out


def test_training_stream_skips_counts_and_logs_every_hostile_record(hostile_shards, tokenizer, caplog):
    dm = ShardDataModule(
        hostile_shards,
        None,
        tokenizer,
        "vicuna_v1",
        num_visual_tokens=N_VIS,
        image_size=SIZE,
        batch_size=BATCH,
        num_workers=0,
        shuffle_buffer=4,
        max_length=MAX_LENGTH,
    )
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="lightning_sp.data.datamodule"):
        batches = list(dm.train_dataloader())

    assert len(batches) == dm.steps_per_epoch  # the epoch is complete: the stream refilled what was lost
    ids = {i for b in batches for i in b["ids"]}
    assert ids <= {f"good{i}" for i in range(12)} | {"long_answer"} and "long_answer" in ids
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for b in batches:
        assert ((b["labels"] != IGNORE_INDEX).sum(1) > 0).all()  # no row without a supervised token
        assert b["attention_mask"].sum(1).max() <= MAX_LENGTH
        assert torch.equal((b["input_ids"] == image_id).sum(1), b["has_image"].long() * N_VIS)

    reasons = sum((Counter(b["skipped_reasons"]) for b in batches), Counter())
    assert set(reasons) == {reason for _, _, reason in HOSTILE} | {"bad_shard", "lost_in_bad_shard"}, reasons
    # the truncated shard's records after the cut are counted against its index.json count, once per pass
    listed = json.loads((hostile_shards / "index.json").read_text())["shards"][2]["samples"]
    assert reasons["lost_in_bad_shard"] % (listed - 2) == 0 and reasons["lost_in_bad_shard"] >= listed - 2
    assert sum(b["skipped"] for b in batches) == sum(reasons.values())

    warnings = [r.getMessage() for r in caplog.records]
    for key, _, reason in HOSTILE:  # named by the record's id, or by its key when the record cannot be read
        assert any(
            f"skipping record {key!r} from {hostile_shards}/shard-" in w and f"(reason {reason})" in w for w in warnings
        ), (key, reason)
    assert any(f"shard {hostile_shards}/shard-000002.tar" in w and "bad_shard" in w for w in warnings)


@pytest.mark.parametrize("batch, workers", [(4, 0), (3, 2)])
def test_batch_wise_building_keeps_the_train_stream_exact(hostile_shards, tokenizer, monkeypatch, batch, workers):
    """SampleBuilder(batch_size=...) reads the raw samples a batch still needs at once, tokenises them before their
    images and writes the pixels into the batch's buffer. Against building one sample at a time (the previous
    code): the same batches bit for bit, the same stream positions (raw samples read when each batch completes),
    the same skip counts per batch, and a resume from a mid-epoch position continues with the same batches."""
    from lightning_sp.data.samples import SampleBuilder
    from lightning_sp.data.train_stream import StreamPosition

    def epoch(one_by_one: bool, resume: StreamPosition | None = None) -> list[dict]:
        dm = ShardDataModule(
            hostile_shards,
            None,
            tokenizer,
            "vicuna_v1",
            num_visual_tokens=N_VIS,
            image_size=SIZE,
            batch_size=batch,
            num_workers=workers,
            shuffle_buffer=4,
            max_length=MAX_LENGTH,
        )
        dm.setup("fit")
        dm.resume_at(resume)
        with monkeypatch.context() as patch:
            if one_by_one:
                init = SampleBuilder.__init__
                patch.setattr(
                    SampleBuilder, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "batch_size": None})
                )
            return list(dm.train_dataloader())

    def same(a: dict, b: dict) -> bool:
        return all(a[k] == b[k] for k in ("ids", "stream_position", "skipped", "skipped_reasons")) and all(
            a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
            for k in ("input_ids", "labels", "attention_mask", "pixel_values", "has_image")
        )

    batch_wise, one_by_one = epoch(False), epoch(True)
    assert len(batch_wise) == len(one_by_one) > 3 and sum(b["skipped"] for b in batch_wise) >= len(HOSTILE)
    assert all(same(a, b) for a, b in zip(batch_wise, one_by_one))
    done, raw = 3, {}
    for b in batch_wise[:done]:
        raw[b["stream_position"][0]] = b["stream_position"][1]
    position = StreamPosition(epoch=0, batches=done, raw=raw)
    resumed = epoch(False, position)
    assert len(resumed) == len(batch_wise) - done and all(same(a, b) for a, b in zip(resumed, epoch(True, position)))
    # The same batches and skip counts as the uninterrupted epoch: shard-level events met while replaying (the
    # truncated tar) were counted before the interruption and are not counted again.
    assert all(same(a, b) for a, b in zip(resumed, batch_wise[done:]))


def test_validation_stream_skips_the_same_way(hostile_shards, tokenizer, caplog):
    dm = ShardDataModule(
        hostile_shards,
        hostile_shards,
        tokenizer,
        "vicuna_v1",
        num_visual_tokens=N_VIS,
        image_size=SIZE,
        batch_size=BATCH,
        val_batch_size=4,
        num_workers=0,
        max_length=MAX_LENGTH,
    )
    with caplog.at_level("WARNING", logger="lightning_sp.data.datamodule"):
        ids = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert sorted(ids) == sorted([f"good{i}" for i in range(10)] + ["long_answer"])  # one ordered pass
    assert any(
        f"shard {hostile_shards}/shard-000002.tar" in r.getMessage() and "bad_shard" in r.getMessage()
        for r in caplog.records
    )


def test_collate_refuses_a_sample_without_supervised_tokens(tokenizer):
    sample = {
        "id": "unsupervised",
        "input_ids": torch.tensor([1, 5, 6]),
        "labels": torch.full((3,), IGNORE_INDEX),
        "pixel_values": torch.zeros(3, 2, 2),
        "has_image": False,
    }
    with pytest.raises(ValueError, match="'unsupervised' has no supervised token"):
        collate_train([sample], 0, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), num_visual_tokens=3)


# ---- the run-level limit: SkipLimit --------------------------------------------------------------------------


class _Ranks:
    """`trainer.strategy` of `world` ranks that all see the same batches: reduce(sum) multiplies."""

    def __init__(self, world: int):
        self.world, self.calls = world, 0

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        self.calls += 1
        return tensor * self.world


def feed(limit: SkipLimit, batches: int, trained: int, skipped: int, world: int = 2) -> None:
    """`batches` training batches of `trained` samples and `skipped` skips each, on each of `world` ranks."""
    trainer = SimpleNamespace(strategy=_Ranks(world), global_step=0, datamodule=SimpleNamespace(train_dir="/d"))
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **k: None)
    batch = {"input_ids": torch.zeros(trained, 3), "skipped": skipped, "skipped_reasons": {"gpt_first": skipped}}
    for n in range(batches):
        trainer.global_step = n
        limit.on_train_batch_end(trainer, module, None, batch, n)
    assert trainer.strategy.calls == batches  # a collective on every batch: all ranks decide together


def test_skip_limit_counts_over_ranks_and_waits_for_min_samples():
    limit = SkipLimit(0.25, min_samples=200)
    with pytest.raises(SkippedRecordsError) as info:
        feed(limit, 20, trained=4, skipped=4)  # 50 % skipped; 16 records seen per batch over 2 ranks
    assert (limit.seen, limit.skipped) == (208, 104)  # raised at the 13th batch, the first with >= 200 seen
    message = str(info.value)
    for part in (
        "50.0% of the training records",
        "104 of 208",
        "data.max_skipped_fraction=0.25",
        "gpt_first 52",
        "/d/skipped.jsonl",
        "skipping record",
    ):
        assert part in message, part
    at_limit = SkipLimit(0.5, min_samples=10)
    feed(at_limit, 30, trained=4, skipped=4)  # exactly at the limit is not over it
    assert at_limit.seen == 30 * 16
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SkipLimit(1.5)


def test_max_skipped_fraction_is_validated():
    assert compose(["data.max_skipped_fraction=0.2"]).data.max_skipped_fraction == 0.2
    with pytest.raises(ConfigError, match="data.max_skipped_fraction must be in"):
        compose(["data.max_skipped_fraction=-0.1"])


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> tuple[Path, list[dict]]:
    raw = tmp_path_factory.mktemp("skiprun")
    synthetic.generate(raw, n_train=24, n_val=4, seed=0, image_size=336, turns=1, workers=1, progress=False)
    return raw, json.loads((raw / "train.json").read_text())


def shard_dir(raw: Path, records: list[dict], name: str) -> Path:
    (raw / f"{name}.json").write_text(json.dumps(records))
    shards.convert(raw / f"{name}.json", raw, raw / name, shard_size=8, workers=1, progress=False)
    return raw / name


def bad_records(n: int, image: str) -> list[dict]:
    """Well-formed records (the converter keeps them) that no template can train on, three kinds in turn."""
    kinds = [
        {"conversations": conv("Q?", "A.")[::-1]},  # gpt_first
        {"image": image, "conversations": conv("<image> <image>\nQ?", "A.")},  # multiple_images
        {"conversations": conv("Q?", " ")},
    ]  # empty_answer
    return [{"id": f"bad{i}", **kinds[i % 3]} for i in range(n)]


def tiny_run(train_dir: Path, run_dir: Path, *extra: str):
    from lightning_sp.train import train

    return train(
        compose(
            [
                *TINY,
                "data.synthetic=null",
                f"data.train_dir={train_dir}",
                "data.val_dir=null",
                "data.batch_size=4",
                "data.num_workers=0",
                "data.shuffle_buffer=8",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "viz.enabled=false",
                f"run_dir={run_dir}",
                *extra,
            ]
        )
    )


@pytest.mark.slow
def test_a_run_whose_records_are_mostly_bad_stops_with_a_summary(raw_data, tmp_path):
    raw, good_records = raw_data
    train_dir = shard_dir(raw, good_records + bad_records(168, good_records[0]["image"]), "mostly_bad")
    with pytest.raises(SkippedRecordsError) as info:
        tiny_run(train_dir, tmp_path / "run", "trainer.max_steps=40", "trainer.val_check_interval=40")
    message = str(info.value)
    assert "over the limit data.max_skipped_fraction=0.01" in message
    for reason in ("gpt_first", "multiple_images", "empty_answer"):
        assert reason in message
    assert f"{train_dir}/skipped.jsonl" in message


@pytest.mark.slow
def test_a_few_bad_records_under_the_limit_let_the_run_finish(raw_data, tmp_path, caplog):
    raw, good_records = raw_data
    train_dir = shard_dir(raw, good_records + bad_records(6, good_records[0]["image"]), "few_bad")  # 20 %
    with caplog.at_level("WARNING", logger="lightning_sp.data.datamodule"):
        metrics = tiny_run(
            train_dir,
            tmp_path / "run",
            "data.max_skipped_fraction=0.3",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
        )
    assert metrics["global_step"] == 4
    assert metrics["train/skipped_records"] >= 1 and 0 < metrics["train/skipped_fraction"] <= 0.3
    assert any(
        m.startswith("skipping record 'bad") and "(reason " in m
        for m in map(logging.LogRecord.getMessage, caplog.records)
    )


def test_skip_limit_counts_survive_a_resume():
    limit = SkipLimit(0.9, min_samples=10_000)
    feed(limit, 3, trained=4, skipped=1)
    restored = SkipLimit(0.9, min_samples=10_000)
    restored.load_state_dict(limit.state_dict())
    assert (restored.seen, restored.skipped, restored.reasons) == (30, 6, limit.reasons) and restored.seen > 0
