"""Shards that are not on a local disk: `data.train_dir` / `val_dir` as URLs, served here by an HTTP server on
127.0.0.1. The run streams them (nothing copied locally) and trains on exactly the batches the same shards give
from disk."""

import functools
import http.server
import threading

import pytest
import torch
from evalkit import small_data

from lightning_sp.config import ConfigError, check_data_paths, compose
from lightning_sp.data.prepare import ensure_synthetic
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


def test_a_crashed_run_on_urls_resumes_to_the_uninterrupted_result(served, monkeypatch):
    """Mid-epoch resume over HTTP: the replay re-reads the shards from the server up to the saved position, and
    the resumed run ends with the uninterrupted run's samples, losses and weights (two data workers)."""
    from test_resume import Crash, record_steps

    root, data, url = served
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
    _, whole_state = _run(root, data, "url-whole", *remote)
    whole = list(steps)
    steps.clear()
    crash_at[0] = 4  # after the step-3 checkpoint
    with pytest.raises(Crash):
        _run(root, data, "url-broken", *remote)
    crash_at[0] = None
    steps.clear()
    _Recording.requested.clear()
    _, resumed_state = _run(root, data, "url-broken", *remote, "resume=auto")
    assert any(p.startswith("/train/") and p.endswith(".tar") for p in _Recording.requested)  # replayed over HTTP
    assert [s for s, _, _ in steps] == [3, 4, 5] and steps == whole[3:]
    assert whole_state.keys() == resumed_state.keys()
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)
