"""Chat-format variants of the shipped tokenizer, for the random-init Llama-3-style and Qwen2-style LLMs.

Each is the shipped byte-level BPE (same vocabulary, ``<image>`` included) with the special tokens, BOS / EOS / pad
conventions and the chat template (``tokenizer.chat_template``, Jinja) of the real family's instruct tokenizer:

- ``llama3`` (Llama-3 Instruct): ``<|begin_of_text|>`` prepended by the tokenizer, ``<|eot_id|>`` as eos (it ends
  every turn), ``<|finetune_right_pad_id|>`` as pad (Llama-3.1's), header tokens around each role;
- ``qwen2`` (Qwen2 Instruct, ChatML): no BOS, ``<|im_end|>`` as eos, ``<|endoftext|>`` as pad, a default system
  prompt.

The chat templates are those the families publish with their instruct models; the tests render conversations with
them (``apply_chat_template``) and compare with :mod:`lightning_sp.data.conversation`'s rendering, ids and labels.
Rebuilt by ``make tokenizer`` (``python -m lightning_sp.data.chat_tokenizers``); small, shipped in
``lightning_sp/shipped/data/tokenizer_<format>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.data.tokenizer import UNK

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# format -> (special tokens in id order, bos, eos, pad, chat template)
CHAT_TOKENIZERS = {
    "llama3": (
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        LLAMA3_CHAT_TEMPLATE,
    ),
    "qwen2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        QWEN2_CHAT_TEMPLATE,
    ),
}


def build_chat_tokenizer(chat_format: str, base_dir: str | Path, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """The shipped tokenizer in ``base_dir`` made into ``chat_format``'s conventions, saved to ``out_dir``."""
    specials, bos, eos, pad, template = CHAT_TOKENIZERS[chat_format]
    tok = Tokenizer.from_file(str(Path(base_dir) / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # Offsets keep the leading-space byte (label masks read them); BOS in front only where the family has one.
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(steps)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=UNK,  # the BPE's byte fallback never needs it; kept so the vocabulary is the shipped one's
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=template,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)build the shipped chat-format tokenizers.")
    parser.add_argument("--base", default="data/tokenizer", help="the shipped tokenizer directory")
    parser.add_argument("--out-root", default="lightning_sp/shipped/data", help="writes tokenizer_<format> here")
    args = parser.parse_args(argv)
    for chat_format in CHAT_TOKENIZERS:
        out = Path(args.out_root) / f"tokenizer_{chat_format}"
        tok = build_chat_tokenizer(chat_format, args.base, out)
        print(f"saved the {chat_format} tokenizer ({len(tok)} tokens) to {out}")


if __name__ == "__main__":
    main()
