"""Files and security: no loader unpickles code, remote code runs only when asked, no path escapes its directory.

The malicious file is a real pickle whose `__reduce__` runs `exec` (it writes a marker file). Every loader we
have must refuse it *and* the marker must not exist afterwards: refusing after unpickling would be too late.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY

from lightning_sp.config import compose, group_choices


class RunsCode:
    """Unpickling this object executes Python: it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like our checkpoints (state_dict + config) with a code-running object inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {"model.projector.w": torch.zeros(1)},
            "lightning_sp_config": {},
            "global_step": 0,
            "payload": RunsCode(marker),
        },
        path,
    )
    return path


def evil_state_dict(path: Path, marker: Path) -> Path:
    """A `non_lora_trainables.bin` / `adapter_model.bin`-shaped file with a code-running object inside."""
    torch.save({"base_model.model.model.mm_projector.0.weight": torch.zeros(1), "payload": RunsCode(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "UNPICKLED"


def test_the_payload_really_runs_code_when_unpickled(tmp_path, marker):
    """Control: without weights_only the file does execute its payload, so the tests below test something."""
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "unpickled"


# ---- every checkpoint / weights loader ------------------------------------------------------------------------


def _read_checkpoint(path, out):
    from lightning_sp.checkpoint import read_checkpoint

    read_checkpoint(path)


def _load_module(path, out):
    from lightning_sp.module import load_module

    load_module(path)


def _warm_start(path, out):
    from lightning_sp.warm_start import warm_start

    warm_start(torch.nn.Linear(1, 1), path)


def _evaluate_load(path, out):
    from lightning_sp.inference import load_for_inference

    load_for_inference(path)


def _load_run(path, out):
    from lightning_sp.runs import load_run

    load_run(path.parent.parent)  # a run directory: <run>/checkpoints/last.ckpt


def _export_hf(path, out):
    from lightning_sp.export import export_hf

    export_hf(path, out)


def _export_official(path, out):
    from lightning_sp.import_official import export_official

    export_official(path, out)


CHECKPOINT_LOADERS = {
    "read_checkpoint": _read_checkpoint,
    "module.load_module": _load_module,
    "warm_start": _warm_start,
    "inference.load_for_inference": _evaluate_load,
    "runs.load_run": _load_run,
    "export_hf": _export_hf,
    "export_official": _export_official,
}


@pytest.mark.parametrize("loader", sorted(CHECKPOINT_LOADERS))
def test_checkpoint_loaders_refuse_a_code_running_pickle(tmp_path, marker, loader):
    path = evil_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError, match=r"last\.ckpt.*refused"):
        CHECKPOINT_LOADERS[loader](path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_official_projector_loader_refuses_a_code_running_bin(tmp_path, marker):
    from lightning_sp.models.official import OfficialCheckpointError, load_official_projector

    path = evil_state_dict(tmp_path / "non_lora_trainables.bin", marker)
    with pytest.raises(OfficialCheckpointError, match="refused"):
        load_official_projector(path, "pooling")
    assert not marker.exists()


@pytest.mark.parametrize("evil_file", ["non_lora_trainables.bin", "adapter_model.bin"])
def test_release_import_refuses_a_code_running_bin(tmp_path, marker, evil_file):
    from lightning_sp.import_official import import_official, read_release
    from lightning_sp.models.official import OfficialCheckpointError

    release = tmp_path / "llava-sp-pooling-lora"
    release.mkdir()
    (release / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    for name in ("non_lora_trainables.bin", "adapter_model.bin"):
        torch.save({"x": torch.zeros(1)}, release / name)
    evil_state_dict(release / evil_file, marker)
    with pytest.raises(OfficialCheckpointError, match=f"{evil_file}.*refused"):
        read_release(release)
    with pytest.raises(OfficialCheckpointError, match=f"{evil_file}.*refused"):
        import_official(release, "pooling", tmp_path / "out", llm="x", vision="y")
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_a_code_running_checkpoint_even_when_torch_is_told_to_unpickle(tmp_path, marker, monkeypatch):
    """`resume=` goes through Lightning's loader, which passes weights_only=None to torch.load unless told; the
    environment variable below then makes torch unpickle. train() must ask for weights_only=True itself."""
    from evalkit import small_data

    from lightning_sp.train import train

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    cfg = compose(
        [
            *TINY,
            *small_data(tmp_path / "data"),
            "data.val_dir=null",
            "trainer.max_steps=1",
            "trainer.enable_progress_bar=false",
            "viz.enabled=false",
            f"run_dir={tmp_path / 'run'}",
            f"resume={path}",
        ]
    )
    with pytest.raises(pickle.UnpicklingError):
        train(cfg)
    assert not marker.exists()


def test_official_export_writes_only_inside_its_directory(tmp_path):
    """A checkpoint's provenance names the adapter file the export writes: a path there must not escape."""
    from lightning_sp.import_official import PROVENANCE_KEY, adapter_file_name
    from lightning_sp.models.official import OfficialCheckpointError

    assert adapter_file_name({}) == "adapter_model.safetensors"
    assert adapter_file_name({"adapter_file": "adapter_model.bin"}) == "adapter_model.bin"
    for bad in ("../../evil.bin", "/tmp/evil.bin", "sub/adapter_model.bin"):
        with pytest.raises(OfficialCheckpointError, match=rf"{PROVENANCE_KEY}.*adapter_file"):
            adapter_file_name({"adapter_file": bad})


# ---- trust_remote_code ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", group_choices("model"))
def test_trust_remote_code_is_off_unless_asked(model):
    cfg = compose([f"model={model}"])
    assert cfg.model.vision.trust_remote_code is False and cfg.model.llm.trust_remote_code is False


class _Captured(Exception):
    pass


@pytest.mark.parametrize("asked", [False, True])
def test_trust_remote_code_reaches_from_pretrained_as_given(monkeypatch, tokenizer, asked):
    import transformers

    from lightning_sp.models.llm import build_llm
    from lightning_sp.models.vision import build_vision

    seen = {}

    def capture(name):
        def from_pretrained(*args, **kwargs):
            seen[name] = kwargs
            raise _Captured

        return from_pretrained

    monkeypatch.setattr(transformers.CLIPVisionModel, "from_pretrained", capture("vision"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture("llm"))
    flag = str(asked).lower()
    cfg = compose(["model=llava7b", f"model.vision.trust_remote_code={flag}", f"model.llm.trust_remote_code={flag}"])
    with pytest.raises(_Captured):
        build_vision(cfg.model.vision)
    with pytest.raises(_Captured):
        build_llm(cfg.model.llm, tokenizer)
    assert seen["vision"]["trust_remote_code"] is asked and seen["llm"]["trust_remote_code"] is asked


def test_tokenizer_loader_does_not_trust_remote_code_by_default(monkeypatch):
    import transformers

    from lightning_sp.data.tokenizer import load_tokenizer

    seen = {}

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise _Captured

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(_Captured):
        load_tokenizer("some-org/some-model")
    assert seen["trust_remote_code"] is False


# ---- tars and shard directories -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.tar", "/abs/evil.tar", "sub/../../evil.tar", "..", ""])
def test_shard_index_naming_a_file_outside_its_directory_is_refused(tmp_path, name):
    from lightning_sp.data.shards import load_index

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    (shard_dir / "index.json").write_text(
        json.dumps({"shards": [{"name": name, "samples": 1}], "totals": {"samples": 1}})
    )
    with pytest.raises(ValueError, match=r"index\.json.*shard"):
        load_index(shard_dir)


def test_converter_never_writes_member_names_that_escape(tmp_path):
    """Record ids become tar member names: `../x` or `/x` must come out as plain names."""
    import tarfile

    from lightning_sp.data.shards import convert

    records = [
        {"id": rid, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
        for rid in ("../../evil", "/abs/evil", "a/../../b", "..")
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    index = convert(tmp_path / "data.json", tmp_path, tmp_path / "shards", shard_size=10, workers=1, progress=False)
    names = []
    for shard in index["shards"]:
        with tarfile.open(tmp_path / "shards" / shard["name"]) as tar:
            names += tar.getnames()
    assert len(names) == len(records)
    assert all("/" not in n and not n.startswith(".") and ".." not in n for n in names), names
