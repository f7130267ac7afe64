"""Causal LM loading (HF) and LoRA attachment (peft)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from lightning_sp.models.seeding import seeded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_llm(cfg, tokenizer) -> PreTrainedModel:
    """A pretrained causal LM (`name_or_path`) or a random-init Llama sized by the config and the tokenizer."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            torch_dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        config = LlamaConfig(
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
        config._attn_implementation = cfg.attn_implementation
        with seeded(cfg.init_seed):
            model = LlamaForCausalLM(config).to(dtype)
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
