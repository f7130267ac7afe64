"""The real-recipe presets (model=llava7b/llava13b, data=llava665k/lcs558k): recipe numbers, and a forward/backward
of the llava7b preset with tiny pretrained models that the test saves itself (`from_pretrained` of local dirs)."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from lightning_sp.config import compose
from lightning_sp.data.tokenizer import load_tokenizer
from lightning_sp.module import LlavaSPModule

GPUS = 8  # the per-device batch sizes of the data presets assume one 8-GPU node
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("model, llm", [("llava7b", "lmsys/vicuna-7b-v1.5"), ("llava13b", "lmsys/vicuna-13b-v1.5")])
def test_presets_carry_the_recipe(model, llm):
    """docs/METHOD.md §4: align 1e-3 / batch 256 on LCS-558K; finetune LoRA r128 a256 2e-4, projector 2e-5,
    batch 128; finetune_full (LLaVA-1.5's scripts/v1_5/finetune.sh) every LLM weight and the projector at 2e-5,
    batch 128."""
    finetune = compose([f"model={model}", "data=llava665k", "stage=finetune", "trainer=gpu"])
    full = compose([f"model={model}", "data=llava665k", "stage=finetune_full", "trainer=fsdp"])
    align = compose([f"model={model}", "data=lcs558k", "stage=align", "trainer=gpu"])
    for cfg in (finetune, full, align):
        m = cfg.model
        assert m.vision.name_or_path == "openai/clip-vit-large-patch14-336"
        assert (m.vision.image_size, m.vision.patch_size, m.vision.select_layer) == (336, 14, -2)
        assert m.llm.name_or_path == llm and m.tokenizer == llm
        assert m.llm.dtype == "bfloat16" and m.llm.gradient_checkpointing
        assert (m.lora.r, m.lora.alpha, m.lora.dropout) == (128, 256, 0.05)
        assert set(m.lora.target_modules) == TARGETS and not m.lora.modules_to_save
        assert cfg.projector.sp_width == 512 and cfg.projector.name == "pooling" and cfg.projector.dfi
        assert cfg.data.max_length == 2048 and cfg.data.synthetic is None and cfg.data.val_dir is None
        assert cfg.optim.weight_decay == 0.0 and cfg.optim.warmup_ratio == 0.03 and cfg.optim.lr_sp_conv is None
        assert cfg.trainer.precision == "bf16-mixed"
    assert finetune.stage.lora and finetune.stage.template == "vicuna_v1"
    assert (finetune.optim.lr_projector, finetune.optim.lr_lora) == (2e-5, 2e-4)
    assert not align.stage.lora and align.stage.template == "plain" and align.optim.lr_projector == 1e-3
    assert full.stage.full_llm and not full.stage.lora and full.stage.template == "vicuna_v1"
    assert (full.optim.lr_llm, full.optim.lr_projector, full.optim.schedule) == (2e-5, 2e-5, "cosine")
    # Stage 2 groups by modality and length in groups of 8 of a rank's batches (the value the README's and
    # benchmarks/RESULTS.md's padding figures are for); stage 1 (captions, one modality) does not group.
    assert finetune.data.length_group_batches == full.data.length_group_batches == 8
    assert align.data.length_group_batches == 1
    for cfg, global_batch, samples in ((finetune, 128, 665298), (full, 128, 665298), (align, 256, 558128)):
        assert cfg.data.batch_size * GPUS * cfg.trainer.accumulate_grad_batches == global_batch
        assert cfg.trainer.max_steps == samples // global_batch  # one epoch
    assert compose(["model=llava7b", "variant=cropping"]).projector.sp_width == 512  # variants keep D = 512


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory, tokenizer):
    """A tiny CLIP vision tower (48 px, patch 4: a 12x12 grid) and a tiny Llama + its tokenizer, saved as HF dirs."""
    root = tmp_path_factory.mktemp("pretrained")
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=48,
            patch_size=4,
        )
    )
    vision.save_pretrained(root / "clip")
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    llm.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")  # the LLM's own tokenizer, as model.tokenizer expects
    return root / "clip", root / "llama"


def test_llava7b_preset_builds_trains_lora_and_projector_in_bf16(tiny_pretrained):
    clip, llama = tiny_pretrained
    cfg = compose(
        [
            "model=llava7b",
            f"model.vision.name_or_path={clip}",
            f"model.llm.name_or_path={llama}",
            f"model.tokenizer={llama}",
            "model.vision.image_size=48",
            "model.vision.patch_size=4",
        ]
    )
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    module = LlavaSPModule(cfg, tokenizer)
    model = module.model

    # bf16 frozen LLM (LoRA adapters and projector stay fp32: they are what the optimizer updates).
    llm_frozen = [p for n, p in model.llm.named_parameters() if "lora_" not in n]
    assert llm_frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in llm_frozen)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.vision.parameters())
    assert model.llm.base_model.model.is_gradient_checkpointing

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert set(trainable) == lora | {n for n in trainable if n.startswith("projector.")}
    assert {n.split(".")[-4] for n in lora} == TARGETS  # ...layers.0.self_attn.q_proj.lora_A.default.weight
    assert len(lora) == 2 * len(TARGETS) * 2  # A and B, 7 projections, 2 layers
    assert all(trainable[n].shape[0] == 128 for n in lora if "lora_A" in n)
    assert model.llm.peft_config["default"].lora_alpha == 256
    assert model.projector.dfi.kv_weight.shape[0] == 512  # D from the preset
    assert all(p.dtype == torch.float32 for p in trainable.values())

    # forward/backward through the tiny bf16 model, as a training step does
    module.train()
    n_vis = model.num_visual_tokens
    assert n_vis == 6 + 12 * 12
    text = tokenizer("A red circle in the top left cell.").input_ids
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[text[0]] + [image_id] * n_vis + text[1:]] * 2)
    labels = ids.clone()
    labels[:, : 1 + n_vis] = -100
    torch.manual_seed(0)
    out = model(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 48, 48), labels=labels
    )
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert all(trainable[n].grad.abs().sum() > 0 for n in lora if "lora_B" in n)
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if n.startswith("projector.patch_head"))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
