"""Where shards live: a local directory or a URL (`https://`, `s3://`, `gs://`, `memory://`, ...), named the same way.

Every reader of shards (the training stream, the validation loader, `eval`'s synthetic questions) opens them through
:func:`open_shard` and unpacks them with :func:`tar_samples`, so a scheme works for all three or for none:

* local paths, `file://` and `pipe:` are opened by WebDataset's `gopen` (a plain `open` / a subprocess);
* `http://` and `https://` stay on WebDataset's curl stream: one sequential GET per shard, no HEAD or range
  requests, and the path `tests/test_remote_shards.py` checks against a real HTTP server;
* every other scheme (`s3://`, `gs://`, `memory://`, `hf://`, ...) goes through fsspec, the library that also reads
  its `index.json` (`read_text`), so one install and one set of credentials serve both. WebDataset 1.0 has no `s3`
  handler at all and sends `gs` to the `gsutil` command-line tool, which is no dependency of ours; fsspec needs
  the scheme's own package (`pip install lightning_sp[remote]` brings s3fs and gcsfs).

Nothing is copied to local disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator
from urllib.parse import urlparse

import fsspec
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

# Schemes left to WebDataset's gopen (see the module docstring); "" is a local path.
WEBDATASET_SCHEMES = frozenset({"", "file", "pipe", "http", "https"})


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


def open_shard(url: str) -> BinaryIO:
    """A binary stream of the shard at `url` (a local path or a URL), opened as the module docstring says."""
    scheme = urlparse(str(url)).scheme
    # A one-letter "scheme" is a Windows drive (C:\...), a local path.
    if scheme in WEBDATASET_SCHEMES or len(scheme) == 1:
        return wds.gopen(str(url), "rb")
    try:
        return fsspec.open(str(url), "rb").open()
    except ImportError as exc:  # fsspec knows the scheme, its package is not installed
        raise ImportError(f"shard {url}: {exc} (`pip install lightning_sp[remote]` brings s3fs and gcsfs)") from exc


def _opened(sources: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """WebDataset's url_opener with :func:`open_shard` in place of `gopen`; errors go to `handler` the same way."""
    for source in sources:
        url = source["url"]
        try:
            yield {**source, "stream": open_shard(url)}
        except Exception as exc:  # noqa: BLE001 -- the handler decides, as in WebDataset's own opener
            exc.args = (*exc.args, url)
            if not handler(exc):
                break


def tar_samples(sources: Iterable[dict], handler: Callable[[Exception], bool] = wds.reraise_exception):
    """The samples (`__key__`, `__url__` and one entry per file suffix) of the shards `{"url": ...}` in `sources`,
    in order: WebDataset's tar expansion and grouping over streams from :func:`open_shard`."""
    return group_by_keys(tar_file_expander(_opened(sources, handler), handler=handler), handler=handler)


class ShardDataset(wds.DataPipeline, wds.FluidInterface):
    """The samples of `urls`, in order, each read once: what `wds.WebDataset(urls, shardshuffle=False,
    nodesplitter=None, workersplitter=None, empty_check=False)` gives, with the shards opened by :func:`open_shard`.
    Keeps WebDataset's `compose` / `batched` interface."""

    def __init__(self, urls: list[str], handler: Callable[[Exception], bool] = wds.reraise_exception):
        super().__init__(wds.SimpleShardList(list(urls)), wds.pipelinefilter(tar_samples)(handler=handler))
