"""`export`: merged Hugging Face directories that plain transformers loads and that reproduce our logits.

mlp -> native `LlavaForConditionalGeneration`; pooling/cropping -> `trust_remote_code` package loaded through
`AutoModelForCausalLM`. The inputs come from the exported processor (which expands `<image>` into the model's
number of visual tokens), the pixels from our own preprocessing, fed identically to both models."""

import json

import numpy as np
import pytest
import torch
import transformers.dynamic_module_utils as dynamic_module_utils
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from lightning_sp.checkpoint import save_module_checkpoint
from lightning_sp.module import load_module
from lightning_sp.cli import main as cli_main
from lightning_sp.config import ConfigError
from lightning_sp.data.tokenizer import load_tokenizer
from lightning_sp.data.images import ImageProcessor
from lightning_sp.export import _client_tokenizer, _processor, export_hf
from lightning_sp.hf_remote.processing_llava_sp import LlavaSPProcessor
from lightning_sp.module import LlavaSPModule

SIZE = 168  # 12x12 patch grid at patch 14: small, and still six distinct SP windows


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path, monkeypatch):
    """trust_remote_code copies the model files into HF_MODULES_CACHE: keep that out of the home directory."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def trained_run(tmp_path, tokenizer, tiny_cfg, *overrides):
    """A run dir whose trainable tensors (LoRA B included, so the merge matters) are not at their init."""
    cfg = tiny_cfg(f"model.vision.image_size={SIZE}", "model.vision.patch_size=14", *overrides)
    module = LlavaSPModule(cfg, tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_module_checkpoint(module, tmp_path / "run")
    return tmp_path / "run"


def processor_inputs(out, batch=2):
    """Processor-style input: prompts with one `<image>` each, expanded by the exported processor."""
    processor = AutoProcessor.from_pretrained(out)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (90 + 20 * i, 120, 3), dtype=np.uint8)) for i in range(batch)]
    prompts = [f"USER: <image>\nWhat shape is in the {w} cell? ASSISTANT:" for w in ("top left", "center")][:batch]
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    ours = ImageProcessor(SIZE)
    pixels = torch.stack([ours(torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()) for im in images])
    assert (pixels - enc.pixel_values).abs().max() < 0.1  # the saved processor preprocesses as LLaVA-1.5 ("pad")
    return enc.input_ids, enc.attention_mask, pixels


@pytest.mark.parametrize(
    "overrides, sp_tokens",
    [
        (("variant=mlp",), 0),
        (("variant=pooling",), 6),
        (("variant=cropping", "projector.sides=[8,16,24]", "projector.dfi_kv_tokens=9"), 3),
    ],
)
def test_export_reproduces_our_logits(tmp_path, tokenizer, tiny_cfg, overrides, sp_tokens):
    run = trained_run(tmp_path, tokenizer, tiny_cfg, *overrides)
    out = export_hf(run, tmp_path / f"hf-{overrides[0].split('=')[1]}")
    ours = load_module(run).model
    if sp_tokens == 0:
        hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
        config = json.loads((out / "config.json").read_text())
        assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
        assert config["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>")
    else:
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert type(hf).__module__.startswith("transformers_modules.")  # the copied code, not lightning_sp's
        for name in ("modeling_llava_sp.py", "configuration_llava_sp.py"):
            assert "lightning_sp" not in "".join(
                line for line in (out / name).read_text().splitlines(True) if line.startswith(("import", "from"))
            )
        auto_map = json.loads((out / "config.json").read_text())["auto_map"]
        for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel"):
            assert auto_map[auto] == "modeling_llava_sp.LlavaSPForConditionalGeneration"
    assert not any("lora" in k for k in load_file(next(out.glob("*.safetensors"))))  # merged
    ids, mask, pixels = processor_inputs(out)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ((ids == image_id).sum(1) == ours.num_visual_tokens).all() and ours.num_visual_tokens == sp_tokens + 144
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (want - got).abs().max() < 1e-4

    # Greedy decoding from left-padded prompts gives the same tokens.
    left = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        processor = AutoProcessor.from_pretrained(out)
        processor.tokenizer.padding_side = "left"
        enc = processor(
            images=[Image.new("RGB", (SIZE, SIZE))] * 2,
            padding=True,
            return_tensors="pt",
            text=["USER: <image>\nWhere? ASSISTANT:", "USER: <image>\nWhat colour is it? ASSISTANT:"],
        )
    finally:
        tokenizer.padding_side = left
    pixels = torch.stack([ImageProcessor(SIZE)(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8))] * 2)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = ours.generate(
        enc.input_ids, enc.attention_mask, pixels, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id
    )
    theirs = hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels, **kwargs)
    assert torch.equal(theirs[:, : enc.input_ids.shape[1]], enc.input_ids)  # both return prompt + new tokens
    assert torch.equal(new, theirs[:, enc.input_ids.shape[1] :])


def test_image_token_beyond_the_vocabulary_grows_the_llava_export(tmp_path, tiny_cfg):
    """Vicuna's case: `<image>` is added after the LLM's last id; HF Llava embeds it, so the export grows the
    vocabulary (to a multiple of 64); the original logits are unchanged."""
    words = ["<unk>", "<s>", "</s>", "USER:", "ASSISTANT:", "what", "is", "it", "?", "a", "red", "circle"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(words),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    cfg = tiny_cfg(
        f"model.vision.image_size={SIZE}",
        "model.vision.patch_size=14",
        "variant=mlp",
        f"model.llm.name_or_path={tmp_path / 'llm'}",
        f"model.tokenizer={tmp_path / 'llm'}",
    )
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(words)  # one past the LLM's vocabulary
    module = LlavaSPModule(cfg, tokenizer)
    save_module_checkpoint(module, tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / "hf-vocab")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.text_config.vocab_size == 64
    ids = torch.tensor([[1, 3] + [image_id] * 144 + [5, 6, 7, 8, 4]])
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = (
            load_module(tmp_path / "run")
            .model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
            .logits
        )
        got = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    assert got.shape[-1] == 64 and (want - got[..., : len(words)]).abs().max() < 1e-4


def test_cli_export_dtype_and_errors(tmp_path, tokenizer, tiny_cfg):
    run = trained_run(tmp_path, tokenizer, tiny_cfg, "variant=mlp")
    assert cli_main(["export", f"ckpt={run}", f"out={tmp_path / 'bf16'}", "dtype=bfloat16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    assert cli_main(["export", f"ckpt={run}"]) == 2  # out missing: a config error, no traceback
    with pytest.raises(ConfigError, match="export supports the projectors"):
        export_hf(
            trained_run(tmp_path / "x", tokenizer, tiny_cfg, "variant=conv49", "model.vision.image_size=336"),
            tmp_path / "y",
        )


def _plain(value):
    """Tensors and arrays as (nested) lists, lists element by element: outputs compared whatever their type."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return [_plain(v) for v in value] if isinstance(value, list) else value


