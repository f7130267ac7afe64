"""Every ablation arm (docs/METHOD.md §5) is a registered projector selected by a variant YAML alone.

Each arm: its YAML composes, it builds at tiny widths, its token count is §5's, its parameter count is the
hand-computed one, its numbers equal an independent torch restatement, every parameter trains, bad grids are
refused at config time with a message that says why.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lightning_sp.config import ConfigError, compose, group_choices
from lightning_sp.models.official import OfficialCheckpointError, official_state_dict
from lightning_sp.models.projectors import PROJECTORS, ProjectorConfigError, build_projector

C, D, H, G = 16, 8, 24, 24
PAPER_WINDOWS = [(10, 14), (8, 16), (6, 18), (4, 20), (2, 22), (0, 24)]  # crops of sides 4..24 at grid 24
W_P = C * H + H + H * H + H  # mlp2x_gelu


def dfi_params(kernel=16):
    return C * D * kernel**2 + 3 * (2 * D + D * D + D)  # K/V conv + 3 x (LayerNorm + Linear)


# SP tokens of every variant at grid 24 (§5: 1, 3, 6, 12 SP tokens; 49 conv tokens for the control).
SP_TOKENS = {
    "mlp": 0,
    "pooling": 6,
    "cropping": 6,
    "pooling_nodfi": 6,
    "cropping_nodfi": 6,
    "pooling_dfi49": 6,
    "cropping_dfi49": 6,
    "pooling_sp1": 1,
    "pooling_sp3": 3,
    "pooling_sp12": 12,
    "cropping_sp1": 1,
    "cropping_sp3": 3,
    "cropping_sp12": 12,
    "cropping_transformer": 6,
    "cropping_stacked": 6,
    "pooling_stacked": 6,
    "conv49": 49,
    "learned_queries": 6,
    "official_sp1": 1,
    "official_sp3": 3,
    "official_sp12": 12,
    "official_transformer": 6,
    "official_stacked": 6,
}
# Parameters invariant by construction: a bias on the DFI keys shifts all logits of a query equally (softmax
# ignores it), so its gradient is zero up to rounding.
SOFTMAX_SHIFT_INVARIANT = ("dfi.key.0.bias", "dfi.key.1.bias")
# The official transformer arm's decoder starts from a zero query (as released): in its first layer the bias-free
# pre-norms of the self-attention and of the cross-attention's query see zeros, and the self-attention (one token)
# outputs zeros, so these get no gradient at initialisation (the query itself, and every later layer, do).
ZERO_QUERY_INVARIANT = tuple(
    f"decoder.layers.0.{n}"
    for n in ("norm1.weight", "self_attn.in_proj_weight", "self_attn.out_proj.weight", "norm2.weight")
)


pytestmark = pytest.mark.usefixtures("one_thread")
PAPER_GRID = ["model.vision.name_or_path=null", "model.vision.patch_size=14"]  # a random 24x24-grid encoder


@functools.lru_cache(maxsize=None)
def composed(variant):
    return compose([f"variant={variant}", f"projector.sp_width={D}", *PAPER_GRID])


def proj_cfg(name, **kw):
    base = {
        "name": name,
        "sp_width": D,
        "dfi": True,
        "dfi_kv_tokens": 25,
        "sides": None,
        "head_bias": None,
        "extractor_layers": 1,
        "extractor_heads": 8,
    }
    return OmegaConf.create({**base, **kw})


def build(name, grid=G, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return build_projector(proj_cfg(name, **kw), vision_width=C, llm_width=H, grid=grid).to(dtype)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- every variant YAML and every registered projector ---------------------------------------------------------


@pytest.mark.parametrize("variant", group_choices("variant"))
def test_every_variant_composes_builds_and_trains(variant):
    cfg = composed(variant)
    assert cfg.choices.variant == variant
    torch.manual_seed(0)
    proj = build_projector(cfg.projector, vision_width=C, llm_width=H, grid=G)
    out = proj(torch.randn(2, G * G, C))
    assert out.shape == (2, proj.layout.num_tokens, H)
    assert proj.layout.patch_grid == (G, G)
    if variant in SP_TOKENS:
        assert proj.layout.num_sp_tokens == SP_TOKENS[variant]
        assert proj.layout.num_tokens == SP_TOKENS[variant] + 576
    if cfg.projector.dfi and proj.layout.num_sp_tokens and getattr(proj, "dfi", None) is not None:
        assert proj.last_attention.shape == (2, proj.layout.num_sp_tokens, cfg.projector.dfi_kv_tokens)
    boxes = proj.sp_boxes()
    assert boxes == [] or len(boxes) == proj.layout.num_sp_tokens
    out.square().mean().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None, f"{variant}: {name} is not in the graph"
        if not name.endswith(SOFTMAX_SHIFT_INVARIANT + ZERO_QUERY_INVARIANT):
            assert p.grad.abs().sum() > 0, f"{variant}: zero gradient for {name}"


def test_token_count_table_names_existing_variants():
    assert set(SP_TOKENS) <= set(group_choices("variant"))


def test_every_registered_projector_has_a_variant_yaml():
    """ "A new arm = one class + one YAML": every registry name is selectable by `variant=` alone."""
    selected = {composed(v).projector.name for v in group_choices("variant")}
    assert set(PROJECTORS) <= selected, f"no conf/variant/*.yaml selects {sorted(set(PROJECTORS) - selected)}"


@pytest.mark.parametrize("name", ["cropping_transformer", "cropping_stacked", "pooling_stacked", "learned_queries"])
def test_new_spatial_arms_have_no_official_layout(name):
    proj = build(name)
    for variant in ("pooling", "cropping"):
        with pytest.raises(OfficialCheckpointError):
            official_state_dict(proj, variant)


# ---- the official code's SP-count arms --------------------------------------------------------------------------

OFFICIAL_SIDES = {"official_sp1": [24], "official_sp3": [8, 16, 24], "official_sp12": list(range(2, 25, 2))}


def official_count_arm(proj, z, sides):
    """The official 1/3/12-token arm restated (docs/METHOD.md §8): per side s, one Conv2d(C -> D, kernel s, no bias)
    over the grid's centred s x s crop gives one token; no DFI; GELU and an unbiased Linear(D -> H) head; the
    patches through mlp2x_gelu after them."""
    b = z.shape[0]
    zmap = z.transpose(1, 2).reshape(b, C, G, G)
    tokens = []
    for s, w in zip(sides, proj.sfe.weights):
        lo = (G - s) // 2
        conv = nn.Conv2d(C, D, s, bias=False).double()
        conv.weight.data.copy_(w.data)
        tokens.append(conv(zmap[:, :, lo : lo + s, lo : lo + s]).reshape(b, D))
    head = nn.Linear(D, H, bias=False).double()
    head.weight.data.copy_(proj.spatial_head[1].weight.data)
    patches = proj.patch_head[2](F.gelu(proj.patch_head[0](z)))
    return torch.cat([head(F.gelu(torch.stack(tokens, 1))), patches], 1)


@pytest.mark.parametrize("variant", sorted(OFFICIAL_SIDES))
def test_official_count_arms_equal_their_restatement(variant):
    cfg = composed(variant)
    torch.manual_seed(0)
    proj = build_projector(cfg.projector, vision_width=C, llm_width=H, grid=G).double()
    assert getattr(proj, "dfi", None) is None and proj.spatial_head[1].bias is None
    z = torch.randn(2, G * G, C, dtype=torch.float64)
    torch.testing.assert_close(proj(z), official_count_arm(proj, z, OFFICIAL_SIDES[variant]), rtol=1e-10, atol=1e-10)
    n = len(OFFICIAL_SIDES[variant])
    assert n_params(proj) == sum(C * D * s * s for s in OFFICIAL_SIDES[variant]) + D * H + W_P
    # ours of the same count is a different arm: the released SFE + DFI, and a biased head
    ours = build_projector(composed(f"cropping_sp{n}").projector, vision_width=C, llm_width=H, grid=G)
    assert ours.dfi is not None and ours.spatial_head[1].bias is not None


# ---- the official code's transformer and stacked-conv arms -----------------------------------------------------

PAPER_CROPS = {4: (10, 14), 8: (8, 16), 12: (6, 18), 16: (4, 20), 20: (2, 22), 24: (0, 24)}
# The official conv stacks as released (kernel, output channels as "C" = 1024 / "D" = 512 at 7B), written out here
# independently of lightning_sp.models.projectors.official_arms.OFFICIAL_STACKS.
RELEASED_STACKS = {
    4: "3D 2D",
    8: "5D 3D 2D",
    12: "5C 3D 5D 2D",
    16: "5C 3C 5D 3D 3D 2D",
    20: "5C 5C 3C 5D 3D 3D 2D",
    24: "5C 5C 5C 3D 5D 3D 3D 2D",
}


def official_head(proj, tokens):
    head = nn.Linear(tokens.shape[-1], H, bias=False).to(tokens.dtype)
    head.weight.data.copy_(proj.spatial_head[1].weight.data)
    patches = proj.patch_head[2](F.gelu(proj.patch_head[0](_last_z)))
    return torch.cat([head(F.gelu(tokens)), patches], 1)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # nn.Transformer's, for the reference below
def test_official_transformer_arm_equals_its_restatement():
    """Per crop: nn.Transformer(d_model=C, 8 heads, 4 + 4 layers, FFN C, dropout 0.1, pre-norm, no bias) over the
    crop's patches (row-major) with a zero query as target; GELU + unbiased Linear(C -> H); no DFI."""
    global _last_z
    torch.manual_seed(0)
    proj = build_projector(composed("official_transformer").projector, vision_width=C, llm_width=H, grid=G).eval()
    assert getattr(proj, "dfi", None) is None and proj.spatial_head[1].in_features == C
    assert torch.equal(proj.sfe.queries, torch.zeros(6, C))  # zero-initialised, as released
    _last_z = z = torch.randn(2, G * G, C)
    zmap = z.transpose(1, 2).reshape(2, C, G, G)
    tokens = []
    for i, side in enumerate(sorted(PAPER_CROPS)):
        ref = nn.Transformer(
            d_model=C,
            nhead=8,
            num_encoder_layers=4,
            num_decoder_layers=4,
            dim_feedforward=C,
            dropout=0.1,
            batch_first=True,
            norm_first=True,
            bias=False,
        ).eval()
        ref.load_state_dict(proj.sfe.transformers[i].state_dict())
        lo, hi = PAPER_CROPS[side]
        src = zmap[:, :, lo:hi, lo:hi].permute(0, 2, 3, 1).reshape(2, side * side, C)
        tokens.append(ref(src, proj.sfe.queries[i].expand(2, 1, C))[:, 0])
    torch.testing.assert_close(proj(z), official_head(proj, torch.stack(tokens, 1)), rtol=1e-5, atol=1e-5)
    per_transformer = n_params(proj.sfe.transformers[0])
    # encoder layer: attention 4C^2 + FFN 2C^2 + 2 LayerNorms (weights only); decoder layer: 2 attentions; + 2 norms
    assert per_transformer == 4 * (6 * C * C + 2 * C) + 4 * (10 * C * C + 3 * C) + 2 * C
    assert n_params(proj) == 6 * per_transformer + 6 * C + C * H + W_P
    proj.train()
    assert proj(z).shape == (2, 582, H)  # dropout 0.1 in training, as released


