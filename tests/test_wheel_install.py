"""`pip install .` as a real wheel (not editable) works from any directory: the configs, the tokenizer and the
pretrained tiny encoder are package data, and a tiny training run needs nothing from the checkout."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The checkout's own editable install must not answer: only the wheel's copy is importable (PYTHONPATH first),
# and a guard refuses any lightning_sp file that does not live under the install target.
GUARD = """
import sys, lightning_sp
target = sys.argv.pop(1)
assert lightning_sp.__file__.startswith(target), f"imported {lightning_sp.__file__}, not the wheel's copy"
from lightning_sp.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO_ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("lightning_sp-*.whl"))
    target = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel, target


def run_installed(target: Path, cwd: Path, *args: str, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", GUARD, str(target), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_holds_the_configs_tokenizer_and_encoder(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "lightning_sp/shipped/conf/base.yaml",
        "lightning_sp/shipped/conf/variant/pooling.yaml",
        "lightning_sp/shipped/conf/ablate/default.yaml",
        "lightning_sp/shipped/data/tokenizer/tokenizer.json",
        "lightning_sp/shipped/data/encoder/model.safetensors",
        "lightning_sp/hf_remote/__init__.py",
    ):
        assert needed in names, needed


def test_config_from_outside_the_checkout(installed, tmp_path):
    _, target = installed
    done = run_installed(target, tmp_path, "config", "variant=cropping")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "name: cropping" in done.stdout and "tokenizer: data/tokenizer" in done.stdout


def imported_package_files(stderr: str) -> set[str]:
    """The lightning_sp source files a `PYTHONVERBOSE=1` interpreter reported importing (its `# code object from`
    / `# ... matches` lines on stderr)."""
    return set(re.findall(r"(/[^\s'\"]*?/lightning_sp/[^\s'\"]*?\.py)\b", stderr))


@pytest.mark.parametrize("entry", ["python -m lightning_sp", "lightning-sp"])
def test_the_installed_entry_points_run_from_outside_the_checkout(installed, tmp_path, entry):
    """The two ways a user starts the installed package, as they would: the module entry (`__main__`) and the
    console script pip wrote for `[project.scripts]`. No guard script can run inside them, so the interpreter's own
    import trace (PYTHONVERBOSE) shows which copy answered: every lightning_sp file it loaded is the wheel's."""
    _, target = installed
    script = target / "bin" / "lightning-sp"
    command = [sys.executable, "-m", "lightning_sp"] if entry.startswith("python") else [str(script)]
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "PYTHONVERBOSE": "1"}
    done = subprocess.run(
        [*command, "config", "variant=cropping"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "name: cropping" in done.stdout and "tokenizer: data/tokenizer" in done.stdout
    loaded = imported_package_files(done.stderr)
    assert str(target / "lightning_sp" / "cli.py") in loaded, sorted(loaded)[:10]
    assert all(f.startswith(str(target)) for f in loaded), sorted(f for f in loaded if not f.startswith(str(target)))


@pytest.mark.slow
def test_tiny_train_from_outside_the_checkout(installed, tmp_path):
    from evalkit import small_data

    _, target = installed
    done = run_installed(
        target,
        tmp_path,
        "train",
        *small_data(Path("data")),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "viz.enabled=false",
        "run_dir=run",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "data" / "shards" / "train" / "index.json").is_file()  # generated here, not in the checkout
