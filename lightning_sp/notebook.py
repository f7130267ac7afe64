"""Execute a notebook headless (nbclient) with its parameters set, and save it with its outputs.

    python -m lightning_sp.notebook [notebooks/attention_maps.ipynb] [--run-dir RUN] [--out PATH]

This is `make notebook`: no Jupyter server is needed (nbclient + ipykernel are dev dependencies). Parameters
are set papermill-style: the cell tagged `parameters` keeps its defaults and a cell tagged
`injected-parameters` right after it assigns the given values. The executed copy goes to
`<run>/attention_maps.ipynb` (runs/ is not committed); open it with any notebook viewer (VS Code, JupyterLab,
`jupyter notebook`). The test suite runs the same function on a tiny run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from lightning_sp.paths import REPO_ROOT
from lightning_sp.runs import NO_RUN_HELP, latest_run

ATTENTION_NOTEBOOK = REPO_ROOT / "notebooks" / "attention_maps.ipynb"


def inject_parameters(nb, parameters: dict[str, Any]) -> None:
    """Insert `name = value` assignments after the cell tagged `parameters` (or first, if none is tagged)."""
    import nbformat

    if not parameters:
        return
    source = "# Parameters (injected)\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    nb.cells.insert(tagged[0] + 1 if tagged else 0, cell)


def execute(
    path: Path | str = ATTENTION_NOTEBOOK,
    parameters: Optional[dict[str, Any]] = None,
    out: Optional[Path | str] = None,
    timeout: int = 600,
    kernel_name: str = "python3",
):
    """Run every cell of the notebook at `path` (in its own directory) with `parameters` injected; a failing cell
    raises `nbclient.exceptions.CellExecutionError`. Writes the executed notebook to `out` if given; returns it."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, parameters or {})
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return nb


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_sp.notebook",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("notebook", nargs="?", default=str(ATTENTION_NOTEBOOK))
    parser.add_argument("--run-dir", default=None, help="run directory (default: the newest with a checkpoint)")
    parser.add_argument("--out", default=None, help="executed copy (default: <run>/<notebook name>)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir) if args.run_dir else latest_run()
    if run_dir is None:
        print(NO_RUN_HELP.format(root="runs"), file=sys.stderr)
        return 2
    run_dir = run_dir.resolve()
    out = Path(args.out) if args.out else run_dir / Path(args.notebook).name
    print(f"executing {args.notebook} on {run_dir} ...", flush=True)
    execute(args.notebook, {"RUN_DIR": str(run_dir)}, out, timeout=args.timeout)
    print(f"wrote {out} (open it in JupyterLab, VS Code or `jupyter notebook`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