@pytest.mark.parametrize("training", [False, True])
def test_official_stacked_arm_equals_its_restatement(training):
    """Per crop: the released Conv2d (no bias) + BatchNorm2d chain down to 1x1, no activation; GELU + unbiased
    Linear(D -> H); no DFI. In training BatchNorm uses the batch's statistics, in eval its running ones."""
    global _last_z
    torch.manual_seed(0)
    proj = build_projector(composed("official_stacked").projector, vision_width=C, llm_width=H, grid=G)
    proj.train(training)
    for module in proj.modules():  # non-trivial BatchNorm state, so that eval mode is checked too
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    _last_z = z = torch.randn(3, G * G, C)
    zmap = z.transpose(1, 2).reshape(3, C, G, G)
    tokens = []
    for i, side in enumerate(sorted(PAPER_CROPS)):
        layers, width = [], C
        for spec in RELEASED_STACKS[side].split():
            out = C if spec[1] == "C" else D
            layers += [nn.Conv2d(width, out, int(spec[0]), bias=False), nn.BatchNorm2d(out)]
            width = out
        ref = nn.Sequential(*layers).train(training)
        ref.load_state_dict(proj.sfe.stacks[i].state_dict())
        lo, hi = PAPER_CROPS[side]
        tokens.append(ref(zmap[:, :, lo:hi, lo:hi]).reshape(3, D))
    torch.testing.assert_close(proj(z), official_head(proj, torch.stack(tokens, 1)), rtol=1e-5, atol=1e-5)


