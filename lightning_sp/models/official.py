"""Import and export of the released LLaVA-SP projector weights (docs/METHOD.md §3).

The official `non_lora_trainables.bin` of `Levideus/llava-sp-{pooling,cropping}-lora` holds the SFE, DFI, W_s and
W_p tensors under PEFT names such as `base_model.model.model.conv_4.1.weight`. `KEY_TABLE` below is the only
place that relates those names to our `SpatialProjector` parameter names; import and export both derive from it.

Loading is strict: every key the variant needs must be present, nothing else may be, every shape must match the
projector built from the widths found in the file, and every weight must be a finite float tensor. Any
violation raises `OfficialCheckpointError` listing *all* offending keys (compacted, e.g.
`model.conv_{4,8,12}.1.weight`). `.bin` files are read with `torch.load(weights_only=True)`: a file holding
anything but tensors and plain containers is refused, never unpickled.

The release does not record its variant (pooling or cropping); the caller must name it. A file of the other
variant is still detected, because the two key sets differ, and the error says so.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch

from lightning_sp.errors import InputError
from lightning_sp.schema import ProjectorConfig
from lightning_sp.models.projectors import build_projector
from lightning_sp.models.projectors.spatial import PAPER_GRID, PAPER_SIDES, SpatialProjector

__all__ = [
    "KEY_TABLE",
    "PEFT_PREFIX",
    "VARIANTS",
    "KeyMap",
    "OfficialCheckpointError",
    "OfficialWidths",
    "check_official_state_dict",
    "compact_keys",
    "export_official_projector",
    "key_table",
    "load_official_projector",
    "official_state_dict",
    "read_tensor_file",
    "split_official_state_dict",
]

PEFT_PREFIX = "base_model.model."  # PEFT's wrapper prefix in front of the LLaVA module names
VARIANTS = ("pooling", "cropping")
BIN_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_VARIANT_KEY = "lightning_sp.variant"  # metadata we write into exported .safetensors files

# Module roots (first two name components, prefix stripped) of the LLM and vision tower in a LLaVA state dict:
# `split_official_state_dict` sets these aside. Everything else counts as projector and is checked strictly.
NON_PROJECTOR_ROOTS = (
    "model.embed_tokens",
    "model.layers",
    "model.norm",
    "model.rotary_emb",
    "model.vision_tower",
    "lm_head",
)

StateDict = Mapping[str, torch.Tensor]
Source = Union[str, os.PathLike, StateDict]


class OfficialCheckpointError(InputError):
    """An official-layout state dict does not match the requested LLaVA-SP variant (or cannot be read safely)."""

    def __init__(
        self, message: str, *, missing: Iterable[str] = (), unexpected: Iterable[str] = (), bad: Iterable[str] = ()
    ) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.bad = sorted(missing), sorted(unexpected), sorted(bad)


# ---- the key map ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMap:
    """One tensor: our `SpatialProjector` parameter name <-> the official name (without `PEFT_PREFIX`)."""

    ours: str
    official: str


def _build_key_table(variant: str) -> tuple[KeyMap, ...]:
    rows = []
    for i, side in enumerate(PAPER_SIDES):
        # Pooling's windows are `Sequential(AdaptiveAvgPool2d, Conv2d)` -> `.1.`; its global window is the bare conv.
        # The names keep the paper's sides at any grid: window i of `scaled_sides(grid)`.
        pooled = variant == "pooling" and i < len(PAPER_SIDES) - 1
        rows.append(KeyMap(f"sfe.weights.{i}", f"model.conv_{side}{'.1' if pooled else ''}.weight"))
    rows.append(KeyMap("dfi.kv_weight", "model.conv_CM.weight"))
    for ours, official in (("query", "query_projector"), ("key", "key_projector"), ("value", "value_projector")):
        for index in (0, 1):  # 0 LayerNorm(D), 1 Linear(D, D)
            for param in ("weight", "bias"):
                rows.append(KeyMap(f"dfi.{ours}.{index}.{param}", f"model.{official}.{index}.{param}"))
    rows.append(KeyMap("spatial_head.1.weight", "model.conv_linear.1.weight"))  # W_s: GELU -> Linear(2D, H)
    if variant == "cropping":  # only the released Cropping head has a bias
        rows.append(KeyMap("spatial_head.1.bias", "model.conv_linear.1.bias"))
    for index in (0, 2):  # W_p: Linear(C, H) -> GELU -> Linear(H, H)
        for param in ("weight", "bias"):
            rows.append(KeyMap(f"patch_head.{index}.{param}", f"model.mm_projector.{index}.{param}"))
    return tuple(rows)


KEY_TABLE: dict[str, tuple[KeyMap, ...]] = {variant: _build_key_table(variant) for variant in VARIANTS}

# Where the widths are read from (official names): C and H from W_p's first Linear (H, C), D from the DFI conv.
_WIDTH_SOURCES = {
    "C": ("model.mm_projector.0.weight", 1),
    "H": ("model.mm_projector.0.weight", 0),
    "D": ("model.conv_CM.weight", 0),
}
_WIDTH_NDIM = {"model.mm_projector.0.weight": 2, "model.conv_CM.weight": 4}


def key_table(variant: str) -> tuple[KeyMap, ...]:
    """The rows of `KEY_TABLE` for `variant` ('pooling' or 'cropping')."""
    _check_variant(variant)
    return KEY_TABLE[variant]


@dataclass(frozen=True)
class OfficialWidths:
    """Widths found in an official state dict: CLIP width C, SP width D, LLM hidden size H."""

    C: int
    D: int
    H: int


# ---- compact key lists for error messages --------------------------------------------------------------------


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _render_alternatives(alts: list[str]) -> str:
    if len(alts) == 1:
        return alts[0]
    prefix = os.path.commonprefix(alts)
    prefix = prefix[: prefix.rfind("_") + 1]  # factor out only whole `word_` prefixes ...
    rest = [a[len(prefix) :] for a in alts]
    suffix = os.path.commonprefix([r[::-1] for r in rest])[::-1]
    suffix = suffix[suffix.find("_") :] if "_" in suffix else ""  # ... and `_word` suffixes
    middles = [r[: len(r) - len(suffix)] for r in rest]
    if all(m.isdigit() for m in middles):
        numbers, parts = sorted(int(m) for m in middles), []
        start = prev = numbers[0]
        for n in numbers[1:] + [None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            parts.append(f"{start}-{prev}" if prev - start >= 2 else ",".join(str(x) for x in range(start, prev + 1)))
            if n is not None:
                start = prev = n
        middles = parts
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def compact_keys(keys: Iterable[str]) -> str:
    """All `keys`, merged where they differ in one dotted component: `model.conv_{4,8}.1.weight`."""
    items = [[[c] for c in key.split(".")] for key in sorted(set(keys), key=_natural)]
    changed = True
    while changed:
        changed = False
        for pos in reversed(range(max((len(i) for i in items), default=0))):
            merged, index = [], {}
            for item in items:
                if len(item) <= pos:
                    merged.append(item)
                    continue
                signature = (len(item), repr(item[:pos]), repr(item[pos + 1 :]))
                if signature in index:
                    merged[index[signature]][pos] = merged[index[signature]][pos] + item[pos]
                    changed = True
                else:
                    index[signature] = len(merged)
                    merged.append([list(c) for c in item])
            items = merged
    return ", ".join(".".join(_render_alternatives(c) for c in item) for item in items)


# ---- reading and checking ------------------------------------------------------------------------------------


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise OfficialCheckpointError(
            f"variant must be one of {', '.join(VARIANTS)} (the released config does not record it), got {variant!r}"
        )


def read_tensor_file(path: Union[str, os.PathLike]) -> tuple[dict, dict]:
    """(raw state dict, safetensors metadata or {}) of a weights file as the releases ship them: `.safetensors`, or
    a `.bin`/`.pt` read with `torch.load(weights_only=True)`, never unpickled. The official projector loader and
    `import-official` (adapter and non-LoRA files) both read through here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise OfficialCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers, and is only "
            f"read with torch.load(weights_only=True), never unpickled ({str(e).splitlines()[0]})"
        ) from e
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    return dict(obj), {}


