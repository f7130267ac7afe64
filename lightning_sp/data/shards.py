"""LLaVA JSON + image root -> WebDataset tar shards + ``index.json`` (sample counts the datamodule plans with).

Why shards: the 665K mix is one ~1 GB JSON array plus ~600K loose image files; streaming a few hundred tars is
what keeps multi-worker, multi-rank loading fast and lets every rank be given the same number of batches.

How it stays cheap and safe:
- The JSON array is scanned once with ``JSONDecoder.raw_decode`` over buffered text, keeping only each record's
  byte span and key; pool workers re-read their records by seek, so no process ever holds the whole data set.
- Bad images (missing, empty, undecodable, truncated, larger than ``images.MAX_PIXELS``, or a path escaping the
  image root) and records of the wrong shape (no non-empty ``conversations`` list of ``{"from": str, "value":
  str}`` turns) are found here, once, and listed in ``skipped.jsonl`` -- not discovered as crashes in the middle
  of a training run. What depends on the template and tokenizer (gpt-first or non-alternating turns, ``<image>``
  placement, length) is checked when training encodes the record, which skips and counts it
  (``samples.SampleBuilder``). A JSON file that is not UTF-8 stops the conversion before any shard is written.
- Each shard is written to ``*.tar.tmp`` and renamed, after its stats sidecar, so a killed run leaves only
  complete shards; re-running with the same arguments resumes and produces the identical index.
"""

from __future__ import annotations

import codecs
import io
import json
import multiprocessing as mp
import os
import random
import re
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from lightning_sp.data import locations
from lightning_sp.data.images import ImageDecodeError, check_header

ARGS_FILE = "convert_args.json"  # what the shards in a directory were made from; guards resume
_WS = re.compile(r"[ \t\n\r]*")
_MTIME = 1_600_000_000  # fixed member mtime: identical inputs give byte-identical shards


class ConvertError(RuntimeError):
    pass


def iter_json_array(path, chunk_chars: int = 1 << 20):
    """Yield ``(element, byte_offset, byte_length)`` for each element of the top-level JSON array in ``path``,
    reading ``chunk_chars`` characters at a time."""
    decoder = json.JSONDecoder()
    # newline="" keeps "\r\n" as two characters, so character spans map back to byte spans exactly.
    with open(path, encoding="utf-8", newline="") as f:
        buf, pos, byte_pos, eof = "", 0, 0, False  # byte_pos: file offset of buf[pos]

        def advance(new_pos: int) -> None:
            nonlocal pos, byte_pos
            byte_pos += len(buf[pos:new_pos].encode("utf-8"))
            pos = new_pos

        def fill() -> None:
            nonlocal buf, pos, eof
            try:
                more = f.read(chunk_chars)
            except UnicodeDecodeError as exc:
                raise ConvertError(
                    f"{path} is not UTF-8 ({exc.reason} at byte {_bad_utf8_offset(path)}); LLaVA JSON must be "
                    "UTF-8: re-encode the file, e.g. iconv -f <its encoding> -t utf-8"
                ) from None
            eof = not more
            buf, pos = buf[pos:] + more, 0

        def next_char() -> str:  # first non-blank character, reading on as needed; "" at end of file
            while True:
                advance(_WS.match(buf, pos).end())
                if pos < len(buf) or eof:
                    return buf[pos : pos + 1]
                fill()

        fill()
        if buf.startswith("\ufeff"):  # a UTF-8 byte-order mark is 3 bytes on disk
            advance(1)
        if next_char() != "[":
            raise ConvertError(f"{path}: expected a JSON array (a list of LLaVA records)")
        advance(pos + 1)
        first = True
        while True:
            ch = next_char()
            if ch == "]":
                return
            if not first:
                if ch != ",":
                    raise ConvertError(f"{path}: expected ',' or ']' at byte {byte_pos}, found {ch!r}")
                advance(pos + 1)
                next_char()
            while True:
                try:
                    element, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number at the buffer's end might continue in the next chunk
                        break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise ConvertError(f"{path}: invalid JSON near byte {byte_pos}: {exc.msg}") from exc
                fill()
            start = byte_pos
            advance(end)
            yield element, start, byte_pos - start
            first = False


def _bad_utf8_offset(path) -> int:
    """Byte offset of the first invalid UTF-8 sequence in ``path`` (-1 if none), for the error message."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a sequence the previous chunk ended inside
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start
            offset += len(chunk)
    return -1


def sanitize_key(raw) -> str:
    """WebDataset splits member names at the first dot and treats "/" as folders: keep [A-Za-z0-9_-] only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(raw)) or "record"