def test_official_arms_refuse_what_they_cannot_be():
    with pytest.raises(ConfigError, match="official_stacked' has the official conv stacks .* 12x12 grid"):
        compose(["variant=official_stacked"])  # the embedded default's 12x12 grid
    with pytest.raises(ConfigError, match="official SFE-only arm: projector.dfi and projector.head_bias"):
        compose(["variant=official_transformer", "projector.dfi=true"])
    assert compose(["variant=official_transformer"]).projector.name == "official_transformer"  # any grid


# ---- conv49 ----------------------------------------------------------------------------------------------------


def test_conv49_tokens_equal_a_strided_conv2d():
    proj = build("conv49", dfi=False, dtype=torch.float64)
    z = torch.randn(2, G * G, C, dtype=torch.float64)
    zmap = z.transpose(1, 2).reshape(2, C, G, G)
    conv = F.conv2d(zmap, proj.conv_tokens.weight, stride=2)  # weight (D, C, 12, 12)
    assert proj.conv_tokens.weight.shape == (D, C, 12, 12) and conv.shape == (2, D, 7, 7)
    tokens = conv.flatten(2).transpose(1, 2)  # row-major 7x7
    torch.testing.assert_close(proj.conv_tokens(zmap), tokens)
    head = proj.spatial_head[1]
    expected = torch.cat([F.linear(F.gelu(tokens), head.weight, head.bias), proj.patch_head(z)], dim=1)
    torch.testing.assert_close(proj(z), expected)
    assert proj.layout.num_sp_tokens == 49 and proj.layout.num_tokens == 49 + 576
    assert proj.last_attention is None


