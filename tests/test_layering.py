"""The package's layers only look down: every import (module-level or inside a function) goes to the same or a
lower layer, and every module imports on its own in a fresh interpreter (no import cycle hidden by import order).

The layers, lowest first, are listed in LAYERS below (and in the README, "Package layout").
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sp"

LAYERS = [
    # 0 base: shared token constants, paths, dtypes, errors, key=value args, global-batch arithmetic, config schema,
    # registries, ranks, RNG, statistics, third-party internals
    ["constants", "paths", "dtypes", "errors", "overrides", "global_batch", "schema", "registry", "rng", "ranks",
     "stats", "thirdparty"],
    ["data"],  # 1 data: tokenizers, conversation formats, images, shards, streams, the datamodule
    ["models"],  # 2 components: vision and LLM backbones, projectors, the VLM, official key tables
    ["config", "options_help", "command_options"],  # 3 composition and validation (against the registries)
    # 4 training: checkpoints, FSDP, trainable sets, metrics, attention maps, callbacks, the LightningModule
    ["checkpoint", "distributed", "trainable", "metrics", "viz", "callbacks", "module", "warm_start"],
    # 5 commands and interop: train, evaluate, generate, studies, HF/official export and import, lmms-eval, notebook
    ["train", "inference", "question_files", "evaluate", "generate", "export", "import_official", "lmms_adapter",
     "lmms_manifest", "study_spec", "study_report", "ablate", "pretrain_encoder", "runs", "notebook", "hf_remote"],
    ["cli", "__main__"],  # 6 the command line
]  # fmt: skip


def layer_of(module: str) -> int:
    """Layer of `lightning_sp.<module>` (its first component after the package)."""
    head = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"lightning_sp.{head} is in no layer of tests/test_layering.py: add it to one")


def modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def imports(module: str) -> list[tuple[str, int]]:
    """(imported lightning_sp module, line) for every import statement in `module`, wherever it stands."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_sp"):
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("lightning_sp")]
    return found


def test_every_module_is_in_a_layer():
    for module in modules():
        if module != "lightning_sp":
            layer_of(module)


def test_imports_only_look_down():
    upward = []
    for module in modules():
        if module == "lightning_sp":
            continue
        for target, line in imports(module):
            if target != "lightning_sp" and layer_of(target) > layer_of(module):
                upward.append(f"{module}:{line} imports {target} (layer {layer_of(target)} > {layer_of(module)})")
    assert not upward, "\n".join(upward)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first, in one interpreter with lightning_sp's modules cleared before each (not
    ``__main__``, which runs the command line)."""
    names = [m for m in modules() if not m.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'lightning_sp' or m.startswith('lightning_sp.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
