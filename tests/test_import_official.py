"""Whole-model import of a released LLaVA-SP LoRA directory, on a tiny fake release written here in the official
layout (peft `save_pretrained` adapter + `non_lora_trainables.bin` under official names + LLaVA config.json):
import -> our run dir -> rebuilt model gives the logits of a direct computation (peft's own adapter loading + the
§2 projector written out on the official tensors); export -> the release's files and tensors again."""

import json
import re
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from lightning_sp.checkpoint import checkpoint_config, read_checkpoint
from lightning_sp.module import load_module
from lightning_sp.cli import main as cli_main
from lightning_sp.import_official import export_official, import_official
from lightning_sp.models.official import OfficialCheckpointError
from lightning_sp.module import LlavaSPModule
from lightning_sp.warm_start import warm_start

C, D, H, G = 32, 16, 64, 24  # CLIP width, SP width, LLM width, patch grid (336 px / 14: the paper's grid)
SIDES = (4, 8, 12, 16, 20, 24)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def official_shapes(variant):
    """docs/METHOD.md §3, written out independently of lightning_sp.models.official.KEY_TABLE."""
    shapes = {}
    for s in SIDES:
        shapes[f"model.conv_{s}.1.weight" if variant == "pooling" and s < 24 else f"model.conv_{s}.weight"] = (
            D,
            C,
            s,
            s,
        )
    shapes["model.conv_CM.weight"] = (D, C, 16, 16)
    for p in ("query", "key", "value"):
        shapes.update(
            {
                f"model.{p}_projector.0.weight": (D,),
                f"model.{p}_projector.0.bias": (D,),
                f"model.{p}_projector.1.weight": (D, D),
                f"model.{p}_projector.1.bias": (D,),
            }
        )
    shapes["model.conv_linear.1.weight"] = (H, 2 * D)
    if variant == "cropping":
        shapes["model.conv_linear.1.bias"] = (H,)
    shapes.update(
        {
            "model.mm_projector.0.weight": (H, C),
            "model.mm_projector.0.bias": (H,),
            "model.mm_projector.2.weight": (H, H),
            "model.mm_projector.2.bias": (H,),
        }
    )
    return shapes


def write_release(root, variant, llama_dir, clip_dir, seed=0):
    """The official layout, in bf16 as LLaVA's bf16 training saves it; the folder name has no 'lora' in it."""
    gen = torch.Generator().manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(llama_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # B != 0: the adapter changes the logits
    peft_model.to(torch.bfloat16).save_pretrained(root)
    non_lora = {}
    for name, shape in official_shapes(variant).items():
        t = torch.randn(shape, generator=gen)
        t = (
            1 + 0.2 * t
            if "_projector.0.weight" in name
            else (t / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.2 * t)
        )
        non_lora["base_model.model." + name] = t.to(torch.bfloat16)
    torch.save(non_lora, root / "non_lora_trainables.bin")
    llava = {
        **LlamaConfig.from_pretrained(llama_dir).to_dict(),
        "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": str(clip_dir),
        "mm_hidden_size": C,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }
    (root / "config.json").write_text(json.dumps(llava))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=C,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        )
    )
    clip.save_pretrained(root / "clip")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=H,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    (root / "weights-v1").mkdir()
    release = write_release(root / "weights-v1", "pooling", root / "llama", root / "clip")
    # The public API, with --llm / --vision defaulted from the release's adapter and LLaVA configs.
    import_official(release, "pooling", root / "run", overrides=["model.llm.dtype=float32"])
    return root