def test_conv49_parameter_count_and_boxes():
    proj = build("conv49", dfi=False)
    assert n_params(proj) == C * D * 12 * 12 + D * H + W_P  # conv (no bias) + unbiased Linear(D, H) + W_p
    assert n_params(build("conv49", dfi=False, head_bias=True)) == n_params(proj) + H
    boxes = proj.sp_boxes()
    assert len(boxes) == 49 and boxes[0] == (0, 0, 12, 12) and boxes[1] == (0, 2, 0 + 12, 14)
    assert boxes[7] == (2, 0, 14, 12) and boxes[-1] == (12, 12, 24, 24)


@pytest.mark.parametrize("grid,kernel", [(13, 1), (16, 4), (30, 18)])
def test_conv49_keeps_49_tokens_on_other_grids(grid, kernel):
    proj = build("conv49", grid=grid, dfi=False)
    assert proj.conv_tokens.kernel == kernel and len(proj.sp_boxes()) == 49
    zmap = torch.randn(1, C, grid, grid)
    torch.testing.assert_close(
        proj.conv_tokens(zmap), F.conv2d(zmap, proj.conv_tokens.weight, stride=2).flatten(2).transpose(1, 2)
    )
    assert proj(torch.randn(1, grid * grid, C)).shape == (1, 49 + grid * grid, H)


