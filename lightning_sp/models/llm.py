"""LLM backbones (model.llm.backbone), causal LM loading (HF) and LoRA attachment (peft).

A backbone names an LLM family as LLaVA-style training meets it: its conversation format (the instruct stage's
template; the align stage is always ``plain``), the HF config class its random-init tiny form is built from, and the
LoRA target modules it defaults to. Pretrained weights load with ``AutoModelForCausalLM`` whatever the family; the
tokenizer (``model.tokenizer``) must be the LLM's own, whose eos is the format's end-of-turn token (checked).
A new family is one subclass registered under an exact name plus one YAML (``conf/llm/``); a family with a format of
its own registers it with :func:`lightning_sp.data.conversation.register_template`.
"""

from __future__ import annotations

from typing import Optional

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from lightning_sp.dtypes import DTYPES
from lightning_sp.models.seeding import seeded
from lightning_sp.registry import Registry
from lightning_sp.thirdparty.transformers_internals import set_config_attn_implementation

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LLMBackbone:
    """What the rest of the code asks of an LLM family. Subclasses set the class attributes."""

    registry_name: str = ""
    # A name in lightning_sp.data.conversation.TEMPLATES; a new format is registered there with register_template.
    chat_format: str = ""
    # A dataclass of `model.llm.*` keys this family reads beyond the shared ones (each with its default): the config
    # schema gains them (config.run_schema). None: the shared keys suffice.
    Options: Optional[type] = None
    config_class: type[PretrainedConfig] = LlamaConfig
    lora_targets: tuple[str, ...] = LLAMA_PROJECTIONS

    @classmethod
    def random_config(cls, cfg, tokenizer) -> PretrainedConfig:
        """The HF config of a random-init model at the config's sizes, its vocabulary the tokenizer's."""
        return cls.config_class(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta,
            initializer_range=cfg.initializer_range,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )


LLM_BACKBONES: Registry[type[LLMBackbone]] = Registry("LLM backbone", "model.llm.backbone", LLMBackbone)
register_llm = LLM_BACKBONES.register


def llm_backbone(cfg) -> type[LLMBackbone]:
    """The class registered as ``cfg.backbone`` (a model.llm config); an unknown name lists the valid ones."""
    return LLM_BACKBONES.lookup(cfg.backbone)


@register_llm("vicuna")
class Vicuna(LLMBackbone):
    """Llama-architecture chat models in Vicuna v1's format (LLaVA-1.5: Vicuna-7B/13B v1.5)."""

    chat_format = "vicuna_v1"


@register_llm("llama3")
class Llama3(LLMBackbone):
    """Llama-3 Instruct models (grouped-query attention, RoPE base 5e5 in their configs) in Llama-3's chat format."""

    chat_format = "llama3"


@register_llm("qwen2")
class Qwen2(LLMBackbone):
    """Qwen2 / Qwen2.5 Instruct models (biased q/k/v projections) in ChatML, Qwen2's chat format."""

    chat_format = "qwen2"
    config_class = Qwen2Config

    @classmethod
    def random_config(cls, cfg, tokenizer) -> PretrainedConfig:
        config = super().random_config(cfg, tokenizer)
        config.use_sliding_window = False
        return config


def build_llm(cfg, tokenizer) -> PreTrainedModel:
    """A pretrained causal LM (`name_or_path`) or a random-init one of the backbone's family, sized by the config
    and the tokenizer."""
    dtype = DTYPES[cfg.dtype]  # validated at compose (config.validate)
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            torch_dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        config = llm_backbone(cfg).random_config(cfg, tokenizer)
        set_config_attn_implementation(config, cfg.attn_implementation)
        with seeded(cfg.init_seed):
            model = AutoModelForCausalLM.from_config(config).to(dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer) - 1:
        # `<image>` may be the one token beyond the LM's vocabulary: it is never looked up (see vlm.py).
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the LLM embeds {model.get_input_embeddings().num_embeddings}; "
            "use the LLM's own tokenizer (model.tokenizer)"
        )
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def attach_lora(model: PreTrainedModel, cfg):
    """Wrap `model` with peft LoRA adapters (trainable), everything else stays frozen."""
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