def _read(src: Source) -> tuple[dict, str, dict]:
    """(raw state dict, a description of the source, safetensors metadata or {})."""
    if isinstance(src, Mapping):
        return dict(src), "state dict", {}
    raw, metadata = read_tensor_file(src)
    return raw, str(src), metadata


def _strip(raw: dict, where: str) -> dict[str, torch.Tensor]:
    """Drop `PEFT_PREFIX`; keys must be strings and values tensors, and stripping must not merge two keys."""
    not_tensors = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str))
    if not_tensors:
        raise OfficialCheckpointError(
            f"{where}: entries that are not tensors (or not str-named): {compact_keys(not_tensors)}", bad=not_tensors
        )
    stripped: dict[str, torch.Tensor] = {}
    origin: dict[str, list[str]] = {}
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        stripped[name] = value
        origin.setdefault(name, []).append(key)
    clashes = sorted(k for keys in origin.values() if len(keys) > 1 for k in keys)
    if clashes:
        raise OfficialCheckpointError(
            f"{where}: the same tensor appears with and without the '{PEFT_PREFIX}' prefix: {compact_keys(clashes)}",
            bad=clashes,
        )
    return stripped


def _release_cfg(variant: str, sp_width: int) -> ProjectorConfig:
    """The released configuration: the paper's six windows, DFI with 25 K/V tokens, W_s bias for cropping only."""
    return ProjectorConfig(
        name=variant, sp_width=sp_width, dfi=True, dfi_kv_tokens=25, sides=None, head_bias=variant == "cropping"
    )


