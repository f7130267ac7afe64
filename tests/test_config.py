"""Config composition and validation: every YAML loads; bad keys and values fail early and say why."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lightning_sp.config import CONF_DIR, GROUPS, ConfigError, compose, group_choices, load_saved, save


PAPER_GRID = ["model.vision.name_or_path=null", "model.vision.patch_size=14"]  # a random 24x24-grid encoder
NEED_LARGER_GRID = {
    "conv49",
    "pooling_dfi49",
    "cropping_dfi49",
    "pooling_stacked",
    "cropping_stacked",
    "official_stacked",
}


@pytest.mark.parametrize("group", GROUPS)
def test_every_yaml_in_every_group_composes(group):
    choices = group_choices(group)
    assert choices, f"conf/{group}/ is empty"
    for name in choices:
        # Arms whose windows need more than the embedded default's 12x12 grid compose on the paper's 24x24 one.
        extra = PAPER_GRID if name in NEED_LARGER_GRID else []
        cfg = compose([f"{group}={name}", *extra])
        assert cfg.choices[group] == name


def test_defaults_are_the_embedded_default():
    cfg = compose()
    assert dict(cfg.choices) == {
        "stage": "finetune",
        "model": "tiny",
        "data": "synthetic",
        "trainer": "cpu",
        "variant": "pooling",
    }
    assert cfg.projector.name == "pooling" and cfg.model.llm.name_or_path is None
    assert cfg.model.vision.image_size // cfg.model.vision.patch_size == 12
    assert cfg.model.vision.name_or_path == "data/encoder"  # the shipped pretrained encoder


def test_overrides_and_group_selection():
    cfg = compose(["variant=cropping", "trainer.max_steps=50", "seed=3", "run_dir=runs/x"])
    assert (cfg.projector.name, cfg.trainer.max_steps, cfg.seed, cfg.run_dir) == ("cropping", 50, 3, "runs/x")
    # a later override beats the group file
    assert compose(["variant=pooling", "projector.dfi=false"]).projector.dfi is False


def test_unknown_key_names_the_key_and_valid_choices():
    with pytest.raises(ConfigError, match=r"trainer\.max_step'.*Did you mean 'max_steps'.*Valid keys"):
        compose(["trainer.max_step=5"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        compose(["trainer.max_steps=many"])


def test_unknown_group_choice_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown variant 'pooling2'.*cropping.*mlp.*pooling"):
        compose(["variant=pooling2"])


def test_unknown_projector_name_lists_registry():
    from lightning_sp.models.projectors import PROJECTORS

    with pytest.raises(ConfigError, match=r"unknown projector 'convnext' \(key projector.name\); valid: ") as e:
        compose(["projector.name=convnext"])
    assert str(e.value).split("valid: ")[1].split(", ") == sorted(PROJECTORS)


def test_grid_the_projector_cannot_use_fails_at_config_time():
    with pytest.raises(ConfigError, match="grid"):
        compose([*PAPER_GRID, "model.vision.image_size=56"])  # 4x4 grid: no six distinct windows


def test_saved_config_round_trips(tmp_path):
    cfg = compose(["variant=mlp", "seed=7"])
    save(cfg, tmp_path / "config.yaml")
    again = load_saved(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_cli_reports_config_errors_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_sp", "config", "trainer.max_step=5"],
        capture_output=True,
        text=True,
        cwd=CONF_DIR.parent,
    )
    assert out.returncode == 2
    assert "unknown config key 'trainer.max_step'" in out.stderr and "Traceback" not in out.stderr


# ---- impossible combinations fail at compose time, naming the key and the fix ----------------------------------


def test_grid_error_names_the_encoder_keys():
    with pytest.raises(
        ConfigError,
        match=r"pooling_stacked.*multiple of 4.*16x16.*model\.vision\.image_size=224 / "
        r"model\.vision\.patch_size=14",
    ):
        compose(["variant=pooling_stacked", *PAPER_GRID, "model.vision.image_size=224"])


def test_spatial_windows_scale_to_other_grids():
    """Not an impossible combination: pooling/cropping scale the paper's windows to the encoder's grid
    (lightning_sp/models/projectors/spatial.py), so e.g. CLIP-224/14 (16x16) composes."""
    cfg = compose(["variant=cropping", *PAPER_GRID, "model.vision.image_size=224", "model.vision.patch_size=14"])
    assert cfg.model.vision.image_size // cfg.model.vision.patch_size == 16


# Encoder grids of common CLIP/SigLIP towers: 224/16, 224/14, 336/14 (the paper's), 448/14, 672/14.
REAL_GRIDS = ((224, 16), (224, 14), (336, 14), (448, 14), (672, 14))


@pytest.mark.parametrize("variant", group_choices("variant"))
def test_every_variant_that_needs_particular_grids_says_so(variant):
    refused = []
    for size, patch in REAL_GRIDS:
        try:
            compose(
                [
                    f"variant={variant}",
                    *PAPER_GRID,
                    f"model.vision.image_size={size}",
                    f"model.vision.patch_size={patch}",
                ]
            )
        except ConfigError as e:
            assert "model.vision.image_size" in str(e) and "grid" in str(e)
            refused.append(size // patch)
    assert 24 not in refused  # every variant runs on the paper's grid
    if refused:
        text = (CONF_DIR / "variant" / f"{variant}.yaml").read_text()
        assert "grid" in text and "refused" in text, f"conf/variant/{variant}.yaml must say which grids it needs"


def test_image_size_must_hold_a_patch_and_the_grid_is_its_floor(tokenizer, one_thread):
    with pytest.raises(ConfigError, match=r"model\.vision\.image_size \(10\).*model\.vision\.patch_size \(14\)"):
        compose([*PAPER_GRID, "model.vision.image_size=10"])
    # 300 px at patch 14: the convolution drops the last 6 pixels, a 21x21 grid (as SigLIP SO400M/14 at 384 px)
    from lightning_sp.models.vlm import LlavaSP

    cfg = compose(
        [
            *PAPER_GRID,
            "model.vision.image_size=300",
            "model.vision.hidden_size=32",
            "model.vision.intermediate_size=64",
            "model.llm.hidden_size=64",
            "projector.sp_width=16",
        ]
    )
    model = LlavaSP.from_config(cfg, tokenizer)
    assert model.vision.grid == 21 and model.vision(torch.zeros(1, 3, 300, 300)).shape == (1, 21 * 21, 32)
    with pytest.raises(ConfigError, match=r"model\.vision\.patch_size \(0\)"):
        compose(["model.vision.name_or_path=null", "model.vision.patch_size=0"])


def test_pretrained_encoder_grid_must_match_the_config(tmp_path):
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(
        image_size=224, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    ).save_pretrained(tmp_path / "clip")
    with pytest.raises(
        ConfigError,
        match=r"takes 224px images with patch 16 \(a 14x14 grid\).*"
        r"model\.vision\.image_size=336.*set model\.vision\.image_size=224 "
        r"model\.vision\.patch_size=16",
    ):
        compose(["model=llava7b", f"model.vision.name_or_path={tmp_path / 'clip'}"])
    cfg = compose(
        [
            "model=llava7b",
            f"model.vision.name_or_path={tmp_path / 'clip'}",
            "model.vision.image_size=224",
            "model.vision.patch_size=16",
        ]
    )
    assert cfg.model.vision.image_size == 224
    # not on disk (a hub id that is not cached): checked when the model loads, never downloaded here
    compose(["model=llava7b", "model.vision.name_or_path=nobody/not-a-cached-clip"])


def test_align_stage_refuses_lora():
    """Rule: stage.name=align trains the projector only, so stage.lora=true there is refused. LoRA *settings*
    (model.lora.*, optim.lr_lora) in a run without LoRA are only warned about: one override list often serves
    both stages (and the model presets set model.lora)."""
    assert compose(["stage=align"]).stage.lora is False
    with pytest.raises(ConfigError, match=r"stage\.lora=true with stage\.name=align.*Set stage\.lora=false"):
        compose(["stage=align", "stage.lora=true"])
    for model in group_choices("model"):
        assert compose([f"model={model}", "stage=align"]).stage.lora is False


def test_lora_settings_without_lora_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="lightning_sp.config"):
        compose(["stage=align", "model.lora.r=4", "optim.lr_lora=1e-4"])
    assert "model.lora.r, optim.lr_lora: no effect" in caplog.text and "stage align" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_sp.config"):
        compose(["stage=finetune", "model.lora.r=4"])
    assert "no effect" not in caplog.text


# ---- trainer.global_batch_size ---------------------------------------------------------------------------------


def test_global_batch_derives_accumulation_when_devices_are_known():
    cfg = compose(["data.batch_size=4", "trainer.global_batch_size=32"])  # trainer=cpu: 1 device
    assert cfg.trainer.accumulate_grad_batches == 8
    cfg = compose(["trainer=ddp_cpu", "data.batch_size=4", "trainer.global_batch_size=32"])  # 2 devices
    assert cfg.trainer.accumulate_grad_batches == 4
    assert compose(["data.batch_size=4", "trainer.global_batch_size=4"]).trainer.accumulate_grad_batches == 1


def test_global_batch_not_divisible_is_refused_with_the_numbers():
    with pytest.raises(
        ConfigError,
        match=r"trainer\.global_batch_size=100, but data\.batch_size 16 x trainer\.devices "
        r"1 x trainer\.accumulate_grad_batches 1 = 16: 100 is not a multiple of .* "
        r"data\.batch_size=10 \(with trainer\.accumulate_grad_batches=10\)",
    ):
        compose(["data.batch_size=16", "trainer.global_batch_size=100"])
    with pytest.raises(ConfigError, match=r"not a multiple of data\.batch_size x devices = 16 x 2 = 32"):
        compose(["trainer=ddp_cpu", "data.batch_size=16", "trainer.global_batch_size=48"])


def test_global_batch_and_explicit_accumulation_must_agree():
    # given on the command line, accumulate_grad_batches is the user's: checked, not re-derived
    with pytest.raises(ConfigError, match=r"accumulate_grad_batches 8 = 32: set trainer\.accumulate_grad_batches=16"):
        compose(["data.batch_size=4", "trainer.global_batch_size=64", "trainer.accumulate_grad_batches=8"])
    with pytest.raises(ConfigError, match=r"= 4: set trainer\.accumulate_grad_batches=16"):
        compose(["data.batch_size=4", "trainer.global_batch_size=64", "trainer.accumulate_grad_batches=1"])
    assert (
        compose(
            ["data.batch_size=4", "trainer.global_batch_size=64", "trainer.accumulate_grad_batches=16"]
        ).trainer.accumulate_grad_batches
        == 16
    )
    with pytest.raises(ConfigError, match=r"trainer\.global_batch_size must be >= 1"):
        compose(["trainer.global_batch_size=0"])


def test_global_batch_with_devices_resolved_at_launch():
    from lightning_sp.global_batch import check_global_batch

    cfg = compose(["trainer=gpu", "data.batch_size=16", "trainer.global_batch_size=128"])  # devices=-1
    assert cfg.trainer.accumulate_grad_batches == 1  # unknown device count: nothing derived at config time
    check_global_batch(cfg, 8)  # 16 x 8 x 1 = 128
    with pytest.raises(
        ConfigError,
        match=r"this launch gives data\.batch_size 16 x 4 devices x "
        r"trainer\.accumulate_grad_batches 1 = 64: set "
        r"trainer\.accumulate_grad_batches=2",
    ):
        check_global_batch(cfg, 4)
    with pytest.raises(
        ConfigError,
        match=r"not a multiple of data\.batch_size 24 x trainer\.accumulate_grad_batches 1"
        r" = 24, so no device count reaches it",
    ):
        compose(["trainer=gpu", "data.batch_size=24", "trainer.global_batch_size=128"])


@pytest.mark.parametrize("data, global_batch", [("lcs558k", 256), ("llava665k", 128)])
def test_recipe_data_presets_carry_their_global_batch(data, global_batch):
    on_gpus = compose([f"data={data}", "trainer=gpu"])
    assert on_gpus.trainer.global_batch_size == global_batch and on_gpus.trainer.accumulate_grad_batches == 1
    on_four = compose([f"data={data}", "trainer=gpu", "trainer.devices=4"])
    assert on_four.data.batch_size * 4 * on_four.trainer.accumulate_grad_batches == global_batch
    on_one = compose([f"data={data}"])  # trainer=cpu, 1 device
    assert on_one.data.batch_size * on_one.trainer.accumulate_grad_batches == global_batch


def test_train_checks_the_global_batch_once_the_world_size_is_known(tmp_path, monkeypatch):
    import lightning_sp.train as train_lib

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text('{"shards": [], "totals": {"samples": 0}}')

    class Stub:
        def __init__(self, *args, **kwargs):
            self.model = type("M", (), {"num_visual_tokens": 1})()
            self.tokenizer = None  # train() takes the datamodule's tokenizer from the module

    monkeypatch.setattr(train_lib, "LlavaSPModule", Stub)
    monkeypatch.setattr(train_lib, "build_datamodule", lambda *args: None)
    cfg = compose(
        [
            "data.synthetic=null",
            f"data.train_dir={shards}",
            "data.val_dir=null",
            "data.batch_size=4",
            "trainer.devices=auto",
            "trainer.global_batch_size=8",
            f"run_dir={tmp_path / 'run'}",
            "trainer.enable_progress_bar=false",
        ]
    )
    with pytest.raises(ConfigError, match=r"global_batch_size=8, but this launch gives data\.batch_size 4 x 1 devices"):
        train_lib.train(cfg)


# ---- missing data: refused before any model is built ----------------------------------------------------------


def test_missing_shards_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    import lightning_sp.train as train_lib

    built = []
    monkeypatch.setattr(train_lib, "LlavaSPModule", lambda *args: built.append(args))
    cfg = compose(["data=lcs558k", f"data.train_dir={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(
        ConfigError,
        match=rf"data\.train_dir={tmp_path / 'nope'} does not exist .*data\.synthetic is "
        rf"unset.*python -m lightning_sp convert --json .* --out {tmp_path / 'nope'}",
    ):
        train_lib.train(cfg)
    assert not built


def test_check_data_paths(tmp_path):
    from lightning_sp.data.checks import check_data_paths

    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    cfg = compose(["data.synthetic=null", f"data.train_dir={train_dir}", f"data.val_dir={val_dir}"])
    with pytest.raises(ConfigError, match=r"data\.train_dir=.* has no index\.json"):
        check_data_paths(cfg)
    (train_dir / "index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data\.val_dir=.* has no index\.json.*or set data\.val_dir=null"):
        check_data_paths(cfg)
    (val_dir / "index.json").write_text("{}")
    check_data_paths(cfg)
    check_data_paths(compose(["data.synthetic=null", f"data.train_dir={train_dir}", "data.val_dir=null"]))
    # saved configs of finished runs still load when their data is gone: the check is train()'s, not validate's
    save(cfg, tmp_path / "config.yaml")
    (train_dir / "index.json").unlink()
    load_saved(tmp_path / "config.yaml")


def test_dtype_names_are_checked_in_one_place_naming_the_key():
    from lightning_sp.dtypes import dtype_named

    assert dtype_named("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match="model.llm.dtype must be float32, bfloat16, float16, got 'float64'"):
        compose(["model.llm.dtype=float64"])
    with pytest.raises(ConfigError, match="dtype must be float32, bfloat16, float16, got 'fp8'"):
        from lightning_sp.inference import load_for_inference

        load_for_inference("no/such/run", dtype="fp8")  # refused before anything is read


@pytest.mark.parametrize(
    "command, module, options",
    [
        ("eval", "evaluate", "EvalOptions"),
        ("export", "export", "ExportOptions"),
        ("generate", "generate", "GenerateOptions"),
    ],
)
def test_run_commands_help_gives_their_own_usage_not_group_selections(command, module, options, capsys):
    """eval/export/generate work on a trained run and refuse `variant=pooling` / `experiment=`: their --help must
    name the keys they take (every required field of their options dataclass), not train's group selections."""
    import dataclasses
    import importlib
    import re

    from lightning_sp.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    usage = " ".join(text.split("positional arguments:")[1].split("options:")[0].split())
    assert "variant=pooling" not in usage and "experiment=NAME" not in usage, usage
    cls = getattr(importlib.import_module(f"lightning_sp.{module}"), options)
    fields = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING or f.default == "???"}
    named = set(re.findall(r"(?<![\w.])([a-z_]+)=", usage)) - {"group", "experiment"}  # the refused ones
    assert required and required <= named <= fields, (required, named, fields)
    # and the command does refuse what train's help offers
    assert main([command, "ckpt=no/such/run", "variant=pooling"]) == 2
    assert "selects a config group" in capsys.readouterr().err
