"""LLM families as plug-ins: the conversation format belongs to the LLM backbone (Vicuna v1, Llama-3 chat, Qwen2
ChatML); ids and label masks equal what each family's own chat template gives; Llama-3-style and Qwen2-style tiny
models train with every projector; a family added from outside the package trains."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

from lightning_sp.config import ConfigError, compose, group_choices
from lightning_sp.data.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    Template,
    encode,
    encode_prompt,
    register_template,
)
from lightning_sp.data.tokenizer import load_tokenizer
from lightning_sp.models.llm import LLM_BACKBONES, LLMBackbone, build_llm, register_llm
from lightning_sp.module import LlavaSPModule
from lightning_sp.paths import resolve
from lightning_sp.train import train
from lightning_sp.viz import question_markers, question_text
from evalkit import NARROW, first_and_last_loss, few_step_fit

FAMILIES = {"llama3_tiny": "llama3", "qwen2_tiny": "qwen2"}

# The families' published chat templates with HF's {% generation %} markers put around what an assistant turn must
# learn to emit (its content and end-of-turn token), so that apply_chat_template(return_assistant_tokens_mask=True)
# states the supervised tokens independently of our offsets.
LLAMA3_MARKED = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MARKED = {"llama3": LLAMA3_MARKED, "qwen2": QWEN2_MARKED}

RECORDS = [
    {
        "id": "multi_turn_image",
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": "2"},
        ],
    },
    {
        "id": "image_after_question",
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": "Describe the image briefly.\n<image>"},
            {"from": "gpt", "value": "A blue square on a 3x3 grid."},
        ],
    },
    {
        "id": "text_only",
        "conversations": [
            {"from": "human", "value": "Is the red shape left of the blue shape?"},
            {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "Count: 10 100 2048"},
            {"from": "gpt", "value": "3 people, one umbrella"},
        ],
    },
]


def _messages(record: dict) -> list[dict]:
    """The record as chat messages, normalised as training normalises it (<image> first, on its own line)."""
    out = []
    for i, turn in enumerate(record["conversations"]):
        text = turn["value"]
        if i == 0 and record.get("image"):
            text = "<image>\n" + text.replace("<image>", "").strip()
        out.append({"role": "user" if turn["from"] == "human" else "assistant", "content": text})
    return out


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def chat(request):
    return request.param, load_tokenizer(str(resolve(f"data/tokenizer_{request.param}")))


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_ids_and_labels_equal_the_familys_own_chat_template(chat, record):
    fmt, tok = chat
    messages = _messages(record)
    encoded = encode(record, tok, fmt)
    assert encoded.input_ids == tok.apply_chat_template(messages, tokenize=True)  # the published template
    marked = tok.apply_chat_template(
        messages, chat_template=MARKED[fmt], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert marked["input_ids"] == encoded.input_ids
    ours = [int(label != IGNORE_INDEX) for label in encoded.labels]
    assert ours == marked["assistant_masks"]
    assert encoded.labels[-1 if fmt == "llama3" else -2] == tok.eos_token_id  # the turn's end is learned


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_prompt_ids_equal_the_generation_prompt_and_the_question_is_recovered(chat, record):
    fmt, tok = chat
    messages = _messages(record)[:-1]
    ids = encode_prompt(record, tok, fmt)
    assert ids == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    question = messages[-1]["content"].replace("<image>", "").strip()
    assert question_text(tok, ids, tok.convert_tokens_to_ids("<image>"), question_markers(fmt)) == question


def test_the_format_comes_from_the_llm_backbone_not_the_stage():
    assert compose([]).stage.template == "vicuna_v1"
    assert compose(["llm=llama3_tiny"]).stage.template == "llama3"
    assert compose(["llm=qwen2_tiny"]).stage.template == "qwen2"
    assert compose(["llm=qwen2_tiny", "stage=align"]).stage.template == "plain"
    assert list(compose(["llm=qwen2_tiny"]).model.lora.target_modules) == list(LLM_BACKBONES["qwen2"].lora_targets)
    with pytest.raises(ConfigError, match="stage.template=vicuna_v1 but model.llm.backbone=qwen2 speaks qwen2"):
        compose(["llm=qwen2_tiny", "stage.template=vicuna_v1"])
    with pytest.raises(ConfigError, match="unknown LLM backbone 'mistral'.*valid: llama3, qwen2, vicuna"):
        compose(["model.llm.backbone=mistral"])


def test_a_tokenizer_whose_eos_is_not_the_formats_end_of_turn_is_refused(tokenizer):
    record = RECORDS[0]
    with pytest.raises(ValueError, match="ends turns with '<\\|eot_id\\|>'"):
        encode(record, tokenizer, "llama3")  # the shipped Vicuna-style tokenizer has no <|eot_id|>
    tok = load_tokenizer(str(resolve("data/tokenizer_qwen2")))
    with pytest.raises(ValueError, match="'</s>', which is not a special token of this tokenizer"):
        encode(record, tok, "vicuna_v1")
    tok.add_special_tokens({"additional_special_tokens": ["</s>"]}, replace_additional_special_tokens=False)
    with pytest.raises(ValueError, match="eos_token is '<\\|im_end\\|>'"):
        encode(record, tok, "vicuna_v1")


def test_random_init_families_have_their_architecture(one_thread):
    llama3 = compose(["llm=llama3_tiny"])
    model = build_llm(llama3.model.llm, load_tokenizer(str(resolve(llama3.model.tokenizer))))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
    assert model.config.rope_theta == 500000.0
    qwen2 = compose(["llm=qwen2_tiny"])
    model = build_llm(qwen2.model.llm, load_tokenizer(str(resolve(qwen2.model.tokenizer))))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.model.layers[0].self_attn.q_proj.bias is not None


def _record_batch(cfg, tokenizer, model) -> dict:
    """RECORDS[0] twice, in the family's own format, the image placeholder expanded."""
    from lightning_sp.data.conversation import expand_image_token

    enc = encode(RECORDS[0], tokenizer, cfg.stage.template)
    ids, labels = expand_image_token(enc.input_ids, enc.labels, model.image_token_id, model.num_visual_tokens)
    size = cfg.model.vision.image_size
    return {"input_ids": ids[None].repeat(2, 1), "attention_mask": torch.ones(2, len(ids), dtype=torch.long),
            "labels": labels[None].repeat(2, 1), "pixel_values": torch.randn(2, 3, size, size)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("llm", FAMILIES)
def test_every_projector_trains_with_the_llama3_and_qwen2_families(llm, one_thread):
    variants = []
    for variant in group_choices("variant"):
        try:
            variants.append(compose([f"llm={llm}", f"variant={variant}", *NARROW]))
        except ConfigError:
            pass  # refused on the 12x12 grid for every LLM alike (tests/test_config.py)
    assert len(variants) >= 15
    tokenizer = load_tokenizer(str(resolve(variants[0].model.tokenizer)))
    for cfg in variants:
        torch.manual_seed(0)
        module = LlavaSPModule(cfg, tokenizer)
        first, last = first_and_last_loss(module, _record_batch(cfg, tokenizer, module.model))
        assert math.isfinite(last) and last < first, (cfg.projector.name, first, last)


@pytest.mark.slow
@pytest.mark.parametrize("llm", FAMILIES)
def test_train_command_runs_each_family_end_to_end(llm, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    cfg = compose([f"llm={llm}", "variant=cropping", *NARROW, *few_step_fit(tmp_path)])
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"]) and 0.0 <= metrics["val/accuracy"] <= 1.0
    saved = (run_dir / "config.yaml").read_text()
    assert f"template: {FAMILIES[llm]}" in saved and f"backbone: {FAMILIES[llm][:5]}" in saved


# The outside family's own conversation format: other role names and system prompt than Vicuna's.
HUMAN_BOT = Template("test_human_bot", system="A person talks with a bot.", roles=("Human", "Bot"))


@dataclass
class TiedOptions:
    tie_embeddings: bool = False  # a model.llm key no shipped family has


class TiedVicuna(LLMBackbone):
    """A family written outside the package: Llama in a format of its own, its input and output embeddings tied
    when its own key `model.llm.tie_embeddings` says so."""

    chat_format = "test_human_bot"
    lora_targets = ("q_proj", "v_proj")
    Options = TiedOptions

    @classmethod
    def random_config(cls, cfg, tokenizer):
        config = super().random_config(cfg, tokenizer)
        config.tie_word_embeddings = cfg.tie_embeddings
        return config


@pytest.fixture
def tied_vicuna():
    register_template(HUMAN_BOT)
    register_llm("test_tied_vicuna")(TiedVicuna)
    yield
    LLM_BACKBONES.pop("test_tied_vicuna")
    TEMPLATES.pop("test_human_bot")


@pytest.mark.slow
def test_a_family_added_from_outside_is_one_class_and_one_yaml(tied_vicuna, tmp_path, tokenizer, one_thread):
    preset = tmp_path / "tied.yaml"
    preset.write_text(
        "model:\n  llm: {backbone: test_tied_vicuna, tie_embeddings: true}\n  lora: {modules_to_save: []}\n"
    )
    cfg = compose(
        [
            "variant=pooling",
            *NARROW,
            *few_step_fit(tmp_path),
        ],
        config_files=[str(preset)],
    )
    assert list(cfg.model.lora.target_modules) == ["q_proj", "v_proj"]
    assert cfg.stage.template == "test_human_bot"  # the family's own format, chosen by the family
    # Its prompt, written out by hand, and its supervised tokens: the answer and the end of turn.
    record = RECORDS[0]
    expected = (
        "<s>A person talks with a bot. Human: <image>\nWhat color is the circle? Bot: Red.</s>"
        "Human: How many shapes are there? Bot:"
    )
    assert tokenizer.decode(encode_prompt(record, tokenizer, cfg.stage.template)) == expected
    encoded = encode(record, tokenizer, cfg.stage.template)
    supervised = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised).split() == ["Red.</s>", "2</s>"]
    assert math.isfinite(train(cfg)["val/loss"])
    llm = LlavaSPModule(cfg, tokenizer).model.llm
    assert llm.get_input_embeddings().weight is llm.get_output_embeddings().weight


def test_the_tokenizers_own_chat_template_decides_the_format(chat):
    """A tokenizer whose chat template renders otherwise than its family's format is refused, naming where; one
    whose template marks the assistant's tokens ({% generation %}) is checked against what we supervise."""
    fmt, tok = chat
    record = RECORDS[0]
    marked = copy.deepcopy(tok)
    marked.chat_template = MARKED[fmt]
    assert encode(record, marked, fmt).labels == encode(record, tok, fmt).labels  # marks what we supervise
    dated = copy.deepcopy(tok)  # e.g. Llama-3.1's template, which writes a dated system turn
    dated.chat_template = "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: 28 Nov 2026<|eot_id|>' }}" + (
        MARKED[fmt].replace("{{ bos_token }}", "")
    )
    with pytest.raises(ValueError, match="renders a conversation differently from the .* format from token"):
        encode(record, dated, fmt)
    with pytest.raises(ValueError, match="renders a conversation differently"):
        encode_prompt(record, dated, fmt)  # eval prompts too
    unmarked_end = copy.deepcopy(tok)  # marks the answers but not their end-of-turn token
    end = "<|eot_id|>" if fmt == "llama3" else "<|im_end|>"
    unmarked_end.chat_template = MARKED[fmt].replace(
        f" + '{end}' }}}}{{% endgeneration %}}", f" }}}}{{% endgeneration %}}{{{{ '{end}' }}}}"
    )
    assert unmarked_end.chat_template != MARKED[fmt]
    with pytest.raises(ValueError, match="marks .* as what the assistant emits"):
        encode(record, unmarked_end, fmt)