def test_remote_processor_calls_as_llava_processor_does(tokenizer):
    """Where one pass is exact (the shipped byte-level BPE), LlavaSPProcessor's piece-by-piece encoding must be
    transformers' LlavaProcessor's output, option for option: the real LlavaProcessor is the reference."""
    client = _client_tokenizer(tokenizer, "vicuna_v1")
    ours = ImageProcessor(SIZE)
    ref = _processor(client, SIZE, 14, 0, (ours.mean, ours.std))
    assert type(ref) is LlavaProcessor  # the export keeps the plain class for this tokenizer
    mine = LlavaSPProcessor(
        image_processor=ref.image_processor,
        tokenizer=ref.tokenizer,
        patch_size=ref.patch_size,
        vision_feature_select_strategy=ref.vision_feature_select_strategy,
        num_additional_image_tokens=ref.num_additional_image_tokens,
        image_token=ref.image_token,
        chat_template=ref.chat_template,
    )
    images = [Image.new("RGB", (SIZE, SIZE), (200, 10, 10))] * 3
    texts = ["USER: <image>\nWhere? ASSISTANT:", "<image>What colour is the circle?", "USER: x <image> 2 dogs</s>y"]
    calls = [
        dict(),
        dict(padding=True, return_tensors="pt"),
        dict(padding="max_length", max_length=200, padding_side="right"),
        dict(padding=True, pad_to_multiple_of=64, return_mm_token_type_ids=True),
        dict(padding=True, return_offsets_mapping=True),
        dict(truncation=True, max_length=150, padding=True),
        dict(add_special_tokens=False, padding=True, return_attention_mask=False),
    ]
    for kwargs in calls:
        want = ref(images=images, text=texts, **kwargs)
        got = mine(images=images, text=texts, **kwargs)
        assert sorted(got.keys()) == sorted(want.keys()), kwargs
        for key in want:
            assert type(got[key]) is type(want[key]) and _plain(got[key]) == _plain(want[key]), (key, kwargs)
    assert mine(text="no image here")["input_ids"] == ref(text="no image here")["input_ids"]
    chat = [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Top left."}]},
    ]
    for kwargs in (dict(), dict(return_assistant_tokens_mask=True)):
        want = ref.apply_chat_template(chat, tokenize=True, return_dict=True, **kwargs)
        got = mine.apply_chat_template(chat, tokenize=True, return_dict=True, **kwargs)
        assert {k: v for k, v in got.items() if k != "pixel_values"} == {
            k: v for k, v in want.items() if k != "pixel_values"
        }
    with pytest.raises(ValueError, match="return_token_type_ids"):
        mine(images=images[0], text=texts[0], return_token_type_ids=True)
