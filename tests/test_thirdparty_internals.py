"""The third-party internals we rely on (lightning_sp/thirdparty/), checked against the public behaviour they stand
in for: when an upgrade of transformers or torch changes them, these fail, naming the function to revisit."""

import multiprocessing

import pytest
import torch

from lightning_sp.thirdparty import torch_internals, transformers_internals


def test_the_rust_backend_gives_what_the_tokenizer_call_gives(tokenizer):
    from transformers import PreTrainedTokenizerFast

    for name in transformers_internals.HF_ENCODE_PATH:  # the methods whose override would bypass the backend
        assert hasattr(PreTrainedTokenizerFast, name), f"transformers renamed {name}: revisit rust_backend"
    backend = transformers_internals.rust_backend(tokenizer)
    assert backend is not None, "the shipped tokenizer no longer takes the direct path: revisit rust_backend"
    for text in ("USER: <image>\nWhat is it? ASSISTANT: 2</s>", "", "é 😀 x"):
        enc = backend.encode(text, add_special_tokens=True)
        call = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        assert enc.ids == call["input_ids"] and [tuple(o) for o in enc.offsets] == call["offset_mapping"]


def test_the_too_long_warning_is_the_one_transformers_logs(tokenizer, caplog):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = 3
    transformers_internals.warn_if_too_long(tok, [1, 2, 3, 4])
    assert tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_the_attention_switch_reaches_the_model_under_peft_and_is_restored():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    transformers_internals.set_config_attn_implementation(config, "sdpa")
    llm = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    assert transformers_internals.attn_implementation(llm) == "sdpa"
    ids = torch.tensor([[1, 2, 3]])
    with transformers_internals.eager_attention(llm):
        assert transformers_internals.attn_implementation(llm) == "eager"
        out = llm(input_ids=ids, output_attentions=True)
        assert out.attentions[0] is not None and out.attentions[0].shape == (1, 2, 3, 3)  # eager returns weights
    assert transformers_internals.attn_implementation(llm) == "sdpa"


def _read_in_child(queue):
    queue.put(queue.get().sum().item())


def test_shared_empty_is_shared_memory_that_crosses_processes_without_a_copy():
    t = torch_internals.shared_empty(2, 3, 4)
    assert t.shape == (2, 3, 4) and t.dtype == torch.float32 and t.is_shared()
    t.fill_(1.0)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    queue.put(t)
    child = ctx.Process(target=_read_in_child, args=(queue,))
    child.start()
    child.join(60)
    assert queue.get(timeout=10) == 24.0


def test_assert_async_raises_on_cpu():
    torch_internals.assert_async(torch.tensor(True), "fine")
    with pytest.raises(RuntimeError, match="non-finite"):
        torch_internals.assert_async(torch.isfinite(torch.tensor([float("nan")])).all(), "non-finite values in x")


def test_view_base_is_the_tensor_whose_storage_a_view_shares():
    buffer = torch.zeros(3, 2, 4)
    slot = buffer[1]
    assert torch_internals.view_base(slot) is buffer, "Tensor._base changed: revisit view_base (collate's buffer)"
    assert torch_internals.view_base(slot[0]) is buffer  # a view of a view points at the root, not the middle
    # what the collator concludes from it, checked by public means: same storage, and writes show through
    assert slot.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    slot.fill_(7.0)
    assert buffer[1].eq(7.0).all() and buffer[0].eq(0.0).all()
    assert torch_internals.view_base(buffer) is None and torch_internals.view_base(slot.clone()) is None


def test_no_split_module_classes_name_the_repeated_blocks_of_hf_models():
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    llm = LlamaForCausalLM(config)
    # the blocks as the model's public structure has them: each entry of model.layers
    blocks = {type(layer).__name__ for layer in llm.model.layers}
    assert transformers_internals.no_split_module_classes(llm) >= blocks, (
        "transformers' _no_split_modules no longer names the decoder layers: revisit no_split_module_classes "
        "(the FSDP units of lightning_sp.distributed.plan_units)"
    )
    peft = get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj"]))
    assert transformers_internals.no_split_module_classes(peft) >= blocks  # found through a peft wrapper too
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14))  # fmt: skip
    clip_blocks = {type(layer).__name__ for layer in clip.vision_model.encoder.layers}
    assert transformers_internals.no_split_module_classes(clip) >= clip_blocks
    assert transformers_internals.no_split_module_classes(torch.nn.Linear(2, 2)) == set()
