"""Whole-model import/export of a released LLaVA-SP LoRA directory (`Levideus/llava-sp-{pooling,cropping}-lora`).

A release directory holds (docs/METHOD.md §3):
  adapter_config.json                      PEFT LoRA config (r, lora_alpha, target_modules, base_model_name_or_path)
  adapter_model.safetensors | .bin         LoRA tensors, `base_model.model.model.layers.N.<proj>.lora_{A,B}.weight`
  non_lora_trainables.bin                  SFE, DFI, W_s, W_p under PEFT names (`base_model.model.model.conv_4.1.weight`)
  config.json                              the LLaVA config (`mm_vision_tower`, `mm_vision_select_layer`, ...)

`import_official` builds our full model from it plus a base LLM and a vision encoder (ids or local dirs) and writes
one of our run directories (`config.yaml` + `checkpoints/last.ckpt`: trainable tensors + `lightning_sp_config`,
as training writes them), usable as `init=<dir>` and by anything that loads our checkpoints. What the directory is
called plays no part (the official loader only applies LoRA when the folder name contains "lora"). Everything is
strict: every LoRA tensor our model has must be in the adapter file and nothing else may be; the projector goes
through `load_official_projector` (every key, shape and value checked); widths must agree with the encoder and LLM.

`export_official` writes the same layout back from any of our pooling/cropping checkpoints. For a checkpoint made
by `import_official`, the original adapter config, LLaVA config and tensor dtypes are kept in the checkpoint
(`lightning_sp_official`), so the export reproduces the release: same JSON, same tensor names, dtypes and values.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from lightning_sp.checkpoint import checkpoint_config, read_checkpoint, save_module_checkpoint
from lightning_sp.config import compose, group_choices
from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.data.tokenizer import run_tokenizer
from lightning_sp.models.official import (
    VARIANTS,
    OfficialCheckpointError,
    check_official_state_dict,
    compact_keys,
    load_official_projector,
    official_state_dict,
    read_tensor_file,
    split_official_state_dict,
)
from lightning_sp.models.projectors import build_projector
from lightning_sp.module import LlavaSPModule

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
LLAVA_CONFIG = "config.json"
PROVENANCE_KEY = "lightning_sp_official"  # checkpoint entry: what the release looked like, for a faithful export

LLM_PREFIX = "model.llm."  # our module's name for the (peft-wrapped) LLM
_OFFICIAL_LORA = re.compile(r"^(base_model\.model\..+)\.(lora_A|lora_B)\.weight$")
_OURS_LORA = re.compile(r"^model\.llm\.(base_model\.model\..+)\.(lora_A|lora_B)\.default\.weight$")

# adapter_config fields whose non-default value changes the adapter's function; we do not reproduce them.
_UNSUPPORTED_LORA = {
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


# ---- reading a release ---------------------------------------------------------------------------------------


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A release's weights file (models/official.read_tensor_file); every value must be a tensor."""
    tensors, _ = read_tensor_file(path)
    not_tensors = sorted(str(k) for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise OfficialCheckpointError(f"{path}: entries that are not tensors: {compact_keys(not_tensors)}")
    return tensors


def read_release(lora_dir: PathLike) -> dict[str, Any]:
    """The parts of a release directory: adapter config, adapter tensors (+ file name), non-LoRA tensors, LLaVA
    config (or None). Missing required files raise `FileNotFoundError` naming them."""
    root = Path(lora_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"release directory not found: {root}")
    adapter_file = next((root / f for f in ADAPTER_FILES if (root / f).is_file()), None)
    missing = [
        f
        for f, ok in (
            (ADAPTER_CONFIG, (root / ADAPTER_CONFIG).is_file()),
            (" or ".join(ADAPTER_FILES), adapter_file is not None),
            (NON_LORA, (root / NON_LORA).is_file()),
        )
        if not ok
    ]
    if missing:
        raise FileNotFoundError(f"{root} is not a LLaVA-SP LoRA release: missing {', '.join(missing)}")
    llava_config = root / LLAVA_CONFIG
    return {
        "adapter_config": json.loads((root / ADAPTER_CONFIG).read_text()),
        "adapter_file": adapter_file.name,
        "adapter": _load_tensors(adapter_file),
        "non_lora": _load_tensors(root / NON_LORA),
        "llava_config": json.loads(llava_config.read_text()) if llava_config.is_file() else None,
    }


def _check_adapter_config(adapter_config: dict, where: str) -> None:
    problems = []
    peft_type = adapter_config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        problems.append(f"peft_type is {peft_type!r}, not LORA")
    targets = adapter_config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        problems.append(f"target_modules must be a list of module names, got {targets!r}")
    for key, default in _UNSUPPORTED_LORA.items():
        value = adapter_config.get(key, default)
        if value != default and value not in (None, False, [], {}):
            problems.append(f"{key}={value!r} is not supported (expected {default!r})")
    if problems:
        raise OfficialCheckpointError(f"{where}: unsupported adapter config: " + "; ".join(problems))


# What our data path reproduces of LLaVA-1.5's, per config.json key: (the value we need, the value LLaVA's code
# assumes when the key is absent, what the other values would do that we do not).
_LLAVA_SETTINGS = {
    "image_aspect_ratio": (
        "pad",
        "square",
        "images are padded to a square with the mean colour here; other "
        "values resize/crop (or tile, 'anyres') them differently",
    ),
    "mm_patch_merge_type": ("flat", "flat", "patch tokens stay one flat sequence here; 'spatial*' merges tiles"),
    "mm_use_im_start_end": (False, False, "no <im_start>/<im_end> tokens around the image here"),
    "mm_use_im_patch_token": (False, False, "no <im_patch> tokens here"),
    "mm_vision_select_feature": ("patch", "patch", "the CLS token is always dropped here ('patch')"),
}


def check_llava_config(llava_config: dict, where: str, vision_depth: Optional[int] = None) -> None:
    """Refuse a release whose config.json asks for preprocessing or prompt tokens our path does not reproduce: an
    import would load and then answer from inputs the model was not trained on. Every problem is listed.

    `vision_depth`: the vision tower's number of transformer layers; when given, `mm_vision_select_layer` must index
    its hidden states (LLaVA reads `hidden_states[mm_vision_select_layer]`, depth + 1 entries: the embeddings, then
    one per layer), else the import would write a run whose first forward fails, or read another layer."""
    problems = []
    for key, (ours, default, why) in _LLAVA_SETTINGS.items():
        value = llava_config.get(key, default)
        if value != ours:
            shown = f"{value!r}" if key in llava_config else f"absent (LLaVA then uses {default!r})"
            problems.append(f"{key} = {shown}; supported: {ours!r} ({why})")
    layer = llava_config.get("mm_vision_select_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        problems.append(f"mm_vision_select_layer = {layer!r}; supported: an integer hidden-state index (e.g. -2)")
    elif vision_depth is not None and not -(vision_depth + 1) <= layer <= vision_depth:
        problems.append(
            f"mm_vision_select_layer = {layer}; supported: a hidden-state index of the vision tower, "
            f"{-(vision_depth + 1)}..{vision_depth} (it has {vision_depth} layers); pass the encoder the release "
            "was trained with (--vision)"
        )
    if problems:
        raise OfficialCheckpointError(
            f"{where}: this release was trained with settings lightning_sp does not "
            f"reproduce:\n  " + "\n  ".join(problems)
        )


def check_vocabulary(tokenizer, llm_config, where: str) -> None:
    """Refuse a tokenizer whose vocabulary is not the LLM's embedding table: the adapter was trained on the ids of
    the LLM's own tokenizer, so another one feeds it other tokens (or ids past the table). `load_tokenizer` appends
    `<image>` when the tokenizer lacks it (Vicuna's does; LLaVA-1.5 uses id -200 instead): that one id past the
    table is allowed, as it is never looked up (models/vlm.py). Checked on the LLM's config (its `vocab_size`, the
    rows of its embedding table), before any weight is loaded."""
    text_config = llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config
    rows = getattr(text_config, "vocab_size", None)
    if rows is None:
        return  # a config that does not say; build_llm still refuses ids past the table
    size, image_id = len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if (size == rows and image_id < rows) or (size == rows + 1 and image_id == rows):
        return
    raise OfficialCheckpointError(
        f"{where} (model.tokenizer) = {tokenizer.name_or_path!r} has {size} tokens ({IMAGE_TOKEN} is id {image_id}) "
        f"but the LLM's embedding table has {rows} rows; supported: the LLM's own tokenizer, its vocabulary exactly "
        f"the table's rows, {IMAGE_TOKEN} one of them or the single id {rows} appended past it. Pass the tokenizer "
        f"the release was trained with (--tokenizer, default: the --llm)"
    )


def _integer(value, key: str, where: str) -> int:
    if float(value) != int(value):
        raise OfficialCheckpointError(f"{where}/{ADAPTER_CONFIG}: {key}={value!r} is not an integer")
    return int(value)


# ---- key maps ------------------------------------------------------------------------------------------------


def lora_official_to_ours(key: str) -> Optional[str]:
    """`base_model.model.X.lora_A.weight` -> `model.llm.base_model.model.X.lora_A.default.weight` (None: not LoRA)."""
    m = _OFFICIAL_LORA.match(key)
    return f"{LLM_PREFIX}{m.group(1)}.{m.group(2)}.default.weight" if m else None


def lora_ours_to_official(key: str) -> Optional[str]:
    m = _OURS_LORA.match(key)
    return f"{m.group(1)}.{m.group(2)}.weight" if m else None


# ---- import --------------------------------------------------------------------------------------------------


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def import_official(
    lora_dir: PathLike,
    variant: str,
    out: PathLike,
    *,
    llm: Optional[str] = None,
    vision: Optional[str] = None,
    tokenizer: Optional[str] = None,
    preset: str = "llava7b",
    overrides: Iterable[str] = (),
) -> Path:
    """Build our model from a release directory + base LLM + vision encoder; write a run dir at `out`.

    `variant`: 'pooling' or 'cropping' (the release does not record it). `llm` defaults to the adapter config's
    `base_model_name_or_path`, `vision` to the LLaVA config's `mm_vision_tower`, `tokenizer` to `llm`. `preset`:
    the model config group whose settings (LLM dtype, gradient checkpointing, ...) the run config starts from;
    `overrides`: further `a.b=value` config overrides. Returns the checkpoint path (`out/checkpoints/last.ckpt`).
    """
    from transformers import AutoConfig, CLIPVisionConfig

    if variant not in VARIANTS:
        raise OfficialCheckpointError(
            f"variant must be one of {', '.join(VARIANTS)} (the release does not record it), got {variant!r}"
        )
    release = read_release(lora_dir)
    where = str(lora_dir)
    adapter_config, llava_config = release["adapter_config"], release["llava_config"]
    _check_adapter_config(adapter_config, f"{where}/{ADAPTER_CONFIG}")
    if llava_config is None:
        # Refused, not assumed: the config records the preprocessing the adapter was trained with, LLaVA's own
        # loader (builder.load_pretrained_model) cannot load a LoRA folder without it, and for an absent
        # image_aspect_ratio LLaVA uses 'square', not the 'pad' we reproduce.
        raise OfficialCheckpointError(
            f"{where}: no {LLAVA_CONFIG}, so what the release was trained with (image_aspect_ratio, "
            f"mm_vision_select_layer, ...) is unknown; supported: a release with LLaVA's {LLAVA_CONFIG} beside the "
            f"adapter (LLaVA's LoRA training writes it there). Copy it from the training run, or write one with "
            f'"image_aspect_ratio": "pad" if you know the release was trained so'
        )
    llm = llm or adapter_config.get("base_model_name_or_path")
    vision = vision or llava_config.get("mm_vision_tower")
    if not llm or not vision:
        raise ValueError(
            f"{where}: name the base LLM (--llm) and the vision encoder (--vision): the release records "
            f"llm={adapter_config.get('base_model_name_or_path')!r}, "
            f"vision={llava_config.get('mm_vision_tower')!r}"
        )
    vision_config = CLIPVisionConfig.from_pretrained(vision)
    check_llava_config(llava_config, f"{where}/{LLAVA_CONFIG}", vision_depth=vision_config.num_hidden_layers)
    grid = vision_config.image_size // vision_config.patch_size
    projector_part, rest = split_official_state_dict(release["non_lora"])
    if rest:
        raise OfficialCheckpointError(
            f"{where}/{NON_LORA} holds LLM / vision-tower tensors that a LoRA import has no "
            f"place for: {compact_keys(rest)}"
        )
    widths = check_official_state_dict(projector_part, variant, grid=grid)  # keys, shapes, finiteness; C, D, H
    if widths.C != vision_config.hidden_size:
        raise OfficialCheckpointError(
            f"{where}/{NON_LORA}: the projector takes C={widths.C} features but {vision} "
            f"has width {vision_config.hidden_size}; pass the encoder it was trained with"
        )

    if preset not in group_choices("model"):
        raise ValueError(f"unknown model preset {preset!r}; valid: {', '.join(group_choices('model'))}")
    fields = [
        f"model={preset}",
        "stage=finetune",
        f"variant={variant}",
        *(["data=llava665k"] if "llava665k" in group_choices("data") else []),
        f"model.vision.name_or_path={vision}",
        f"model.vision.image_size={vision_config.image_size}",
        f"model.vision.patch_size={vision_config.patch_size}",
        f"model.vision.select_layer={int(llava_config.get('mm_vision_select_layer', -2))}",
        f"model.llm.name_or_path={llm}",
        f"model.tokenizer={tokenizer or llm}",
        f"model.lora.r={_integer(adapter_config['r'], 'r', where)}",
        f"model.lora.alpha={_integer(adapter_config['lora_alpha'], 'lora_alpha', where)}",
        f"model.lora.dropout={float(adapter_config.get('lora_dropout', 0.0))}",
        f"model.lora.target_modules=[{','.join(sorted(adapter_config['target_modules']))}]",
        "model.lora.modules_to_save=[]",
        f"projector.sp_width={widths.D}",
        "projector.dfi=true",
        "projector.dfi_kv_tokens=25",
        "projector.sides=null",
        f"projector.head_bias={'true' if variant == 'cropping' else 'false'}",
    ]
    cfg = compose([*fields, *overrides])
    tok = run_tokenizer(cfg)
    llm_config = AutoConfig.from_pretrained(
        cfg.model.llm.name_or_path, trust_remote_code=cfg.model.llm.trust_remote_code
    )
    check_vocabulary(tok, llm_config, f"{where}: --tokenizer")
    module = LlavaSPModule(cfg, tok)
    llm_width = module.model.llm.config.hidden_size
    if widths.H != llm_width:
        raise OfficialCheckpointError(
            f"{where}/{NON_LORA}: the projector outputs H={widths.H} but the LLM {llm} has "
            f"hidden size {llm_width}; pass the base LLM the release was trained on"
        )

    # LoRA: every adapter tensor of our model from the file, nothing left over, same shapes.
    params = dict(module.named_parameters())
    ours = {n for n, p in params.items() if p.requires_grad and "lora_" in n}
    mapped, unknown = {}, []
    for key, tensor in release["adapter"].items():
        name = lora_official_to_ours(key)
        (unknown.append(key) if name is None else mapped.__setitem__(name, tensor))
    missing, extra = sorted(ours - set(mapped)), sorted(set(mapped) - ours)
    bad_shape = [n for n in sorted(ours & set(mapped)) if mapped[n].shape != params[n].shape]
    if unknown or missing or extra or bad_shape:
        lines = [
            f"{where}/{release['adapter_file']} does not match the LoRA adapters of {llm} with "
            f"r={cfg.model.lora.r} on {', '.join(cfg.model.lora.target_modules)}:"
        ]
        if missing:
            lines.append(f"  missing ({len(missing)}): {compact_keys(lora_ours_to_official(n) for n in missing)}")
        if extra or unknown:
            lines.append(
                f"  unexpected ({len(extra) + len(unknown)}): "
                f"{compact_keys([*unknown, *(lora_ours_to_official(n) for n in extra)])}"
            )
        lines += [
            f"  {lora_ours_to_official(n)}: file {list(mapped[n].shape)}, model {list(params[n].shape)}"
            for n in bad_shape
        ]
        raise OfficialCheckpointError("\n".join(lines))
    with torch.no_grad():
        for name, tensor in mapped.items():
            params[name].copy_(tensor.to(params[name].dtype))

    projector = load_official_projector(projector_part, variant, grid=grid)
    module.model.projector.load_state_dict(projector.state_dict(), strict=True)

    provenance = {
        "variant": variant,
        "source": str(Path(lora_dir).resolve()),
        "adapter_config": adapter_config,
        "adapter_file": release["adapter_file"],
        "llava_config": release["llava_config"],
        "dtypes": {k: _dtype_name(v) for k, v in {**release["adapter"], **release["non_lora"]}.items()},
    }
    path = save_module_checkpoint(module, out, extra={PROVENANCE_KEY: provenance})
    log.info(
        "imported %s (%s, %d LoRA tensors, projector C=%d D=%d H=%d) -> %s",
        where,
        variant,
        len(mapped),
        widths.C,
        widths.D,
        widths.H,
        path,
    )
    return path


# ---- export --------------------------------------------------------------------------------------------------


def _llava_config(cfg, vision_width: int) -> Optional[dict]:
    """A LLaVA-1.5-style config.json for the official code (LLM config + mm_* fields); None for random-init LLMs."""
    if not cfg.model.llm.name_or_path:
        return None
    from transformers import AutoConfig

    llava = AutoConfig.from_pretrained(cfg.model.llm.name_or_path).to_dict()
    llava.update(
        {
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava_llama",
            "mm_vision_tower": cfg.model.vision.name_or_path,
            "mm_hidden_size": vision_width,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": cfg.model.vision.select_layer,
            "mm_vision_select_feature": "patch",
            "image_aspect_ratio": "pad",
            "mm_patch_merge_type": "flat",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "tune_mm_mlp_adapter": False,
            "use_cache": True,
        }
    )
    return llava


def adapter_file_name(provenance: dict, where: str = "checkpoint") -> str:
    """The adapter file an export writes: the release's own name, which must be one of `ADAPTER_FILES` (the
    name comes from the checkpoint, so a path in it could write outside the export directory)."""
    name = provenance.get("adapter_file", ADAPTER_FILES[0])
    if name not in ADAPTER_FILES:
        raise OfficialCheckpointError(
            f"{where}: {PROVENANCE_KEY}.adapter_file={name!r} is not one of "
            f"{', '.join(ADAPTER_FILES)}; refused (an export writes only those names)"
        )
    return name


def export_official(ckpt: PathLike, out_dir: PathLike, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write one of our pooling/cropping checkpoints (file or run dir) in the release layout under `out_dir`.

    Tensor dtypes: `dtype` if given, else the release's for an imported checkpoint, else the checkpoint's (fp32).
    Align checkpoints (no LoRA) get only `non_lora_trainables.bin`. Returns `out_dir`.
    """

    data = read_checkpoint(ckpt)
    cfg = checkpoint_config(data)
    variant = cfg.projector.name
    if variant not in VARIANTS:
        raise OfficialCheckpointError(
            f"{ckpt}: projector '{variant}' has no official layout (only "
            f"{', '.join(VARIANTS)}); use `python -m lightning_sp export` instead"
        )
    provenance = data.get(PROVENANCE_KEY) or {}
    dtypes = provenance.get("dtypes", {})
    state = data["state_dict"]

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        target = dtype or (getattr(torch, str(dtypes[name]), None) if name in dtypes else t.dtype)
        if not isinstance(target, torch.dtype):
            raise OfficialCheckpointError(
                f"{ckpt}: {PROVENANCE_KEY}.dtypes[{name!r}]={dtypes[name]!r} is not a torch dtype"
            )
        return t.detach().to(device="cpu", dtype=target).contiguous()

    other = sorted(n for n in state if not n.startswith("model.projector.") and lora_ours_to_official(n) is None)
    if other:
        raise OfficialCheckpointError(
            f"{ckpt}: tensors the official layout has no place for (peft modules_to_save?): {compact_keys(other)}"
        )
    prefix = "model.projector."
    proj_state = {n[len(prefix) :]: t for n, t in state.items() if n.startswith(prefix)}
    h, c = proj_state["patch_head.0.weight"].shape
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    with torch.device("meta"):
        projector = build_projector(cfg.projector, vision_width=c, llm_width=h, grid=grid)
    projector.load_state_dict(proj_state, strict=True, assign=True)
    non_lora = {k: cast(k, v) for k, v in official_state_dict(projector, variant).items()}
    adapter = {lora_ours_to_official(n): t for n, t in state.items() if lora_ours_to_official(n)}
    adapter = {k: cast(k, v) for k, v in adapter.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(non_lora, out / NON_LORA)
    if adapter:
        adapter_file = adapter_file_name(provenance, str(ckpt))
        if adapter_file.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(adapter, str(out / adapter_file), metadata={"format": "pt"})
        else:
            torch.save(adapter, out / adapter_file)
        adapter_config = provenance.get("adapter_config")
        if adapter_config is None:
            from peft import LoraConfig

            lora = cfg.model.lora
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
                inference_mode=True,
                base_model_name_or_path=cfg.model.llm.name_or_path,
            ).save_pretrained(str(out))
        else:
            (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    else:
        log.warning("%s has no LoRA tensors (an align-stage checkpoint): wrote %s only", ckpt, NON_LORA)
    llava = provenance["llava_config"] if "llava_config" in provenance else _llava_config(cfg, c)
    if llava is not None:
        (out / LLAVA_CONFIG).write_text(json.dumps(llava, indent=2, sort_keys=True) + "\n")
    log.info(
        "exported %s as a %s release to %s (the official loader wants 'lora' in the folder name)", ckpt, variant, out
    )
    return out
