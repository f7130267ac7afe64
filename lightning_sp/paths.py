"""Where relative paths in configs point: the working directory, then the checkout (repository root), then the
files the package ships (`lightning_sp/shipped/`: the configs, the tokenizer, the pretrained tiny encoder).

In a checkout, `conf/`, `data/tokenizer` and `data/encoder` are links into `lightning_sp/shipped/`; an installed
wheel has no checkout, and `data/tokenizer` still resolves, to the copy inside the package.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
SHIPPED = PACKAGE_DIR / "shipped"


def resolve(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for root in (REPO_ROOT, SHIPPED):
        candidate = root / p
        if candidate.exists():
            return candidate
    return p


def anchored(path: str | Path | None) -> str | None:
    """A config path as a run saw it, for files that may not exist yet (data to regenerate): an absolute or
    existing path as it is, anything else under the repository root, where `make` runs, whatever the working
    directory now is (a notebook runs in notebooks/). :func:`resolve` is for files that must exist."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or p.exists() else REPO_ROOT / p)
