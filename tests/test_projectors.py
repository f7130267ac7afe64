"""Projectors against an independent nn.Conv2d / nn.AdaptiveAvgPool2d restatement of docs/METHOD.md §2."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lightning_sp.models.projectors import PROJECTORS, ProjectorConfigError, build_projector
from lightning_sp.models.projectors.spatial import scaled_sides

C, D, H, G = 16, 8, 24, 24


def proj_cfg(name, dfi=True, head_bias=None, sp_width=D, sides=None, dfi_kv_tokens=25):
    return OmegaConf.create(
        {
            "name": name,
            "sp_width": sp_width,
            "dfi": dfi,
            "head_bias": head_bias,
            "sides": sides,
            "dfi_kv_tokens": dfi_kv_tokens,
        }
    )


def reference_forward(proj, z, mode, dfi):
    """Straight-line §2 with torch's own Conv2d/AdaptiveAvgPool2d modules, sharing the projector's weights."""
    b = z.shape[0]
    zmap = z.transpose(1, 2).reshape(b, C, G, G)
    windows = [(10, 14), (8, 16), (6, 18), (4, 20), (2, 22), (0, 24)]
    tokens = []
    for (lo, hi), w in zip(windows, proj.sfe.weights):
        k = hi - lo
        conv = nn.Conv2d(C, D, k, bias=False).double()
        conv.weight.data.copy_(w.data)
        if mode == "cropping":
            x = zmap[:, :, lo:hi, lo:hi]
        else:
            x = zmap if k == 24 else nn.AdaptiveAvgPool2d(k)(zmap)
        tokens.append(conv(x).reshape(b, D))
    sp = torch.stack(tokens, 1)
    if dfi:
        kv_conv = nn.Conv2d(C, D, 16, stride=2, bias=False).double()
        kv_conv.weight.data.copy_(proj.dfi.kv_weight.data)
        kv = kv_conv(zmap).flatten(2).transpose(1, 2)
        assert kv.shape[1] == 25
        q = proj.dfi.query(sp)
        k_ = proj.dfi.key(kv)
        v = proj.dfi.value(kv)
        a = (q @ k_.transpose(1, 2) / math.sqrt(D)).softmax(-1)
        sp = torch.cat([sp, a @ v], -1)
    sp_out = proj.spatial_head[1](F.gelu(sp))
    patch_out = proj.patch_head[2](F.gelu(proj.patch_head[0](z)))
    return torch.cat([sp_out, patch_out], 1)


@pytest.mark.parametrize("mode", ["pooling", "cropping"])
@pytest.mark.parametrize("dfi", [True, False])
def test_spatial_projector_matches_conv2d_reference(mode, dfi):
    torch.manual_seed(0)
    proj = build_projector(proj_cfg(mode, dfi=dfi), vision_width=C, llm_width=H, grid=G).double()
    z = torch.randn(3, G * G, C, dtype=torch.float64)
    out = proj(z)
    assert out.shape == (3, 6 + 576, H)
    torch.testing.assert_close(out, reference_forward(proj, z, mode, dfi), rtol=1e-10, atol=1e-10)
    if dfi:
        assert proj.last_attention.shape == (3, 6, 25)
        torch.testing.assert_close(proj.last_attention.sum(-1), torch.ones(3, 6, dtype=torch.float64))


def test_mlp_projector_is_mlp2x_gelu():
    torch.manual_seed(0)
    proj = build_projector(proj_cfg("mlp"), vision_width=C, llm_width=H, grid=G)
    z = torch.randn(2, G * G, C)
    expected = F.linear(
        F.gelu(F.linear(z, proj.patch_head[0].weight, proj.patch_head[0].bias)),
        proj.patch_head[2].weight,
        proj.patch_head[2].bias,
    )
    torch.testing.assert_close(proj(z), expected)
    assert proj.layout.num_sp_tokens == 0 and proj.layout.num_tokens == 576


@pytest.mark.parametrize(
    "name,dfi,bias",
    [("pooling", True, False), ("cropping", True, True), ("pooling", False, False), ("cropping", False, False)],
)
def test_parameter_counts_and_head_bias_follow_the_release(name, dfi, bias):
    proj = build_projector(proj_cfg(name, dfi=dfi), vision_width=C, llm_width=H, grid=G)
    sfe = sum(C * D * s * s for s in (4, 8, 12, 16, 20, 24))
    dfi_params = (C * D * 16 * 16 + 3 * (2 * D + D * D + D)) if dfi else 0
    head = (2 * D if dfi else D) * H + (H if bias else 0)
    w_p = C * H + H + H * H + H
    assert sum(p.numel() for p in proj.parameters()) == sfe + dfi_params + head + w_p
    assert (proj.spatial_head[1].bias is not None) == bias
    assert proj.layout.num_sp_tokens == 6 and proj.layout.patch_grid == (24, 24)


def test_paper_shape_parameter_count():
    """At C=1024, D=512 the SP part is ~0.90 B parameters and the 24x24 conv alone 302 M (docs/METHOD.md §2)."""
    with torch.device("meta"):  # shapes only: 3.6 GB of real weights would be slow to initialise
        proj = build_projector(proj_cfg("pooling", sp_width=512), vision_width=1024, llm_width=8, grid=24)
    assert proj.sfe.weights[-1].numel() == 301_989_888
    sp = sum(p.numel() for n, p in proj.named_parameters() if not n.startswith(("patch_head", "spatial_head")))
    assert 0.89e9 < sp < 0.91e9


def test_cropping_boxes_are_the_papers_windows():
    proj = build_projector(proj_cfg("cropping"), vision_width=C, llm_width=H, grid=G)
    assert proj.sp_boxes() == [
        (10, 10, 14, 14),
        (8, 8, 16, 16),
        (6, 6, 18, 18),
        (4, 4, 20, 20),
        (2, 2, 22, 22),
        (0, 0, 24, 24),
    ]


def test_grid_too_small_is_refused_at_config_time():
    assert scaled_sides(24) == [4, 8, 12, 16, 20, 24]
    with pytest.raises(ProjectorConfigError, match="grid"):
        PROJECTORS["pooling"].check_config(proj_cfg("pooling"), grid=4)


def test_gradients_reach_every_projector_parameter():
    for name in ("pooling", "cropping", "mlp"):
        proj = build_projector(proj_cfg(name), vision_width=C, llm_width=H, grid=G)
        proj(torch.randn(2, G * G, C)).square().mean().backward()
        for pname, p in proj.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


@pytest.mark.parametrize("sides,count", [([24], 1), ([8, 16, 24], 3), (list(range(2, 25, 2)), 12)])
@pytest.mark.parametrize("mode", ["pooling", "cropping"])
def test_sp_token_count_arms(mode, sides, count):
    proj = build_projector(proj_cfg(mode, sides=sides), vision_width=C, llm_width=H, grid=G)
    assert proj.layout.num_sp_tokens == count
    assert proj(torch.randn(2, G * G, C)).shape == (2, count + 576, H)
    assert [w.shape[-1] for w in proj.sfe.weights] == sides


def test_dfi_with_49_kv_tokens_matches_a_conv_k12_s2():
    torch.manual_seed(0)
    proj = build_projector(proj_cfg("pooling", dfi_kv_tokens=49), vision_width=C, llm_width=H, grid=G).double()
    assert proj.dfi.kernel == 12
    zmap = torch.randn(2, C, G, G, dtype=torch.float64)
    expected = F.conv2d(zmap, proj.dfi.kv_weight, stride=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj.dfi.kv_tokens(zmap), expected)
    proj(torch.randn(2, G * G, C, dtype=torch.float64))
    assert proj.last_attention.shape == (2, 6, 49)


def test_bad_arm_options_are_refused():
    with pytest.raises(ProjectorConfigError, match="dfi_kv_tokens"):
        PROJECTORS["pooling"].check_config(proj_cfg("pooling", dfi_kv_tokens=30), grid=24)
    with pytest.raises(ProjectorConfigError, match="sides"):
        PROJECTORS["cropping"].check_config(proj_cfg("cropping", sides=[4, 30]), grid=24)


# ---- the options contract, and an arm added from outside the package ------------------------------------------


def test_the_schema_is_the_union_of_the_arms_options_with_their_defaults():
    from dataclasses import MISSING, fields

    from lightning_sp.schema import ProjectorConfig

    schema = {f.name: f.default for f in fields(ProjectorConfig) if f.name != "name"}
    declared = {}
    for name, cls in PROJECTORS.items():
        for f in fields(cls.Options):
            assert f.name in schema, f"{name} declares projector.{f.name}, which the config schema lacks"
            assert f.default is not MISSING and f.default == schema[f.name], (name, f.name)
            declared[f.name] = f.default
    assert declared.keys() == schema.keys()  # no schema key that no arm reads


def test_each_projector_is_handed_only_its_own_options():
    from lightning_sp.models.projectors import ProjectorOptions, SpatialOptions, projector_options
    from lightning_sp.models.projectors.baselines import WindowTransformerOptions

    cfg = {**proj_cfg("mlp"), "extractor_layers": 2, "extractor_heads": 4}
    assert projector_options(OmegaConf.create(cfg))[1] == ProjectorOptions()
    cls, options = projector_options(OmegaConf.create({**cfg, "name": "pooling", "sides": [4, 24]}))
    assert options == SpatialOptions(sp_width=D, dfi=True, dfi_kv_tokens=25, sides=[4, 24], head_bias=None)
    assert type(options.sides) is list  # a plain list, not an OmegaConf node
    assert (
        not hasattr(options, "extractor_layers")
        and type(build_projector(OmegaConf.create(cfg), C, H, G)) is (PROJECTORS["mlp"])
    )
    assert projector_options(OmegaConf.create({**cfg, "name": "cropping_transformer"}))[1] == WindowTransformerOptions(
        sp_width=D, dfi=True, dfi_kv_tokens=25, sides=None, head_bias=None, extractor_layers=2, extractor_heads=4
    )


def test_a_projector_override_the_arm_does_not_read_is_reported(caplog):
    from lightning_sp.config import compose

    with caplog.at_level("WARNING", logger="lightning_sp.config"):
        compose(["variant=mlp", "projector.sp_width=128", "projector.dfi=false"])
    assert "projector.dfi, projector.sp_width: no effect in this run: projector 'mlp'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_sp.config"):
        compose(["variant=pooling", "projector.sp_width=32", "projector.extractor_layers=2"])
    assert "projector.extractor_layers: no effect in this run: projector 'pooling' reads only" in caplog.text
    assert "projector.sp_width" not in caplog.text.split("reads only")[0]


@pytest.fixture
def row_tokens():
    """An arm written outside the package: one SP token per patch-grid row (the row's mean feature through its own
    W_s, scaled by a key of its own, `projector.row_scale`), before W_p's patch tokens; it also reads a shared key
    (head_bias)."""
    from dataclasses import dataclass
    from typing import Optional

    from lightning_sp.models.projectors import Projector, ProjectorOptions, TokenLayout, register
    from lightning_sp.models.projectors.mlp import patch_head

    @dataclass(frozen=True)
    class RowOptions(ProjectorOptions):
        head_bias: Optional[bool] = None
        row_scale: float = 1.0  # a key no shipped arm has

    class RowTokens(Projector):
        Options = RowOptions

        def __init__(self, opts, vision_width, llm_width, grid):
            super().__init__()
            self.grid, self.row_scale = grid, opts.row_scale
            self.layout = TokenLayout(num_sp_tokens=grid, patch_grid=(grid, grid))
            self.row_head = nn.Linear(vision_width, llm_width, bias=bool(opts.head_bias))
            self.patch_head = patch_head(vision_width, llm_width)

        def forward(self, patches):
            rows = patches.unflatten(1, (self.grid, self.grid)).mean(2)  # (B, G, C)
            return torch.cat([self.row_scale * self.row_head(rows), self.patch_head(patches)], dim=1)

    register("test_row_tokens")(RowTokens)
    yield RowTokens
    PROJECTORS.pop("test_row_tokens")


@pytest.mark.slow
def test_a_projector_added_from_outside_is_one_class_and_one_yaml(row_tokens, tmp_path, tokenizer, one_thread):
    import math

    from evalkit import NARROW, few_step_fit

    from lightning_sp.config import compose
    from lightning_sp.module import LlavaSPModule
    from lightning_sp.train import train

    preset = tmp_path / "row_tokens.yaml"
    preset.write_text("projector: {name: test_row_tokens, head_bias: true, row_scale: 0.5}\n")
    cfg = compose([*NARROW, *few_step_fit(tmp_path)], config_files=[str(preset)])
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"]) and metrics["global_step"] == 3
    module = LlavaSPModule(cfg, tokenizer)
    projector = module.model.projector
    assert isinstance(projector, row_tokens) and projector.row_head.bias is not None
    assert cfg.projector.row_scale == 0.5 and projector.row_scale == 0.5  # its own key reached it
    assert module.model.num_visual_tokens == 12 + 144  # 12 row tokens + the 12x12 patch grid
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any("row_head" in k for k in trained)  # its own parameters train and are saved


def test_a_plug_ins_own_key_is_a_config_key_only_while_it_is_registered(row_tokens):
    from lightning_sp.config import ConfigError, compose
    from lightning_sp.options_help import run_options_help

    cfg = compose(["variant=mlp", "projector.name=test_row_tokens", "projector.row_scale=0.25"])
    assert cfg.projector.row_scale == 0.25
    listed = {line.split()[0]: line for line in run_options_help().splitlines() if line.startswith("  ")}
    assert listed["projector.row_scale"].split()[1] == "1.0"  # --help lists its key, with its default
    assert "D, width of the SP branch" in listed["projector.sp_width"]  # shipped keys keep their meanings
    with pytest.raises(ConfigError, match="bad value for config key 'projector.row_scale'"):
        compose(["projector.name=test_row_tokens", "projector.row_scale=many"])  # typed like every key
    PROJECTORS.pop("test_row_tokens")
    try:
        with pytest.raises(ConfigError, match="unknown config key 'projector.row_scale'"):
            compose(["projector.row_scale=0.25"])
    finally:
        PROJECTORS["test_row_tokens"] = row_tokens


def test_a_plug_in_may_not_redefine_a_keys_default_or_leave_one_out():
    from dataclasses import dataclass

    from lightning_sp.config import ConfigError, compose
    from lightning_sp.models.projectors import Projector, ProjectorOptions, register

    @dataclass(frozen=True)
    class WideOptions(ProjectorOptions):
        sp_width: int = 1024  # the shipped arms' key, another default

    @dataclass(frozen=True)
    class BareOptions(ProjectorOptions):
        gain: float  # no default

    for name, options, message in (
        ("test_wide", WideOptions, "projector.sp_width: .*WideOptions declares default 1024, but .* default 512"),
        ("test_bare", BareOptions, "BareOptions.gain has no default"),
    ):
        register(name)(type(name, (Projector,), {"Options": options}))
        try:
            with pytest.raises(ConfigError, match=message):
                compose(["variant=mlp"])
        finally:
            PROJECTORS.pop(name)
