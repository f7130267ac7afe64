"""`python -m lightning_sp export ckpt=<checkpoint or run dir> out=<dir>`: a merged Hugging Face model directory.

The run's model is rebuilt from the checkpoint, LoRA is merged into the LLM (`merge_and_unload`), and:
- `mlp` (LLaVA-1.5) runs become a native `LlavaForConditionalGeneration`: vision_config = our CLIP config,
  text_config = the LLM's, `vision_feature_layer` = our select layer, `vision_feature_select_strategy="default"`
  (CLS dropped), W_p -> `multi_modal_projector.linear_{1,2}`, `image_token_index` = our `<image>` id. Loads with
  plain `transformers.LlavaForConditionalGeneration.from_pretrained(dir)`.
- `pooling` / `cropping` (LLaVA-SP) runs become a `trust_remote_code` package: `configuration_llava_sp.py` and
  `modeling_llava_sp.py` (lightning_sp/hf_remote, torch + transformers only) are copied next to the weights and
  `config.json` maps them in `auto_map`; load with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
Both directories also hold the tokenizer and a `LlavaProcessor` (LLaVA-1.5 "pad" preprocessing: pad to square with
the CLIP mean colour, bicubic resize, CLIP normalisation) that expands each `<image>` into the model's number of
visual tokens (576 / 582 at 336 px) -- HF Llava, like our collator, expects the placeholders already expanded.

Options (key=value): ckpt, out, dtype (float32 | bfloat16 | float16; default the run's model.llm.dtype),
max_shard_size; dotted keys (model.llm.name_or_path=...) override the run's config before the model is built.

When `<image>` lies beyond the LLM's vocabulary (Vicuna: id 32000 of 32000) the HF Llava export grows the
embedding and LM head to a multiple of 64 rows (mean-initialised, as llava-hf does): the model embeds the
placeholder before replacing it. The SP package never embeds it and keeps the LLM's vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import MISSING, OmegaConf

from lightning_sp.config import ConfigError

log = logging.getLogger(__name__)

SP_PROJECTORS = ("pooling", "cropping")


@dataclass
class ExportOptions:
    ckpt: str = MISSING  # a checkpoint, or a run directory (= its checkpoints/last.ckpt)
    out: str = MISSING  # the directory to write
    dtype: Optional[str] = None  # float32 | bfloat16 | float16; default: the run's model.llm.dtype
    max_shard_size: str = "5GB"


def _merged_llm(model):
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    return llm


def _processor(tokenizer, image_size: int, patch_size: int, extra_tokens: int):
    """LlavaProcessor whose `<image>` expands to grid**2 + extra_tokens placeholders (CLS counted, then dropped)."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    from lightning_sp.data.images import CLIP_MEAN, CLIP_STD
    from lightning_sp.data.tokenizer import IMAGE_TOKEN

    image_processor = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,  # PIL bicubic
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1 + extra_tokens,
                          image_token=IMAGE_TOKEN)


def _set_dtype(config, dtype: torch.dtype) -> None:
    """Record the written dtype in the config and its sub-configs (not the dtype the LLM was loaded in)."""
    for c in (config, config.vision_config, config.text_config):
        c.dtype = dtype


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _export_llava(model, tokenizer, cfg, dtype: torch.dtype, out: Path, max_shard_size: str) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    llm = _merged_llm(model)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab = llm.get_input_embeddings().num_embeddings
    if image_id >= vocab:
        llm.resize_token_embeddings(image_id + 1, pad_to_multiple_of=64)
        log.info("grew the LLM vocabulary from %d to %d rows for <image> (id %d)", vocab,
                 llm.get_input_embeddings().num_embeddings, image_id)
    tower = model.vision.model
    head = model.projector.patch_head
    config = LlavaConfig(
        vision_config=tower.config.to_dict(), text_config=llm.config.to_dict(), image_token_index=image_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=model.vision.select_layer, image_seq_length=model.num_visual_tokens,
        multimodal_projector_bias=True, tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    _set_dtype(config, dtype)
    state = {
        **_prefixed("model.vision_tower.", tower.state_dict()),
        **_prefixed("model.language_model.", llm.model.state_dict()),
        "lm_head.weight": llm.lm_head.weight,
        "model.multi_modal_projector.linear_1.weight": head[0].weight,
        "model.multi_modal_projector.linear_1.bias": head[0].bias,
        "model.multi_modal_projector.linear_2.weight": head[2].weight,
        "model.multi_modal_projector.linear_2.bias": head[2].bias,
    }
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    hf.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()}, strict=True, assign=True)
    hf.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)


