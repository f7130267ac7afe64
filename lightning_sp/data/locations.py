"""Where shards live: a local directory or a URL (`https://`, `s3://`, `gs://`, ...), named the same way.

Shard *reading* is WebDataset's (its `gopen` streams `http(s)://` through curl and hands other schemes to their
command-line tools or a `pipe:` command); this module only joins names onto a location and reads the small
`index.json` (fsspec for URLs). Nothing is copied to local disk.
"""

from __future__ import annotations

from pathlib import Path

import fsspec


def is_url(location) -> bool:
    return "://" in str(location)


def normalise(location):
    """A URL stays a string (a Path would fold its `//`), a local directory becomes a Path."""
    return str(location).rstrip("/") if is_url(location) else Path(location)


def join(location, name: str) -> str:
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


def read_text(location, name: str) -> str:
    """The text of `name` under `location`; FileNotFoundError naming it when it cannot be read."""
    target = join(location, name)
    if not is_url(location):
        return Path(target).read_text()
    try:
        with fsspec.open(target, "rt") as f:
            return f.read()
    except Exception as exc:  # noqa: BLE001 -- every scheme fails its own way; the message names the URL
        raise FileNotFoundError(f"{target} cannot be read ({type(exc).__name__}: {exc})") from exc


def exists(location, name: str) -> bool:
    if not is_url(location):
        return (Path(location) / name).is_file()
    try:
        read_text(location, name)
        return True
    except FileNotFoundError:
        return False
