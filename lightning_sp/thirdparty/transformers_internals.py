"""transformers internals: the fast tokenizer's Rust backend (a per-record speed-up of the data pipeline), the
attention-implementation switch (eager attention for one pass, the only kind that returns weights) and the names of
a model's repeated blocks (the FSDP units)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

# The methods between `tokenizer(text)` and the Rust tokenizer's `encode_batch` in transformers. When a tokenizer
# class overrides none of them, `tokenizer(text, add_special_tokens=True)` is exactly `encode_batch([text])[0]`
# (= `encode(text)`) of its backend, provided the backend has no truncation or padding set and does not split
# special tokens -- the state transformers would set before encoding (checked on every call, see rust_backend).
HF_ENCODE_PATH = (
    "__call__",
    "_call_one",
    "encode_plus",
    "_encode_plus",
    "_batch_encode_plus",
    "_convert_encoding",
    "set_truncation_and_padding",
    "_get_padding_truncation_strategies",
    "_switch_to_input_mode",
    "_eventual_warn_about_too_long_sequence",
)
_DIRECT_CLASSES: dict[type, bool] = {}


def rust_backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` to call directly in place of ``tokenizer(text)``, or None where that might
    give anything else (then the caller goes through transformers). Saves 0.05-0.1 ms of Python per record."""
    cls = type(tokenizer)
    direct = _DIRECT_CLASSES.get(cls)
    if direct is None:
        from transformers import PreTrainedTokenizerFast

        direct = issubclass(cls, PreTrainedTokenizerFast) and all(
            getattr(cls, name, None) is getattr(PreTrainedTokenizerFast, name) for name in HF_ENCODE_PATH
        )
        _DIRECT_CLASSES[cls] = direct
    if (
        not direct
        or getattr(tokenizer, "split_special_tokens", False)
        or getattr(tokenizer, "_in_target_context_manager", False)
    ):
        return None
    backend = tokenizer._tokenizer
    if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens:
        return None
    return backend


def warn_if_too_long(tokenizer, ids: list[int]) -> None:
    """The one-time "sequence longer than model_max_length" warning transformers logs from ``tokenizer(text)``."""
    if len(ids) > tokenizer.model_max_length:
        tokenizer._eventual_warn_about_too_long_sequence(ids, None, True)


def no_split_module_classes(model) -> set[str]:
    """Class names of the repeated blocks (``LlamaDecoderLayer``, ``CLIPEncoderLayer``) that an HF model and its HF
    submodules declare in ``_no_split_modules`` (what accelerate's device_map keeps whole); FSDP wraps each one."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def _base_model(llm):
    """The HF model under a peft wrapper (or the model itself)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def attn_implementation(llm) -> str:
    """The attention implementation an HF model (or its peft wrapper) runs with: eager, sdpa, flash_attention_2."""
    return _base_model(llm).config._attn_implementation


def set_config_attn_implementation(config, name: str) -> None:
    """Make a config build its model with attention ``name`` (what from_pretrained(attn_implementation=) does)."""
    config._attn_implementation = name


def set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.56: also updates sub-models
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


@contextmanager
def eager_attention(llm) -> Iterator[None]:
    """Run the LLM with eager attention (the only kind that returns weights) inside the block; restore after."""
    model = _base_model(llm)
    previous = attn_implementation(model)
    if previous == "eager":
        yield
        return
    set_attn_implementation(model, "eager")
    try:
        yield
    finally:
        set_attn_implementation(model, previous)