def direct_logits(root, ids, pixel_values, image_id):
    """Independent path: peft's own adapter loading, HF CLIP, the §2 pooling projector on the raw official tensors."""
    lm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "llama"), root / "weights-v1").eval()
    clip = CLIPVisionModel.from_pretrained(root / "clip").eval()
    sd = {
        k.removeprefix("base_model.model."): v.float()
        for k, v in torch.load(root / "weights-v1" / "non_lora_trainables.bin", weights_only=True).items()
    }
    with torch.no_grad():
        z = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        b = z.shape[0]
        zmap = z.transpose(1, 2).reshape(b, C, G, G)
        tokens = []
        for s in SIDES:
            x, w = (
                (zmap, sd["model.conv_24.weight"])
                if s == 24
                else (F.adaptive_avg_pool2d(zmap, s), sd[f"model.conv_{s}.1.weight"])
            )
            tokens.append(F.conv2d(x, w).reshape(b, D))
        sp_raw = torch.stack(tokens, 1)
        kv = F.conv2d(zmap, sd["model.conv_CM.weight"], stride=2).flatten(2).transpose(1, 2)

        def ln_linear(x, p):
            x = F.layer_norm(x, (D,), sd[f"model.{p}_projector.0.weight"], sd[f"model.{p}_projector.0.bias"])
            return F.linear(x, sd[f"model.{p}_projector.1.weight"], sd[f"model.{p}_projector.1.bias"])

        q, k, v = ln_linear(sp_raw, "query"), ln_linear(kv, "key"), ln_linear(kv, "value")
        sp = torch.cat([sp_raw, torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1) @ v], -1)
        visual = torch.cat(
            [
                F.linear(F.gelu(sp), sd["model.conv_linear.1.weight"]),
                F.linear(
                    F.gelu(F.linear(z, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])),
                    sd["model.mm_projector.2.weight"],
                    sd["model.mm_projector.2.bias"],
                ),
            ],
            1,
        )
        is_image = ids == image_id
        embeds = lm.get_input_embeddings()(ids.masked_fill(is_image, 0))
        embeds[is_image] = visual.reshape(-1, H)  # one image per sample, tokens in order
        return lm(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits


def test_import_gives_the_logits_of_a_direct_computation(world, tokenizer):
    module = load_module(world / "run")
    cfg = module.cfg
    assert (cfg.model.llm.name_or_path, cfg.model.vision.name_or_path) == (str(world / "llama"), str(world / "clip"))
    assert (cfg.projector.name, cfg.projector.sp_width, cfg.model.lora.r, cfg.model.lora.alpha) == ("pooling", D, 8, 16)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    n_vis = module.model.num_visual_tokens
    assert n_vis == 6 + G * G
    text = tokenizer("What shape is in the top left cell?").input_ids
    ids = torch.tensor([[text[0]] + [image_id] * n_vis + text[1:]] * 2)
    pixel_values = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = module.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values).logits
    direct = direct_logits(world, ids, pixel_values, image_id)
    assert (ours - direct).abs().max() < 1e-4
    # the adapter matters: without LoRA the logits differ
    with module.model.llm.disable_adapter(), torch.no_grad():
        plain = module.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values).logits
    assert (plain - direct).abs().max() > 1e-2


def test_imported_run_warm_starts_a_new_run(world, tokenizer):
    cfg = checkpoint_config(read_checkpoint(world / "run"))
    report = warm_start(LlavaSPModule(cfg, tokenizer), world / "run")
    assert report.loaded and not report.fresh and not report.ignored
    assert any("lora_A" in n for n in report.loaded) and any(n.startswith("model.projector.") for n in report.loaded)


def test_export_reproduces_the_release(world, tmp_path):
    out = export_official(world / "run", tmp_path / "exported")
    release = world / "weights-v1"
    for name in ("adapter_config.json", "config.json"):
        assert json.loads((out / name).read_text()) == json.loads((release / name).read_text()), name
    for name, load in (
        ("adapter_model.safetensors", load_file),
        ("non_lora_trainables.bin", lambda p: torch.load(p, weights_only=True)),
    ):
        want, got = load(release / name), load(out / name)
        assert set(got) == set(want), name
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_cli_import_then_export_without_provenance(world, tmp_path, tokenizer):
    """The CLI with explicit --llm/--vision; a checkpoint from training (no provenance) exports in fp32 with a
    peft-written adapter config that peft loads back."""
    run = tmp_path / "cli-run"
    assert (
        cli_main(
            [
                "import-official",
                "--lora-dir",
                str(world / "weights-v1"),
                "--variant",
                "pooling",
                "--llm",
                str(world / "llama"),
                "--vision",
                str(world / "clip"),
                "--out",
                str(run),
                "model.llm.dtype=float32",
            ]
        )
        == 0
    )
    ckpt = read_checkpoint(run)
    assert set(ckpt["state_dict"]) == set(read_checkpoint(world / "run")["state_dict"])
    del ckpt["lightning_sp_official"]
    torch.save(ckpt, tmp_path / "trained.ckpt")
    assert cli_main(["export-official", "--ckpt", str(tmp_path / "trained.ckpt"), "--out", str(tmp_path / "x")]) == 0
    adapter = load_file(tmp_path / "x" / "adapter_model.safetensors")
    want = load_file(world / "weights-v1" / "adapter_model.safetensors")
    assert set(adapter) == set(want) and all(adapter[k].dtype == torch.float32 for k in adapter)
    assert all(torch.equal(adapter[k], want[k].float()) for k in want)
    lm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(world / "llama"), tmp_path / "x")
    assert lm.peft_config["default"].r == 8 and lm.peft_config["default"].lora_alpha == 16
    assert json.loads((tmp_path / "x" / "config.json").read_text())["mm_vision_tower"] == str(world / "clip")


