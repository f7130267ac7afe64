"""Shards that are not on a local disk: `data.train_dir` / `val_dir` as URLs, served here by an HTTP server on
127.0.0.1 (WebDataset's curl stream) and by fsspec's in-process `memory://` filesystem (the fsspec path that
`s3://` and `gs://` take; WebDataset cannot open that scheme itself). The run streams them (nothing copied locally)
and trains on exactly the batches the same shards give from disk."""

import functools
import http.server
import threading
from pathlib import Path

import fsspec
import pytest
import torch
import webdataset as wds
from evalkit import small_data
from fsspec.implementations.memory import MemoryFileSystem

from lightning_sp.config import ConfigError, compose
from lightning_sp.data.checks import check_data_paths
from lightning_sp.data.prepare import ensure_synthetic
from lightning_sp.question_files import synthetic_questions
from lightning_sp.train import train

pytestmark = pytest.mark.slow


class _Recording(http.server.SimpleHTTPRequestHandler):
    requested: list[str] = []

    def do_GET(self):  # noqa: N802 -- http.server's name
        type(self).requested.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    data = small_data(root / "data")
    cfg = compose(data)
    ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)
    handler = functools.partial(_Recording, directory=str(root / "data" / "shards"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, data, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _run(root, data, name, *extra):
    from conftest import TINY

    cfg = compose(
        [
            *TINY,
            *data,
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
            "viz.enabled=false",
            f"run_dir={root / name}",
            *extra,
        ]
    )
    return train(cfg), torch.load(root / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]


def test_training_from_urls_equals_training_from_disk(served):
    root, data, url = served
    disk_metrics, disk_state = _run(root, data, "disk")
    _Recording.requested.clear()
    url_metrics, url_state = _run(
        root, data, "url", "data.synthetic=null", f"data.train_dir={url}/train", f"data.val_dir={url}/val"
    )
    assert any(p.endswith(".tar") for p in _Recording.requested) and "/train/index.json" in _Recording.requested
    assert url_metrics["train/loss"] == disk_metrics["train/loss"]
    assert url_metrics["val/loss"] == disk_metrics["val/loss"]
    assert disk_state.keys() == url_state.keys() and all(torch.equal(disk_state[k], url_state[k]) for k in disk_state)
    assert not list((root / "url").rglob("*.tar"))  # streamed, not copied


def test_an_unreachable_url_is_named_before_any_model_is_built(served):
    _, data, url = served
    cfg = compose([*data, "data.synthetic=null", f"data.train_dir={url}/nope", f"data.val_dir={url}/val"])
    with pytest.raises(ConfigError, match=r"data.train_dir=http://127\.0\.0\.1:\d+/nope cannot be read"):
        check_data_paths(cfg)


def _crash_and_resume(root, data, name, url, monkeypatch, forget, replayed):
    """Mid-epoch resume from `url`: a run killed after its step-3 checkpoint resumes, the replay re-reads the
    shards from `url` up to the saved position (`forget()` before the resumed run, then `replayed()` says whether it
    read training shards), and the resumed run ends with
    the uninterrupted run's samples, losses and weights (two data workers)."""
    from test_resume import Crash, record_steps

    remote = [
        "data.synthetic=null",
        f"data.train_dir={url}/train",
        f"data.val_dir={url}/val",
        "data.num_workers=2",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
    ]
    crash_at = [None]
    steps = record_steps(monkeypatch, crash_at)
    _, whole_state = _run(root, data, f"{name}-whole", *remote)
    whole = list(steps)
    steps.clear()
    crash_at[0] = 4  # after the step-3 checkpoint
    with pytest.raises(Crash):
        _run(root, data, f"{name}-broken", *remote)
    crash_at[0] = None
    steps.clear()
    forget()
    _, resumed_state = _run(root, data, f"{name}-broken", *remote, "resume=auto")
    assert replayed()
    assert [s for s, _, _ in steps] == [3, 4, 5] and steps == whole[3:]
    assert whole_state.keys() == resumed_state.keys()
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)


def test_a_crashed_run_on_urls_resumes_to_the_uninterrupted_result(served, monkeypatch):
    root, data, url = served

    def replayed():  # fetched over HTTP
        return any(p.startswith("/train/") and p.endswith(".tar") for p in _Recording.requested)

    _crash_and_resume(root, data, "url", url, monkeypatch, _Recording.requested.clear, replayed)


# ---- memory://: a scheme only fsspec opens (as s3:// and gs:// are) ----------------------------------------------


class _RecordingMemory(MemoryFileSystem):
    """fsspec's memory filesystem, noting every file it opens in `log` (a file: forked data workers append too)."""

    log: Path

    def _open(self, path, *args, **kwargs):
        with open(type(self).log, "a") as f:
            f.write(f"{path}\n")
        return super()._open(path, *args, **kwargs)

    @classmethod
    def opened(cls) -> set[str]:
        """`split/name` of every file opened since `clear`."""
        return {"/".join(Path(p).parts[-2:]) for p in cls.log.read_text().split()}

    @classmethod
    def clear(cls):
        cls.log.write_text("")


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    """The synthetic shards uploaded to `memory://lsp-shards/{train,val}` (fsspec's process-wide in-memory store,
    which forked data workers inherit), read through a recording memory filesystem."""
    root = tmp_path_factory.mktemp("memory")
    data = small_data(root / "data")
    cfg = compose(data)
    ensure_synthetic(cfg.data, image_size=cfg.model.vision.image_size)
    _RecordingMemory.log = root / "opened.txt"
    _RecordingMemory.clear()
    fsspec.register_implementation("memory", _RecordingMemory, clobber=True)
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    for split in ("train", "val"):
        for f in sorted((root / "data" / "shards" / split).iterdir()):
            fs.pipe_file(f"/lsp-shards/{split}/{f.name}", f.read_bytes())
    yield root, data, "memory://lsp-shards"
    fs.rm("/lsp-shards", recursive=True)
    fsspec.register_implementation("memory", MemoryFileSystem, clobber=True)


def test_webdataset_cannot_open_memory_urls_itself(in_memory):
    """Why memory:// stands in for s3:// and gs://: WebDataset's own opener has no handler for it (nor for s3)."""
    _, _, url = in_memory
    for target in (f"{url}/train/index.json", "s3://bucket/shard.tar"):
        with pytest.raises(ValueError, match="no gopen handler"):
            wds.gopen(target)


def test_training_from_memory_urls_equals_training_from_disk(in_memory):
    root, data, url = in_memory
    disk_metrics, disk_state = _run(root, data, "disk")
    _RecordingMemory.clear()
    mem_metrics, mem_state = _run(
        root, data, "memory", "data.synthetic=null", f"data.train_dir={url}/train", f"data.val_dir={url}/val"
    )
    opened = _RecordingMemory.opened()
    assert {"train/index.json", "val/index.json"} <= opened
    assert any(p.startswith("train/") and p.endswith(".tar") for p in opened)
    assert any(p.startswith("val/") and p.endswith(".tar") for p in opened)
    assert mem_metrics["train/loss"] == disk_metrics["train/loss"]
    assert mem_metrics["val/loss"] == disk_metrics["val/loss"]
    assert disk_state.keys() == mem_state.keys() and all(torch.equal(disk_state[k], mem_state[k]) for k in disk_state)
    assert not list((root / "memory").rglob("*.tar"))  # streamed, not copied


def test_eval_reads_the_synthetic_questions_from_memory_urls(in_memory):
    root, data, url = in_memory
    disk = synthetic_questions(compose([*data, "data.synthetic=null"]))
    mem = synthetic_questions(compose([*data, "data.synthetic=null", f"data.val_dir={url}/val"]))
    assert disk and [(q.question_id, q.text, q.image, q.references) for q in mem] == [
        (q.question_id, q.text, q.image, q.references) for q in disk
    ]


def test_a_missing_memory_url_is_named_before_any_model_is_built(in_memory):
    _, data, url = in_memory
    cfg = compose([*data, "data.synthetic=null", f"data.train_dir={url}/nope", f"data.val_dir={url}/val"])
    with pytest.raises(ConfigError, match=r"data.train_dir=memory://lsp-shards/nope cannot be read"):
        check_data_paths(cfg)


def test_a_crashed_run_on_memory_urls_resumes_to_the_uninterrupted_result(in_memory, monkeypatch):
    root, data, url = in_memory

    def replayed():  # read from memory:// through fsspec (in the forked data workers)
        return any(p.startswith("train/") and p.endswith(".tar") for p in _RecordingMemory.opened())

    _crash_and_resume(root, data, "memory", url, monkeypatch, _RecordingMemory.clear, replayed)
