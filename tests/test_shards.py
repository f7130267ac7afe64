"""LLaVA JSON -> WebDataset shards: round trip, skipped records with reasons, streaming parser, idempotent re-runs."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from lightning_sp.data import shards


def image_bytes(fmt: str, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def conv(text: str) -> list:
    return [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": "ok"}]


@pytest.fixture
def source(tmp_path):
    """A small LLaVA-format data set with every kind of problem the converter must handle."""
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    files = {
        "coco/a.jpg": image_bytes("JPEG", 0),
        "coco/b.png": image_bytes("PNG", 1),
        "coco/c.JPEG": image_bytes("JPEG", 2),
        "coco/d.jpg": image_bytes("JPEG", 3),
        "coco/empty.jpg": b"",
        "coco/corrupt.jpg": b"this is not an image" * 5,
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (tmp_path / "outside.jpg").write_bytes(image_bytes("JPEG", 4))  # exists, but outside the root
    records = [
        {"id": "a", "image": "coco/a.jpg", "conversations": conv("Was ist das? ünïcødé ✓")},
        {"id": "b", "image": "coco/b.png", "conversations": conv("png")},
        {"id": "c.1/x", "image": "coco/c.JPEG", "conversations": conv("upper-case jpeg, dotted id")},
        {"id": "a", "image": "coco/d.jpg", "conversations": conv("duplicate id")},
        {"id": "text1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "int id"}, {"from": "gpt", "value": "x"}]},
        {"id": "missing", "image": "coco/nope.jpg", "conversations": conv("m")},
        {"id": "empty", "image": "coco/empty.jpg", "conversations": conv("e")},
        {"id": "corrupt", "image": "coco/corrupt.jpg", "conversations": conv("c")},
        {"id": "dotdot", "image": "../outside.jpg", "conversations": conv("d")},
        {"id": "absolute", "image": str(tmp_path / "outside.jpg"), "conversations": conv("a")},
        {"id": "no_conversations", "image": "coco/a.jpg"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")  # pretty + non-ASCII
    return path, root, records, files


def read_shards(out) -> dict:
    """key -> {ext: bytes}, read with tarfile (independently of the converter and of webdataset)."""
    samples = {}
    for shard in json.loads((out / "index.json").read_text())["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_round_trip_and_skips(source, tmp_path):
    path, root, records, files = source
    out = tmp_path / "shards"
    index = shards.convert(path, root, out, shard_size=3, workers=2, seed=1, progress=False)

    samples = read_shards(out)
    kept = records[:6]
    by_id = {}
    for key, parts in samples.items():
        record = json.loads(parts["json"])
        by_id.setdefault(record["id"], []).append((key, record, parts))
    assert sorted(map(str, by_id)) == sorted({str(r["id"]) for r in kept})
    assert sorted(json.dumps(r, sort_keys=True) for entries in by_id.values() for _, r, _ in entries) == sorted(
        json.dumps(r, sort_keys=True) for r in kept
    )
    for key, record, parts in (e for entries in by_id.values() for e in entries):
        assert set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
        if "image" in record:
            ext = {"a.jpg": "jpg", "b.png": "png", "c.JPEG": "jpg", "d.jpg": "jpg"}[record["image"][5:]]
            assert set(parts) == {"json", ext}
            assert parts[ext] == files[record["image"]]  # image bytes stored as-is
        else:
            assert set(parts) == {"json"}
    assert len(samples) == 6  # the duplicate id got its own key

    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert reasons == {
        "missing": "missing",
        "empty": "empty",
        "corrupt": "corrupt",
        "dotdot": "escapes_root",
        "absolute": "escapes_root",
        "no_conversations": "malformed",
    }
    assert all(s["path"] and s["detail"] for s in skipped)

    assert index == json.loads((out / "index.json").read_text())
    assert index["totals"] == {
        "records": 12,
        "samples": 6,
        "images": 4,
        "text_only": 2,
        "skipped": 6,
        "skipped_by_reason": {"corrupt": 1, "empty": 1, "escapes_root": 2, "malformed": 1, "missing": 1},
    }
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]  # 12 / 3
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            names = tar.getnames()
        assert shard["samples"] == sum(n.endswith(".json") for n in names)
        assert shard["images"] == len(names) - shard["samples"]
        assert shard["samples"] == shard["images"] + shard["text_only"]


def test_webdataset_reads_the_shards(source, tmp_path):
    import webdataset as wds

    path, root, records, _ = source
    out = tmp_path / "shards"
    index = shards.convert(path, root, out, shard_size=4, workers=1, progress=False)
    urls = [str(out / s["name"]) for s in index["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(got) == index["totals"]["samples"]
    for sample in got:  # webdataset groups each record with its image (and only image records have one)
        record = json.loads(sample["json"])
        assert len([k for k in sample if not k.startswith("__") and k != "json"]) == ("image" in record)
    assert records[0] in [json.loads(sample["json"]) for sample in got]  # non-ASCII text survives


def test_idempotent_resume_and_argument_guard(source, tmp_path):
    path, root, _, _ = source
    out = tmp_path / "shards"
    index = shards.convert(path, root, out, shard_size=3, workers=2, seed=1, progress=False)
    blobs = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}

    assert shards.convert(path, root, out, shard_size=3, workers=2, seed=1, progress=False) == index
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == mtimes  # nothing rewritten

    (out / "shard-000002.tar").unlink()  # as if killed while writing it
    (out / "shard-000002.tar.tmp").write_bytes(b"half a shard")
    assert shards.convert(path, root, out, shard_size=3, workers=1, seed=1, progress=False) == index
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == blobs  # byte-identical, any worker count
    assert not list(out.glob("*.tmp"))

    with pytest.raises(shards.ConvertError, match="shard_size"):
        shards.convert(path, root, out, shard_size=4, seed=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(shards.ConvertError, match="not empty"):
        shards.convert(path, root, foreign, progress=False)


def test_seed_changes_order_only(source, tmp_path):
    path, root, _, _ = source
    one = shards.convert(path, root, tmp_path / "s1", shard_size=20, seed=1, progress=False)
    two = shards.convert(path, root, tmp_path / "s2", shard_size=20, seed=2, progress=False)
    assert one["totals"] == two["totals"]
    order = [list(read_shards(tmp_path / d)) for d in ("s1", "s2")]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_streaming_parser_matches_json_load(tmp_path, chunk):
    records = [{"id": i, "text": "é✓" * i + '\\"}]', "n": [1.5e3, None, True]} for i in range(30)]
    records.append(12345)  # a number that can straddle a chunk boundary
    path = tmp_path / "x.json"
    path.write_text(
        "\ufeff \r\n" + json.dumps(records, indent=1, ensure_ascii=False).replace("\n", "\r\n"), encoding="utf-8"
    )
    raw = path.read_bytes()
    got = list(shards.iter_json_array(path, chunk_chars=chunk))
    assert [g[0] for g in got] == records
    for element, offset, length in got:  # byte spans point at exactly that element
        assert json.loads(raw[offset : offset + length]) == element

    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}, {"id": 2,]')
    with pytest.raises(shards.ConvertError, match="invalid JSON"):
        list(shards.iter_json_array(bad, chunk_chars=4))
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(shards.ConvertError, match="JSON array"):
        list(shards.iter_json_array(tmp_path / "obj.json"))