def test_import_is_strict(world, tmp_path):
    release = tmp_path / "broken"
    release.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors", "config.json"):
        (release / f).write_bytes((world / "weights-v1" / f).read_bytes())
    non_lora = torch.load(world / "weights-v1" / "non_lora_trainables.bin", weights_only=True)
    del non_lora["base_model.model.model.conv_CM.weight"]
    torch.save(non_lora, release / "non_lora_trainables.bin")
    with pytest.raises(OfficialCheckpointError, match=r"missing \(1\): model\.conv_CM\.weight"):
        import_official(release, "pooling", tmp_path / "a")
    # the cropping layout asked of a pooling release
    with pytest.raises(OfficialCheckpointError, match="pass variant='pooling'"):
        import_official(world / "weights-v1", "cropping", tmp_path / "b")

    from safetensors.torch import save_file

    torch.save(
        torch.load(world / "weights-v1" / "non_lora_trainables.bin", weights_only=True),
        release / "non_lora_trainables.bin",
    )
    adapter = load_file(world / "weights-v1" / "adapter_model.safetensors")
    del adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(adapter, str(release / "adapter_model.safetensors"))
    with pytest.raises(
        OfficialCheckpointError,
        match=r"missing \(1\): base_model\.model\.model\.layers\.1\.mlp\."
        r"down_proj\.lora_B\.weight",
    ):
        import_official(release, "pooling", tmp_path / "c")
    assert not (tmp_path / "c").exists()

    config = json.loads((world / "weights-v1" / "adapter_config.json").read_text())
    (release / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(OfficialCheckpointError, match="use_dora=True is not supported"):
        import_official(release, "pooling", tmp_path / "d")


@pytest.mark.parametrize(
    "key,value,shown",
    [
        ("image_aspect_ratio", "anyres", "image_aspect_ratio = 'anyres'; supported: 'pad'"),
        ("image_aspect_ratio", None, "image_aspect_ratio = absent (LLaVA then uses 'square'); supported: 'pad'"),
        ("mm_patch_merge_type", "spatial_unpad", "mm_patch_merge_type = 'spatial_unpad'; supported: 'flat'"),
        ("mm_use_im_start_end", True, "mm_use_im_start_end = True; supported: False"),
        ("mm_use_im_patch_token", True, "mm_use_im_patch_token = True; supported: False"),
        ("mm_vision_select_feature", "cls_patch", "mm_vision_select_feature = 'cls_patch'; supported: 'patch'"),
        ("mm_vision_select_layer", "-2", "mm_vision_select_layer = '-2'; supported: an integer"),
    ],
)
def test_import_refuses_release_settings_it_does_not_reproduce(world, tmp_path, key, value, shown):
    release = tmp_path / "release"
    release.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"):
        (release / f).write_bytes((world / "weights-v1" / f).read_bytes())
    config = json.loads((world / "weights-v1" / "config.json").read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    (release / "config.json").write_text(json.dumps(config))
    with pytest.raises(OfficialCheckpointError, match=re.escape(shown)) as err:
        import_official(release, "pooling", tmp_path / "out")
    assert "config.json" in str(err.value) and not (tmp_path / "out").exists()


def copy_release(world, release, config_changes):
    """The fixture's release with config.json changed (None: without config.json)."""
    release.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"):
        (release / f).write_bytes((world / "weights-v1" / f).read_bytes())
    if config_changes is not None:
        config = json.loads((world / "weights-v1" / "config.json").read_text())
        (release / "config.json").write_text(json.dumps({**config, **config_changes}))
    return release


@pytest.mark.parametrize("layer", [3, -4])
def test_import_refuses_a_select_layer_outside_the_vision_tower(world, tmp_path, layer):
    """The fixture's CLIP has 2 layers: `hidden_states` holds 3 entries (embeddings + one per layer), so LLaVA's
    `hidden_states[layer]` exists for -3..2 only; anything else would be written into a run that cannot run."""
    depth = CLIPVisionConfig.from_pretrained(world / "clip").num_hidden_layers
    assert depth == 2
    with torch.no_grad():
        states = CLIPVisionModel.from_pretrained(world / "clip")(
            torch.zeros(1, 3, 336, 336), output_hidden_states=True
        ).hidden_states
    with pytest.raises(IndexError):  # what the first forward of the imported run would meet
        states[layer]
    release = copy_release(world, tmp_path / "release", {"mm_vision_select_layer": layer})
    shown = (
        f"mm_vision_select_layer = {layer}; supported: a hidden-state index of the vision tower, -3..2 "
        "(it has 2 layers); pass the encoder the release was trained with (--vision)"
    )
    with pytest.raises(OfficialCheckpointError, match=re.escape(shown)):
        import_official(release, "pooling", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_release_without_its_llava_config(world, tmp_path):
    release = copy_release(world, tmp_path / "release", None)
    with pytest.raises(OfficialCheckpointError) as err:
        import_official(release, "pooling", tmp_path / "out")
    assert str(err.value).startswith(
        f"{release}: no config.json, so what the release was trained with (image_aspect_ratio, "
        "mm_vision_select_layer, ...) is unknown; supported: a release with LLaVA's config.json beside the adapter"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra_rows", [-1, -2, 3])
def test_import_refuses_a_tokenizer_that_is_not_the_llms_vocabulary(world, tmp_path, tokenizer, extra_rows):
    """The same LLM with a table of len(tokenizer) + extra_rows rows: the fixture's tokenizer holds `<image>` in
    its own vocabulary (id 4), so no id past the table is allowed, and a table larger than the tokenizer means
    the tokenizer is not the LLM's. LoRA shapes do not depend on the vocabulary: only this check refuses."""
    rows = len(tokenizer) + extra_rows
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    llm = LlamaForCausalLM.from_pretrained(world / "llama")
    llm.resize_token_embeddings(rows)
    llm.save_pretrained(tmp_path / "llm")
    assert LlamaConfig.from_pretrained(tmp_path / "llm").vocab_size == rows
    with pytest.raises(OfficialCheckpointError) as err:
        import_official(
            world / "weights-v1",
            "pooling",
            tmp_path / "out",
            llm=str(tmp_path / "llm"),
            tokenizer=str(world / "llama"),
            overrides=["model.llm.dtype=float32"],
        )
    assert str(err.value) == (
        f"{world / 'weights-v1'}: --tokenizer (model.tokenizer) = '{world / 'llama'}' has {len(tokenizer)} tokens "
        f"(<image> is id 4) but the LLM's embedding table has {rows} rows; supported: the LLM's own tokenizer, its "
        f"vocabulary exactly the table's rows, <image> one of them or the single id {rows} appended past it. Pass "
        "the tokenizer the release was trained with (--tokenizer, default: the --llm)"
    )
    assert not (tmp_path / "out").exists()


def test_vocabulary_check_allows_the_image_id_appended_past_the_table(tmp_path):
    """A Vicuna-like tokenizer without `<image>`: load_tokenizer appends it as id len(vocabulary), one past the
    LLM's table (LLaVA itself uses id -200 and never adds it); accepted. A table one row short is not."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lightning_sp.data.tokenizer import load_tokenizer
    from lightning_sp.import_official import check_vocabulary

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert (len(tok), tok.convert_tokens_to_ids("<image>")) == (len(vocab) + 1, len(vocab))
    check_vocabulary(tok, LlamaConfig(vocab_size=len(vocab)), "here")
    with pytest.raises(OfficialCheckpointError, match=r"has 7 tokens \(<image> is id 6\) but the LLM's embedding "):
        check_vocabulary(tok, LlamaConfig(vocab_size=len(vocab) - 1), "here")
