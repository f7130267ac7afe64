"""Shared by the benchmarks: machine description, host load, and writing one benchmark's section of RESULTS.md.

Each benchmark owns the span ``<!-- name -->`` ... ``<!-- /name -->`` of the results file and rewrites only that
span. With ``device`` the section holds one sub-block per device type (``<!-- name:cpu -->`` ...), so a CPU run
replaces the CPU block and keeps a GPU block measured earlier on a lent machine.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device: str = "cpu") -> str:
    """Platform, cores, torch and threads, and the accelerator's name for a CUDA device."""
    import torch

    parts = [
        platform.platform(),
        f"{os.cpu_count()} CPU cores",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} intra-op threads",
    ]
    if str(device).startswith("cuda") and torch.cuda.is_available():
        parts.append(f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})")
    else:
        parts.append(f"device cpu ({platform.processor() or platform.machine()})")
    return "; ".join(parts)


def replace_block(text: str, begin: str, end: str, block: str) -> str:
    """`text` with the span begin..end (markers included) replaced by `block`, or `block` appended."""
    start, stop = text.find(begin), text.find(end)
    if start >= 0 and stop > start:
        return text[:start] + block + text[stop + len(end) :]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


def update_section(text: str, name: str, body: str, device: str | None = None) -> str:
    """`text` with benchmark `name`'s section set to `body` (its `device` sub-block only, when given)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    body = body.strip("\n") + "\n"
    if device is None:
        return replace_block(text, begin, end, f"{begin}\n{body}{end}")
    start, stop = text.find(begin), text.find(end)
    inner = text[start + len(begin) : stop] if start >= 0 and stop > start else ""
    if f"<!-- {name}:" not in inner:
        inner = ""  # written before the section had per-device blocks: that content is what this run replaces
    sub_begin, sub_end = f"<!-- {name}:{device} -->", f"<!-- /{name}:{device} -->"
    inner = replace_block(inner, sub_begin, sub_end, f"{sub_begin}\n{body}{sub_end}").strip("\n")
    return replace_block(text, begin, end, f"{begin}\n{inner}\n{end}")


def write_section(path, name: str, body: str, device: str | None = None) -> None:
    """Rewrite benchmark `name`'s section of the Markdown file `path`, keeping everything else."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(update_section(text, name, body, device))


def publish(body: str, path, name: str, device: str | None = None) -> None:
    """Print a benchmark's report and, when `path` is given, write it as the benchmark's section there."""
    print(body)
    if path:
        write_section(path, name, body, device)
        print(f"wrote {path}")