def test_conv49_refuses_what_it_cannot_honour():
    with pytest.raises(ProjectorConfigError, match=r"at least 13x13.*got 12x12"):
        PROJECTORS["conv49"].check_config(proj_cfg("conv49", dfi=False), grid=12)
    with pytest.raises(ProjectorConfigError, match=r"projector\.dfi=false"):
        PROJECTORS["conv49"].check_config(proj_cfg("conv49", dfi=True), grid=24)
    with pytest.raises(ProjectorConfigError, match=r"projector\.sides"):
        PROJECTORS["conv49"].check_config(proj_cfg("conv49", dfi=False, sides=[24]), grid=24)
    with pytest.raises(ConfigError, match="13x13"):
        compose(["variant=conv49", *PAPER_GRID, "model.vision.image_size=168"])  # 12x12 grid


# ---- stacked small convs ---------------------------------------------------------------------------------------


def stacked_reference(proj, zmap, mode):
    """nn.Conv2d(C, D, 4, s=4) -> GELU -> nn.Conv2d(D, D, side/4) per window, sharing the projector's weights."""
    b = zmap.shape[0]
    tokens = []
    for (lo, hi), reduce, merge in zip(PAPER_WINDOWS, proj.sfe.reduce, proj.sfe.merge):
        side = hi - lo
        conv1 = nn.Conv2d(C, D, 4, stride=4).double()
        conv1.load_state_dict(reduce.state_dict())
        conv2 = nn.Conv2d(D, D, side // 4, bias=False).double()
        conv2.weight.data.copy_(merge.data)
        if mode == "cropping":
            x = zmap[:, :, lo:hi, lo:hi]
        else:
            x = zmap if side == G else nn.AdaptiveAvgPool2d(side)(zmap)
        tokens.append(conv2(F.gelu(conv1(x))).reshape(b, D))
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("mode", ["cropping", "pooling"])
def test_stacked_equals_an_nn_conv2d_chain(mode):
    proj = build(f"{mode}_stacked", dfi=False, dtype=torch.float64)
    z = torch.randn(2, G * G, C, dtype=torch.float64)
    zmap = z.transpose(1, 2).reshape(2, C, G, G)
    sp = stacked_reference(proj, zmap, mode)
    torch.testing.assert_close(proj.sfe(zmap), sp, rtol=1e-10, atol=1e-10)
    expected = torch.cat([proj.spatial_head[1](F.gelu(sp)), proj.patch_head(z)], dim=1)
    torch.testing.assert_close(proj(z), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode,head_bias", [("cropping", True), ("pooling", False)])
@pytest.mark.parametrize("dfi", [True, False])
def test_stacked_parameter_count(mode, head_bias, dfi):
    proj = build(f"{mode}_stacked", dfi=dfi)
    sfe = sum(C * D * 4 * 4 + D + D * D * (s // 4) ** 2 for s in (4, 8, 12, 16, 20, 24))
    head = (2 * D if dfi else D) * H + (H if head_bias and dfi else 0)  # the family's released head-bias rule
    assert n_params(proj) == sfe + (dfi_params() if dfi else 0) + head + W_P
    assert n_params(proj.sfe) == sfe


def test_stacked_refuses_sides_not_divisible_by_4():
    for name in ("pooling_stacked", "cropping_stacked"):
        with pytest.raises(ProjectorConfigError, match=r"multiple of 4.*\[3, 7, 10, 13, 17, 20\]"):
            PROJECTORS[name].check_config(proj_cfg(name), grid=20)
    with pytest.raises(ProjectorConfigError, match=r"multiple of 4.*\[2, 6, 10"):
        PROJECTORS["cropping_stacked"].check_config(proj_cfg("cropping_stacked", sides=list(range(2, 25, 2))), 24)
    with pytest.raises(ConfigError, match="multiple of 4"):
        compose(["variant=pooling_stacked", *PAPER_GRID, "model.vision.image_size=280"])  # 20x20 grid
    proj = build("pooling_stacked", grid=48, dfi=False)  # sides 8..48: all fine
    assert proj(torch.randn(1, 48 * 48, C)).shape == (1, 6 + 48 * 48, H)


# ---- transformer extractor -------------------------------------------------------------------------------------


def transformer_params(s=6, layers=1, grid=G):
    layer = 3 * D * D + 3 * D + D * D + D + 2 * (D * 4 * D) + 4 * D + D + 4 * D  # attn, out, FFN, 2 LayerNorms
    return C * D + D + grid * grid * D + s * D + layers * layer  # embed + positions + queries + layers


@pytest.mark.parametrize("dfi", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_transformer_parameter_count(dfi, layers):
    proj = build("cropping_transformer", dfi=dfi, extractor_layers=layers)
    assert transformer_params(layers=layers) == 12 * D * D * layers + 13 * D * layers + C * D + D + 582 * D
    head = (2 * D + 1) * H if dfi else D * H  # cropping: W_s biased with DFI
    assert n_params(proj) == transformer_params(layers=layers) + (dfi_params() if dfi else 0) + head + W_P


def test_transformer_token_is_the_query_output_over_its_crop():
    proj = build("cropping_transformer", dfi=False, dtype=torch.float64)
    z = torch.randn(2, G * G, C, dtype=torch.float64)
    sfe = proj.sfe
    x = (sfe.embed(z) + sfe.position).reshape(2, G, G, D)
    expected = []
    for i, (lo, hi) in enumerate(PAPER_WINDOWS):
        window = x[:, lo:hi, lo:hi].reshape(2, -1, D)
        seq = torch.cat([sfe.queries[i].expand(2, 1, D), window], dim=1)
        expected.append(sfe.layers[0](seq)[:, 0])
    sp = torch.stack(expected, 1)
    torch.testing.assert_close(sfe(z.transpose(1, 2).reshape(2, C, G, G)), sp)
    torch.testing.assert_close(proj(z), torch.cat([proj.spatial_head(sp), proj.patch_head(z)], 1))
    assert proj.sp_boxes() == [(lo, lo, hi, hi) for lo, hi in PAPER_WINDOWS]


def test_transformer_tokens_only_see_their_crop_and_attention_is_recorded():
    proj = build("cropping_transformer", dfi=False)
    z = torch.randn(1, G * G, C)
    before = proj.sfe(z.transpose(1, 2).reshape(1, C, G, G))
    att = proj.sfe.last_attention
    z2 = z.clone().reshape(1, G, G, C)
    z2[:, 0] += 1.0  # top row: outside every crop but the global one
    after = proj.sfe(z2.reshape(1, G * G, C).transpose(1, 2).reshape(1, C, G, G))
    torch.testing.assert_close(after[:, :5], before[:, :5])
    assert not torch.allclose(after[:, 5], before[:, 5])
    # (B, S, G*G) over the patch grid, zero outside each crop, < 1 in total (the query also attends to itself)
    assert att.shape == (1, 6, G * G)
    maps = att.reshape(6, G, G)
    for k, (lo, hi) in enumerate(PAPER_WINDOWS):
        inside = maps[k, lo:hi, lo:hi]
        assert (inside > 0).all() and maps[k].sum() == pytest.approx(inside.sum()) and 0 < inside.sum() < 1
    proj(z)
    assert proj.last_attention.shape == (1, 6, G * G)  # no DFI: the extractor's attention
    with_dfi = build("cropping_transformer")
    with_dfi(z)
    assert with_dfi.last_attention.shape == (1, 6, 25) and with_dfi.sfe.last_attention.shape == (1, 6, G * G)


def test_transformer_has_no_dropout():
    proj = build("cropping_transformer", dfi=False)
    z = torch.randn(2, G * G, C)
    proj.train()
    a = proj(z)
    proj.eval()
    with torch.no_grad():
        b = proj(z)
    torch.testing.assert_close(a.detach(), b, rtol=1e-4, atol=1e-5)


def test_transformer_grids_and_options():
    proj = build("cropping_transformer", grid=12, dfi=False)  # sides 2, 4, ..., 12
    assert proj(torch.randn(1, 144, C)).shape == (1, 6 + 144, H)
    cls = PROJECTORS["cropping_transformer"]
    with pytest.raises(ProjectorConfigError, match=r"extractor_heads \(3\).*sp_width \(8\)"):
        cls.check_config(proj_cfg("cropping_transformer", extractor_heads=3), grid=24)
    with pytest.raises(ProjectorConfigError, match="extractor_layers"):
        cls.check_config(proj_cfg("cropping_transformer", extractor_layers=0), grid=24)
    with pytest.raises(ProjectorConfigError, match="grid"):
        cls.check_config(proj_cfg("cropping_transformer"), grid=4)


# ---- learned queries -------------------------------------------------------------------------------------------


def test_learned_queries_are_single_head_cross_attention():
    proj = build("learned_queries", dfi=False, dtype=torch.float64)
    z = torch.randn(2, G * G, C, dtype=torch.float64)
    e = proj.sfe
    x = F.layer_norm(z @ e.embed.weight.t() + e.embed.bias + e.position, (D,), e.norm.weight, e.norm.bias)
    k, v = x @ e.key.weight.t(), x @ e.value.weight.t() + e.value.bias
    sp = F.scaled_dot_product_attention(e.queries.expand(2, 6, D), k, v)
    torch.testing.assert_close(proj(z), torch.cat([proj.spatial_head[1](F.gelu(sp)), proj.patch_head(z)], 1))
    assert proj.layout.num_sp_tokens == 6 and proj.sp_boxes() == []
    att = proj.last_attention
    assert att.shape == (2, 6, G * G)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    assert proj.spatial_head[1].bias is None  # SFE-only rule: unbiased W_s


@pytest.mark.parametrize("dfi", [False, True])
def test_learned_queries_parameter_count(dfi):
    proj = build("learned_queries", dfi=dfi)
    s = 6
    extractor = C * D + D + G * G * D + s * D + 2 * D + D * D + D * D + D  # embed, positions, queries, LN, Wk, Wv
    assert n_params(proj.sfe) == extractor
    assert n_params(proj) == extractor + (dfi_params() + 2 * D * H if dfi else D * H) + W_P
    assert build("learned_queries", dfi=False, sides=[8, 16, 24]).layout.num_sp_tokens == 3


# ---- optimizer groups: declared by each projector -------------------------------------------------------------

# Golden: the convolution weights whose kernel covers a whole window, per arm (stacked arms: the merge convs, not
# the 4x4 reduce convs). Everything else in a projector trains at lr_projector.
FULL_WINDOW = {
    "mlp": [],
    "learned_queries": [],
    "cropping_transformer": ["dfi.kv_weight"],  # learned_queries: no DFI
    "conv49": ["conv_tokens.weight"],
    "pooling_stacked": [f"sfe.merge.{i}" for i in range(6)] + ["dfi.kv_weight"],
    "cropping_stacked": [f"sfe.merge.{i}" for i in range(6)] + ["dfi.kv_weight"],
    "official_transformer": [],
    "official_stacked": [],  # no full-window kernel; no DFI
}


@pytest.mark.parametrize("variant", sorted(SP_TOKENS))
def test_optimizer_groups_are_declared_by_the_projector(variant):
    from types import SimpleNamespace

    from lightning_sp.module import optimizer_groups

    cfg = composed(variant).projector
    projector = build_projector(cfg, vision_width=C, llm_width=H, grid=G)
    if variant in FULL_WINDOW:
        expected = set(FULL_WINDOW[variant])
    else:  # the SFE family: one full-window conv per SP token, plus the DFI's K/V conv when it has one
        expected = {f"sfe.weights.{i}" for i in range(SP_TOKENS[variant])} | ({"dfi.kv_weight"} if cfg.dfi else set())
    model = SimpleNamespace(
        projector=projector, named_parameters=lambda: ((f"projector.{n}", p) for n, p in projector.named_parameters())
    )
    groups = optimizer_groups(model)
    names = {id(p): n.removeprefix("projector.") for n, p in projector.named_parameters()}
    assert {names[id(p)] for p in groups["sp_conv"]} == expected
    assert len(groups["sp_conv"]) + len(groups["projector"]) == len(names) and not groups["lora"]