def _export_remote(model, tokenizer, cfg, dtype: torch.dtype, out: Path, max_shard_size: str) -> None:
    from lightning_sp.hf_remote.configuration_llava_sp import LlavaSPConfig
    from lightning_sp.hf_remote.modeling_llava_sp import LlavaSPForConditionalGeneration

    llm = _merged_llm(model)
    projector = model.projector
    p = cfg.projector
    projector_cfg = {"name": p.name, "sp_width": p.sp_width, "dfi": bool(p.dfi), "dfi_kv_tokens": p.dfi_kv_tokens,
                     "sides": list(p.sides) if p.sides is not None else None,
                     "head_bias": projector.spatial_head[1].bias is not None}
    config = LlavaSPConfig(
        vision_config=model.vision.model.config.to_dict(), text_config=llm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=model.vision.select_layer,
        projector=projector_cfg, image_seq_length=model.num_visual_tokens,
    )
    _set_dtype(config, dtype)
    state = {
        **_prefixed("vision_tower.", model.vision.model.state_dict()),
        **_prefixed("projector.", projector.state_dict()),
        **_prefixed("language_model.", llm.state_dict()),
    }
    with torch.device("meta"):
        hf = LlavaSPForConditionalGeneration(config)
    if hf.num_image_tokens != model.num_visual_tokens:
        raise RuntimeError(f"the exported projector emits {hf.num_image_tokens} tokens, ours {model.num_visual_tokens}")
    hf.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()}, strict=True, assign=True)
    # Copy the two code files next to the weights and write `auto_map` into config.json.
    LlavaSPConfig.register_for_auto_class()
    LlavaSPForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
    hf.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)


def export_hf(ckpt, out, dtype: Optional[str] = None, overrides: Sequence[str] = (),
              max_shard_size: str = "5GB") -> Path:
    """Export a checkpoint (file or run dir) as a merged HF directory at `out` (see the module docstring)."""
    from lightning_sp.checkpoint import load_module

    module = load_module(ckpt, overrides)
    cfg, model, tokenizer = module.cfg, module.model, module.tokenizer
    dtype_name = dtype or cfg.model.llm.dtype
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype_name!r}")
    torch_dtype = getattr(torch, dtype_name)
    name = cfg.projector.name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if name == "mlp":
            _export_llava(model, tokenizer, cfg, torch_dtype, out, max_shard_size)
            kind = "LlavaForConditionalGeneration"
        elif name in SP_PROJECTORS:
            _export_remote(model, tokenizer, cfg, torch_dtype, out, max_shard_size)
            kind = "LlavaSPForConditionalGeneration (trust_remote_code)"
        else:
            raise ConfigError(f"export supports the projectors mlp, {', '.join(SP_PROJECTORS)}; this run uses "
                              f"'{name}' (an ablation arm: evaluate it from its checkpoint instead)")
    v = cfg.model.vision
    processor = _processor(tokenizer, v.image_size, v.patch_size, model.projector.layout.num_sp_tokens)
    processor.save_pretrained(out)  # also writes the tokenizer
    log.info("exported %s as %s (%s) to %s", ckpt, kind, dtype_name, out)
    return out


def export_from_args(args: Sequence[str]) -> Path:
    """`export` CLI: `key=value` options of ExportOptions; dotted keys override the run's config."""
    options, overrides = [], []
    for item in args:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not of the form key=value (e.g. ckpt=runs/x out=exports/x)")
        (overrides if "." in item.split("=", 1)[0] else options).append(item)
    schema = OmegaConf.structured(ExportOptions)
    try:
        opts = OmegaConf.merge(schema, OmegaConf.from_dotlist(options))
        missing = OmegaConf.missing_keys(opts)
    except Exception as e:  # unknown key / bad type
        raise ConfigError(f"export: {e}; valid keys: {', '.join(schema.keys())}") from e
    if missing:
        raise ConfigError(f"export needs {', '.join(sorted(missing))} (e.g. ckpt=runs/x/checkpoints/last.ckpt out=DIR)")
    return export_hf(opts.ckpt, opts.out, opts.dtype, overrides, opts.max_shard_size)