def _meta_projector(variant: str, widths: OfficialWidths, grid: int) -> SpatialProjector:
    """The projector `variant` at these widths, with no storage: its parameter shapes are the expected ones."""
    with torch.device("meta"):
        projector = build_projector(
            _release_cfg(variant, widths.D), vision_width=widths.C, llm_width=widths.H, grid=grid
        )
    ours = set(projector.state_dict())
    table = {row.ours for row in KEY_TABLE[variant]}
    if ours != table:  # a projector change that the table does not follow: a bug here, not in the file
        raise RuntimeError(
            f"KEY_TABLE[{variant!r}] is out of date with SpatialProjector: "
            f"not in table {sorted(ours - table)}, not in projector {sorted(table - ours)}"
        )
    return projector


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _validate(
    stripped: dict[str, torch.Tensor], variant: str, grid: int, where: str, meta: Mapping[str, str]
) -> tuple[OfficialWidths, SpatialProjector]:
    _check_variant(variant)
    header = f"{where} is not an official LLaVA-SP {variant}+DFI projector state dict"
    recorded = meta.get(SAFETENSORS_VARIANT_KEY)
    if recorded is not None and recorded != variant:
        raise OfficialCheckpointError(f"{header}: the file records variant {recorded!r}; pass variant={recorded!r}")

    # 1. key sets
    expected = {row.official for row in KEY_TABLE[variant]}
    missing, unexpected = sorted(expected - set(stripped)), sorted(set(stripped) - expected)
    if missing or unexpected:
        lines = [f"{header} (names shown without the '{PEFT_PREFIX}' prefix):"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {compact_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {compact_keys(unexpected)}")
        other = [v for v in VARIANTS if v != variant and {r.official for r in KEY_TABLE[v]} <= set(stripped)]
        if other:
            lines.append(f"  the file has every key of the '{other[0]}' layout: pass variant={other[0]!r}")
        if unexpected and any(_is_non_projector(k) for k in unexpected):
            lines.append(
                "  some unexpected keys belong to the LLM / vision tower: load "
                "split_official_state_dict(state_dict)[0] to import only the projector"
            )
        raise OfficialCheckpointError("\n".join(lines), missing=missing, unexpected=unexpected)

    # 2. float tensors only
    not_float = sorted(k for k, v in stripped.items() if not v.is_floating_point())
    if not_float:
        raise OfficialCheckpointError(
            f"{header}: non-floating-point tensors: "
            + "; ".join(f"{k} ({stripped[k].dtype})" for k in sorted(not_float, key=_natural)),
            bad=not_float,
        )

    # 3. widths, then every shape against the projector built at those widths
    bad_sources = sorted({k for k, _ in _WIDTH_SOURCES.values() if stripped[k].dim() != _WIDTH_NDIM[k]})
    if bad_sources:
        raise OfficialCheckpointError(
            f"{header}: cannot read the widths: "
            + "; ".join(f"{k} has shape {_shape(stripped[k])}, expected {_WIDTH_NDIM[k]}-D" for k in bad_sources),
            bad=bad_sources,
        )
    widths = OfficialWidths(**{sym: int(stripped[k].shape[i]) for sym, (k, i) in _WIDTH_SOURCES.items()})
    projector = _meta_projector(variant, widths, grid)
    want = projector.state_dict()
    wrong = [row.official for row in KEY_TABLE[variant] if stripped[row.official].shape != want[row.ours].shape]
    if wrong:
        detail = "\n".join(
            f"  {row.official}: got {_shape(stripped[row.official])}, expected {_shape(want[row.ours])}"
            for row in KEY_TABLE[variant]
            if row.official in wrong
        )
        raise OfficialCheckpointError(
            f"{header}: {len(wrong)} shape(s) do not match the {variant} projector at C={widths.C}, D={widths.D}, "
            f"H={widths.H}, grid {grid} (C and H read from model.mm_projector.0.weight [H, C], D from "
            f"model.conv_CM.weight [D, C, k, k]):\n{detail}",
            bad=wrong,
        )

    # 4. finite values (meta tensors have none to check)
    non_finite = sorted(k for k, v in stripped.items() if not v.is_meta and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise OfficialCheckpointError(
            f"{header}: non-finite values (NaN/inf) in {compact_keys(non_finite)}", bad=non_finite
        )
    return widths, projector


def check_official_state_dict(src: Source, variant: str, grid: int = PAPER_GRID) -> OfficialWidths:
    """Validate an official file or state dict for `variant` (keys, dtypes, shapes, finiteness); its widths."""
    raw, where, meta = _read(src)
    widths, _ = _validate(_strip(raw, where), variant, grid, where, meta)
    return widths


# ---- import --------------------------------------------------------------------------------------------------


def load_official_projector(
    src: Source, variant: str, grid: int = PAPER_GRID, *, dtype: Optional[torch.dtype] = torch.float32
) -> SpatialProjector:
    """Build our `SpatialProjector` from an official LLaVA-SP state dict.

    `src`: a `non_lora_trainables.bin` (read with `torch.load(weights_only=True)`), a `.safetensors` file, or an
    already loaded state dict; keys with or without `base_model.model.`. `variant`: 'pooling' or 'cropping'
    (required: the release does not record it). C, D, H come from the weights. `dtype`: the projector's dtype
    (float32 by default); None keeps the file's dtype, which must then be the same for every tensor.
    Raises `OfficialCheckpointError` naming every missing, unexpected, mis-shaped or non-finite key.
    """
    raw, where, meta = _read(src)
    stripped = _strip(raw, where)
    _, projector = _validate(stripped, variant, grid, where, meta)
    if dtype is None:
        dtypes = {v.dtype for v in stripped.values()}
        if len(dtypes) != 1:
            by_dtype = {str(d): compact_keys(k for k, v in stripped.items() if v.dtype == d) for d in dtypes}
            raise OfficialCheckpointError(
                f"{where}: dtype=None keeps the file's dtype, but it mixes "
                + "; ".join(f"{d}: {keys}" for d, keys in sorted(by_dtype.items()))
            )
        dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise OfficialCheckpointError(f"dtype must be a floating-point dtype, got {dtype}")
    # A state dict passed in by the caller is copied: the projector must not alias tensors it does not own.
    copy = isinstance(src, Mapping)
    ours = {row.ours: stripped[row.official].to(dtype=dtype, copy=copy).contiguous() for row in KEY_TABLE[variant]}
    projector.load_state_dict(ours, strict=True, assign=True)  # meta parameters -> the checkpoint's tensors
    return projector


def _is_non_projector(key: str) -> bool:
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    return any(name == root or name.startswith(root + ".") for root in NON_PROJECTOR_ROOTS)


def split_official_state_dict(state_dict: StateDict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(projector part, LLM / vision-tower part) of a LLaVA state dict, keys unchanged.

    Keys under `NON_PROJECTOR_ROOTS` (embed_tokens, layers, norm, lm_head, vision_tower, ...) go to the second
    part; *everything else* stays in the first, so that a stray or misnamed projector key still reaches the
    strict loader and is reported rather than silently dropped.
    """
    projector, rest = {}, {}
    for key, value in state_dict.items():
        (rest if _is_non_projector(key) else projector)[key] = value
    return projector, rest


# ---- export --------------------------------------------------------------------------------------------------


def official_state_dict(projector: SpatialProjector, variant: str, *, prefix: bool = True) -> dict[str, torch.Tensor]:
    """Our projector's tensors under the official names (with `base_model.model.` unless prefix=False).

    The tensors are detached views of the projector's parameters (no copy). Only the released layouts can be
    expressed (the paper's six windows, DFI with 25 K/V tokens, W_s bias for cropping only, finite weights);
    anything else raises `OfficialCheckpointError`.
    """
    _check_variant(variant)
    if not isinstance(projector, SpatialProjector):
        raise OfficialCheckpointError(
            f"only LLaVA-SP projectors have an official layout, got {type(projector).__name__}"
        )
    if projector.window_layout != variant:
        raise OfficialCheckpointError(f"cannot export a {projector.window_layout} projector as variant {variant!r}")
    ours = projector.state_dict()
    names = {row.ours for row in KEY_TABLE[variant]}
    missing, unexpected = sorted(names - set(ours)), sorted(set(ours) - names)
    if missing or unexpected:
        parts = [
            f"{label} [{compact_keys(keys)}]" for label, keys in (("lacks", missing), ("has extra", unexpected)) if keys
        ]
        raise OfficialCheckpointError(
            f"this {variant} projector has no official layout (the release is {variant}+DFI, W_s bias "
            f"{'yes' if variant == 'cropping' else 'no'}): {', '.join(parts)}",
            missing=missing,
            unexpected=unexpected,
        )
    state = {row.official: ours[row.ours].detach() for row in KEY_TABLE[variant]}
    # Same names is not enough (other window sides, 49 K/V tokens): check shapes and values as an import would.
    _validate(state, variant, projector.grid, f"the {type(projector).__name__} to export", {})
    lead = PEFT_PREFIX if prefix else ""
    return {lead + name: tensor for name, tensor in state.items()}


def export_official_projector(
    projector: SpatialProjector, path: Union[str, os.PathLike], variant: str, *, dtype: Optional[torch.dtype] = None
) -> Path:
    """Write `official_state_dict(projector, variant)` to `path`: `.safetensors` via safetensors (with the
    variant in its metadata), `.bin`/`.pt`/`.pth` via `torch.save` (as the release). `dtype`: cast on the way
    out (None keeps the projector's). Written to a temporary file, then renamed."""
    path = Path(path)
    if path.suffix not in (SAFETENSORS_SUFFIX, *BIN_SUFFIXES):
        raise OfficialCheckpointError(
            f"unknown checkpoint extension {path.suffix!r} for {path}; use "
            f"{SAFETENSORS_SUFFIX} or {', '.join(BIN_SUFFIXES)}"
        )
    state = {
        k: v.to(device="cpu", dtype=dtype or v.dtype).contiguous()
        for k, v in official_state_dict(projector, variant).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": "pt", SAFETENSORS_VARIANT_KEY: variant})
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path