def _plan(json_path: str, shard_size: int, seed: int) -> tuple[list[list[tuple[int, int, str]]], int]:
    """Scan the JSON once: (shards of (byte_offset, byte_length, key) in shuffled order, number of records)."""
    entries, seen = [], set()
    for i, (record, offset, length) in enumerate(iter_json_array(json_path)):
        rid = record.get("id") if isinstance(record, dict) else None
        key = base = sanitize_key(rid if rid is not None else f"record_{i}")
        n = 0
        while key in seen:  # ids that collide (or sanitise to the same key) get a stable suffix, file order
            n += 1
            key = f"{base}_dup{n}"
        seen.add(key)
        entries.append((offset, length, key))
    random.Random(seed).shuffle(entries)
    return [entries[i : i + shard_size] for i in range(0, len(entries), shard_size)], len(entries)


class _Skip(Exception):
    """A record the converter leaves out; ``reason`` is a stable code counted in the index."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _load_image(root: Path, rel) -> tuple[bytes, str]:
    """The image's bytes and its tar extension (jpeg -> jpg), or raise :class:`_Skip`."""
    if not isinstance(rel, str) or not rel:
        raise _Skip("malformed", f"image must be a non-empty string, got {rel!r}")
    posix = PurePosixPath(rel.replace("\\", "/"))
    if posix.is_absolute() or os.path.isabs(rel) or ".." in posix.parts:
        raise _Skip("escapes_root", "absolute paths and '..' are refused")
    path = root / posix
    if not path.is_file():
        raise _Skip("missing", f"no file at {path}")
    data = path.read_bytes()
    if not data:
        raise _Skip("empty", "zero bytes")
    try:
        fmt = (check_header(data) or "").lower()  # refuses a decompression bomb before decoding a pixel
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # PNG chunk CRCs
        with Image.open(io.BytesIO(data)) as img:
            # A truncated JPEG passes verify(); decoding reads every byte. At 1/8 scale (libjpeg's DCT scaling) it
            # costs a fraction of a full decode.
            img.draft("RGB", (1, 1))
            img.load()
    except ImageDecodeError as exc:
        raise _Skip(exc.reason, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for bad files
        raise _Skip("corrupt", f"{type(exc).__name__}: {exc}") from None
    ext = posix.suffix.lower().lstrip(".")
    if not ext.isalnum() or ext == "json":  # no usable extension: name it after the detected format
        ext = fmt
    return data, {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
    tar.addfile(info, io.BytesIO(data))


def _malformed(record) -> str | None:
    """Why ``record`` is not shaped like a LLaVA record (types only), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record object"
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        return "no non-empty 'conversations' list"
    for i, turn in enumerate(convs):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return f"turn {i} is not {{'from': str, 'value': str}}"
    return None


def _write_shard(task: tuple) -> dict:
    index, entries, json_path, image_root, out_dir = task
    name = f"shard-{index:06d}.tar"
    stats = {"name": name, "samples": 0, "images": 0, "text_only": 0, "skipped": []}
    root, out = Path(image_root), Path(out_dir)
    tmp = out / (name + ".tmp")
    with open(json_path, "rb") as src, tarfile.open(tmp, "w") as tar:
        for offset, length, key in entries:
            src.seek(offset)
            record = json.loads(src.read(length))
            is_record = isinstance(record, dict)
            try:
                problem = _malformed(record)
                if problem:
                    raise _Skip("malformed", problem)
                try:  # a "\ud800" escape parses to a lone surrogate, which no UTF-8 file can hold
                    member = json.dumps(record, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise _Skip("not_utf8", f"text holds an unpaired UTF-16 surrogate: {exc.reason}") from None
                image = _load_image(root, record["image"]) if "image" in record else None
            except _Skip as skip:
                stats["skipped"].append(
                    {
                        "id": record.get("id", key) if is_record else key,
                        "path": record.get("image") if is_record else None,
                        "reason": skip.reason,
                        "detail": skip.detail,
                    }
                )
                continue
            _add(tar, f"{key}.json", member)
            if image is not None:
                _add(tar, f"{key}.{image[1]}", image[0])
                stats["images"] += 1
            else:
                stats["text_only"] += 1
            stats["samples"] += 1
    # Sidecar first, tar last: a present .tar always has its stats, a killed run leaves at most a .tmp.
    (out / (name[:-4] + ".stats.json")).write_text(json.dumps(stats))
    os.replace(tmp, out / name)
    return stats


def _check_resume(out: Path, args: dict) -> None:
    """Refuse to mix shards made from different inputs; allow resuming the same conversion."""
    args_path = out / ARGS_FILE
    if args_path.is_file():
        old = json.loads(args_path.read_text())
        if old != args:
            diff = {k: (old.get(k), args.get(k)) for k in sorted(set(old) | set(args)) if old.get(k) != args.get(k)}
            raise ConvertError(
                f"{out} holds shards made with different arguments (old, new): {diff}. "
                "Use another out_dir or delete this one."
            )
    elif out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out} is not empty and has no {ARGS_FILE}; convert into an empty or new directory")


def convert(
    json_path, image_root, out_dir, shard_size: int = 1000, workers: int = 2, seed: int = 0, progress: bool = True
) -> dict:
    """Convert a LLaVA-format JSON list (+ images under ``image_root``) into shuffled WebDataset shards.

    Each sample is ``<key>.json`` (the record) and, for records with an image, ``<key>.<ext>`` (the file's bytes
    as-is). Returns the index, also written to ``out_dir/index.json``; skipped records go to ``skipped.jsonl``.
    """
    json_path, image_root, out = Path(json_path).resolve(), Path(image_root).resolve(), Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    stat = json_path.stat()
    args = {
        "json_path": str(json_path),
        "image_root": str(image_root),
        "shard_size": shard_size,
        "seed": seed,
        "json_size": stat.st_size,
        "json_mtime_ns": stat.st_mtime_ns,
    }
    _check_resume(out, args)
    shards, n_records = _plan(str(json_path), shard_size, seed)  # a JSON error stops here, leaving out_dir as it was
    out.mkdir(parents=True, exist_ok=True)
    (out / ARGS_FILE).write_text(json.dumps(args, indent=1))

    results: dict[int, dict] = {}
    tasks = []
    for i, entries in enumerate(shards):
        tar, sidecar = out / f"shard-{i:06d}.tar", out / f"shard-{i:06d}.stats.json"
        if tar.is_file() and sidecar.is_file():
            results[i] = json.loads(sidecar.read_text())  # complete from an earlier run
        else:
            tasks.append((i, entries, str(json_path), str(image_root), str(out)))

    bar = tqdm(
        total=n_records,
        initial=n_records - sum(len(t[1]) for t in tasks),
        unit="rec",
        desc=f"sharding {json_path.name}",
        disable=not progress,
    )
    if workers > 1 and len(tasks) > 1:
        # fork where there is one: spawn would re-import the caller's __main__ in every worker (fails for stdin
        # scripts, recurses in scripts without a main guard). The workers use only PIL, json and tarfile.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for stats in pool.imap_unordered(_write_shard, tasks):
                results[int(stats["name"][6:12])] = stats
                bar.update(stats["samples"] + len(stats["skipped"]))
    else:
        for task in tasks:
            stats = _write_shard(task)
            results[task[0]] = stats
            bar.update(stats["samples"] + len(stats["skipped"]))
    bar.close()

    ordered = [results[i] for i in range(len(shards))]
    skipped = [s for st in ordered for s in st["skipped"]]
    # backslashreplace: an id may hold a lone surrogate (see _write_shard), which UTF-8 cannot encode.
    with open(out / "skipped.jsonl", "w", encoding="utf-8", errors="backslashreplace") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
    index = {
        "source": str(json_path),
        "image_root": str(image_root),
        "shard_size": shard_size,
        "seed": seed,
        "shards": [{k: st[k] for k in ("name", "samples", "images", "text_only")} for st in ordered],
        "totals": {
            "records": n_records,
            "samples": sum(st["samples"] for st in ordered),
            "images": sum(st["images"] for st in ordered),
            "text_only": sum(st["text_only"] for st in ordered),
            "skipped": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        },
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def load_index(shard_dir) -> dict:
    """The index of a shard directory, with a message naming the fix when it is missing."""
    path = locations.join(shard_dir, "index.json")
    try:  # one read (a URL is fetched once), a missing file named with the fix
        text = locations.read_text(shard_dir, "index.json")
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{path} not found: make shards with lightning_sp.data.shards.convert(...)") from None
    index = json.loads(text)
    # Shards are read as `shard_dir / name`: a name with a folder, `..` or an absolute path would read elsewhere.
    for entry in index.get("shards", []) if isinstance(index, dict) else []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name in ("", ".", "..") or PurePosixPath(name.replace("\\", "/")).name != name:
            raise ValueError(
                f"{path}: shard name {name!r} is not a plain file name in {shard_dir}; refused "
                "(an index lists the shards of its own directory)"
            )
    return index
