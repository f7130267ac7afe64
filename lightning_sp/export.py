"""`python -m lightning_sp export ckpt=<checkpoint or run dir> out=<dir>`: a merged Hugging Face model directory.

The run's model is rebuilt from the checkpoint, LoRA is merged into the LLM (`merge_and_unload`), and:
- `mlp` (LLaVA-1.5) runs become a native `LlavaForConditionalGeneration`: vision_config = our CLIP config,
  text_config = the LLM's, `vision_feature_layer` = our select layer, `vision_feature_select_strategy="default"`
  (CLS dropped), W_p -> `multi_modal_projector.linear_{1,2}`, `image_token_index` = our `<image>` id. Loads with
  plain `transformers.LlavaForConditionalGeneration.from_pretrained(dir)`.
- `pooling` / `cropping` (LLaVA-SP) runs become a `trust_remote_code` package: `configuration_llava_sp.py` and
  `modeling_llava_sp.py` (lightning_sp/hf_remote, torch + transformers only) are copied next to the weights and
  `config.json` maps them in `auto_map` for AutoModelForImageTextToText, AutoModelForCausalLM and AutoModel; load with
  `AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)`. Its `generate` is transformers' own and
  returns prompt + new tokens, as HF Llava's does.
Both directories also hold the tokenizer and a `LlavaProcessor` (LLaVA-1.5 "pad" preprocessing: pad to square with
the CLIP mean colour, bicubic resize, CLIP normalisation) that expands each `<image>` into the model's number of
visual tokens (576 / 582 at 336 px) -- HF Llava, like our collator, expects the placeholders already expanded.
The saved tokenizer pads on the LEFT (batched generation), returns input_ids and attention_mask only (no
token_type_ids, which `generate` would refuse), and the processor and tokenizer carry the run's conversation template
(vicuna_v1) as a Jinja chat template: `processor.apply_chat_template(messages, add_generation_prompt=True)` renders
exactly the prompt the model was trained and is evaluated with (system prompt, `USER: <image>\\n...`, `ASSISTANT:`;
the processor adds BOS when it tokenizes, as for llava-hf's templates). Where one tokenizer pass over a prompt is not
LLaVA's piece-by-piece `tokenizer_image_token` (Llama SentencePiece with `legacy: false`, Vicuna v1.5's), the
processor is `LlavaSPProcessor` (lightning_sp/hf_remote/processing_llava_sp.py, copied next to the weights and mapped
in processor_config.json's `auto_map`): `AutoProcessor.from_pretrained(dir, trust_remote_code=True)`, for the mlp
export too; otherwise it is transformers' LlavaProcessor.

Options (key=value): ckpt, out, dtype (float32 | bfloat16 | float16; default the run's model.llm.dtype),
max_shard_size; dotted keys (model.llm.name_or_path=...) override the run's config before the model is built.

When `<image>` lies beyond the LLM's vocabulary (Vicuna: id 32000 of 32000) the HF Llava export grows the
embedding and LM head to a multiple of 64 rows (mean-initialised, as llava-hf does): the model embeds the
placeholder before replacing it. The SP package never embeds it and keeps the LLM's vocabulary.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import MISSING

from lightning_sp.command_options import parse_command_options
from lightning_sp.config import ConfigError
from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.data.conversation import MarkupTemplate, get_template, one_pass_exact
from lightning_sp.dtypes import dtype_named
from lightning_sp.hf_remote.configuration_llava_sp import LlavaSPConfig
from lightning_sp.hf_remote.modeling_llava_sp import LlavaSPForConditionalGeneration
from lightning_sp.hf_remote.processing_llava_sp import LlavaSPProcessor
from lightning_sp.module import load_module

log = logging.getLogger(__name__)

SP_PROJECTORS = ("pooling", "cropping")
# Where the SP package's model class is registered (`auto_map` of its config.json).
SP_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")


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


def chat_template(template="vicuna_v1") -> str:
    """A Jinja chat template that renders messages as :meth:`conversation.Template.render` renders turns.

    Messages are HF's: ``{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"}, {"type":
    "text", "text": ...}]}``. A user turn with an image (an ``image`` item, or ``<image>`` in its text) becomes
    ``<image>\\n`` + its text without placeholders, stripped (as records are normalised for training); a system
    message replaces the template's system prompt; ``add_generation_prompt`` ends with the assistant role and
    ``:`` (no space: the model's answer starts with one). Assistant answers are wrapped in ``{% generation %}``
    (``return_assistant_tokens_mask``), from the space after ``ASSISTANT:`` through the end-of-turn, which is what
    training supervises. No BOS: the tokenizer adds it (the processor does when it tokenizes)."""

    tpl = get_template(template)
    if tpl.plain:
        raise ValueError(f"the {tpl.name!r} template has no conversation to render; export a chat template instead")
    q = json.dumps  # a Jinja string literal (double quotes, backslash escapes)
    user, assistant = tpl.roles
    return (
        "{%- set image = " + q(IMAGE_TOKEN) + " -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set first = 1 -%}{%- set system = messages[0]['content'] -%}"
        "{%- if system is not string -%}"
        "{%- set system = system | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
        "{%- endif -%}"
        "{%- else -%}{%- set first = 0 -%}{%- set system = " + q(tpl.system) + " -%}{%- endif -%}"
        "{{- system + " + q(tpl.sep) + " -}}"
        "{%- for message in messages[first:] -%}"
        "{%- set content = message['content'] -%}"
        "{%- if content is string -%}{%- set text = content -%}{%- set images = 0 -%}"
        "{%- else -%}"
        "{%- set text = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
        "{%- set images = content | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if images > 0 or image in text -%}"
        "{%- set text = (image + '\\n') * ([images, 1] | max) + (text | replace(image, '') | trim) -%}"
        "{%- endif -%}"
        "{{- " + q(user + ": ") + " + text + " + q(tpl.sep) + " -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- " + q(assistant + ":") + " -}}"
        "{%- generation -%}{{- ' ' + text + " + q(tpl.sep2) + " -}}{%- endgeneration -%}"
        "{%- else -%}{{- raise_exception('roles must be system (first), user or assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + q(assistant + ":") + " -}}{%- endif -%}"
    )


def _client_tokenizer(tokenizer, template: str):
    """A copy of the run's tokenizer set up for HF clients: left padding, no token_type_ids, the chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.init_kwargs["model_input_names"] = tok.model_input_names  # saved in tokenizer_config.json

    if isinstance(get_template(template), MarkupTemplate):
        # A chat-markup family (Llama-3, Qwen2) trained in its own tokenizer's format: clients keep that template.
        if not tok.chat_template:
            raise ConfigError(f"the run's {template} tokenizer has no chat template to export")
        return tok
    tok.chat_template = chat_template(template)
    return tok


def _processor(tokenizer, image_size: int, patch_size: int, extra_tokens: int, stats):
    """LlavaProcessor whose `<image>` expands to grid**2 + extra_tokens placeholders (CLS counted, then dropped);
    `stats`: the encoder's (mean, std).

    Where one tokenizer pass over a prompt is not LLaVA's piece-by-piece `tokenizer_image_token` (Llama
    SentencePiece tokenizers saved with `legacy: false`, as Vicuna v1.5's: no dummy-prefix "▁" after `<image>` in one
    pass), LlavaProcessor would hand the model prompts a token off training's: the processor is then
    `LlavaSPProcessor` (lightning_sp/hf_remote, tokenises piece by piece), saved as remote code for AutoProcessor."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    mean, std = stats
    image_processor = LlavaImageProcessor(
        do_pad=True,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
        resample=3,  # PIL bicubic
    )
    exact = one_pass_exact(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return (LlavaProcessor if exact else LlavaSPProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1 + extra_tokens,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )


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
        log.info(
            "grew the LLM vocabulary from %d to %d rows for <image> (id %d)",
            vocab,
            llm.get_input_embeddings().num_embeddings,
            image_id,
        )
    tower = model.vision.model
    head = model.projector.patch_head
    config = LlavaConfig(
        vision_config=model.vision.hf_vision_config().to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=model.vision.select_layer,
        image_seq_length=model.num_visual_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=llm.config.tie_word_embeddings,
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
    llm = _merged_llm(model)
    projector = model.projector
    p = cfg.projector
    projector_cfg = {
        "name": p.name,
        "sp_width": p.sp_width,
        "dfi": bool(p.dfi),
        "dfi_kv_tokens": p.dfi_kv_tokens,
        "sides": list(p.sides) if p.sides is not None else None,
        "head_bias": projector.spatial_head[1].bias is not None,
    }
    config = LlavaSPConfig(
        vision_config=model.vision.hf_vision_config().to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=model.vision.select_layer,
        projector=projector_cfg,
        image_seq_length=model.num_visual_tokens,
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
    # Copy the two code files next to the weights and write `auto_map` into config.json (save_pretrained adds the
    # registered auto class to the entries already in config.auto_map).
    LlavaSPConfig.register_for_auto_class()
    LlavaSPForConditionalGeneration.register_for_auto_class(SP_AUTO_CLASSES[0])
    hf.config.auto_map = {name: "modeling_llava_sp.LlavaSPForConditionalGeneration" for name in SP_AUTO_CLASSES}
    hf.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)


def export_hf(
    ckpt, out, dtype: Optional[str] = None, overrides: Sequence[str] = (), max_shard_size: str = "5GB"
) -> Path:
    """Export a checkpoint (file or run dir) as a merged HF directory at `out` (see the module docstring)."""

    if dtype is not None:
        dtype_named(dtype)  # a bad name fails before the model loads
    module = load_module(ckpt, overrides)
    cfg, model, tokenizer = module.cfg, module.model, module.tokenizer
    dtype_name = dtype or cfg.model.llm.dtype
    torch_dtype = dtype_named(dtype_name)
    name = cfg.projector.name
    try:
        model.vision.hf_vision_config()
    except NotImplementedError as e:
        raise ConfigError(str(e)) from e
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
            raise ConfigError(
                f"export supports the projectors mlp, {', '.join(SP_PROJECTORS)}; this run uses "
                f"'{name}' (an ablation arm: evaluate it from its checkpoint instead)"
            )
    v = cfg.model.vision
    template = cfg.stage.template
    if template == "plain":  # an align-stage run: give clients the format the finetune stage trains
        log.warning("this run uses the plain (align-stage) template; exporting the vicuna_v1 chat template")
        template = "vicuna_v1"
    processor = _processor(
        _client_tokenizer(tokenizer, template),
        v.image_size,
        v.patch_size,
        model.projector.layout.num_sp_tokens,
        model.vision.stats,
    )
    if isinstance(processor, LlavaSPProcessor):
        # Copies processing_llava_sp.py next to the weights and maps it in processor_config.json's `auto_map`; the
        # configs name `LlavaSPProcessor`, which transformers does not know, so AutoProcessor without
        # trust_remote_code=True refuses to load (rather than falling back to LlavaProcessor's one-pass ids).
        LlavaSPProcessor.register_for_auto_class("AutoProcessor")
        log.warning(
            "the run's tokenizer tokenises text after <image> differently in one pass (legacy=False SentencePiece): "
            "the export's processor is remote code; load it with AutoProcessor.from_pretrained(dir, "
            "trust_remote_code=True)"
        )
    processor.save_pretrained(out)  # also writes the tokenizer
    log.info("exported %s as %s (%s) to %s", ckpt, kind, dtype_name, out)
    return out


def export_from_args(args: Sequence[str]) -> Path:
    """`export` CLI: `key=value` options of ExportOptions; dotted keys override the run's config."""
    opts, overrides = parse_command_options(
        args, ExportOptions, "export", "python -m lightning_sp export ckpt=<run or .ckpt> out=DIR [dtype=bfloat16]"
    )
    return export_hf(opts["ckpt"], opts["out"], opts["dtype"], overrides, opts["max_shard_size"])
