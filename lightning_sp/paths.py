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
