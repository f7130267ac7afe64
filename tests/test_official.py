"""Import/export of the released LLaVA-SP projector weights (docs/METHOD.md §3) against a straight-line §2 forward
written here directly on the official tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lightning_sp.config import ProjectorConfig
from lightning_sp.models.official import (
    KEY_TABLE,
    PEFT_PREFIX,
    OfficialCheckpointError,
    OfficialWidths,
    check_official_state_dict,
    compact_keys,
    export_official_projector,
    load_official_projector,
    official_state_dict,
    split_official_state_dict,
)
from lightning_sp.models.projectors import build_projector

C, D, H, G = 32, 16, 24, 24
SIDES = (4, 8, 12, 16, 20, 24)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the official layout, written out from docs/METHOD.md §3 (independently of KEY_TABLE) ---------------------------


def official_shapes(variant, c=C, d=D, h=H):
    """Official name (no prefix) -> shape, for the released <variant>+DFI checkpoint."""
    shapes = {}
    for s in SIDES:
        name = f"model.conv_{s}.1.weight" if variant == "pooling" and s < 24 else f"model.conv_{s}.weight"
        shapes[name] = (d, c, s, s)
    shapes["model.conv_CM.weight"] = (d, c, 16, 16)
    for p in ("query", "key", "value"):
        shapes[f"model.{p}_projector.0.weight"] = (d,)
        shapes[f"model.{p}_projector.0.bias"] = (d,)
        shapes[f"model.{p}_projector.1.weight"] = (d, d)
        shapes[f"model.{p}_projector.1.bias"] = (d,)
    shapes["model.conv_linear.1.weight"] = (h, 2 * d)
    if variant == "cropping":
        shapes["model.conv_linear.1.bias"] = (h,)
    shapes["model.mm_projector.0.weight"] = (h, c)
    shapes["model.mm_projector.0.bias"] = (h,)
    shapes["model.mm_projector.2.weight"] = (h, h)
    shapes["model.mm_projector.2.bias"] = (h,)
    return shapes


def random_official(variant, prefix=True, seed=0, dtype=torch.float32):
    """A random official-layout state dict with sensible scales (fan-in scaled weights, LN around 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_shapes(variant).items():
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if "_projector.0.weight" in name:
            t = 1 + 0.2 * t
        elif len(shape) > 1:
            t = t / math.sqrt(math.prod(shape[1:]))
        else:
            t = 0.2 * t
        sd[(PEFT_PREFIX if prefix else "") + name] = t.to(dtype)
    return sd


def strip(sd):
    return {k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k: v for k, v in sd.items()}


def official_forward(sd, variant, z):
    """§2 straight-line on the official tensors: F.conv2d windows / AdaptiveAvgPool2d, DFI, W_s, W_p."""
    sd = {k: v.double() for k, v in strip(sd).items()}
    b, n, c = z.shape
    d = sd["model.conv_CM.weight"].shape[0]
    zmap = z.transpose(1, 2).reshape(b, c, 24, 24)  # patch r*24+c at [r, c]
    tokens = []
    for s in SIDES:
        if variant == "cropping":
            lo = (24 - s) // 2
            x, w = zmap[:, :, lo : lo + s, lo : lo + s], sd[f"model.conv_{s}.weight"]
        elif s == 24:
            x, w = zmap, sd["model.conv_24.weight"]
        else:
            x, w = nn.AdaptiveAvgPool2d(s)(zmap), sd[f"model.conv_{s}.1.weight"]
        tokens.append(F.conv2d(x, w).reshape(b, d))
    sp_raw = torch.stack(tokens, 1)
    kv = F.conv2d(zmap, sd["model.conv_CM.weight"], stride=2)
    assert kv.shape[-2:] == (5, 5)
    kv = kv.flatten(2).transpose(1, 2)

    def ln_linear(x, p):
        x = F.layer_norm(x, (d,), sd[f"model.{p}_projector.0.weight"], sd[f"model.{p}_projector.0.bias"])
        return F.linear(x, sd[f"model.{p}_projector.1.weight"], sd[f"model.{p}_projector.1.bias"])

    q, k, v = ln_linear(sp_raw, "query"), ln_linear(kv, "key"), ln_linear(kv, "value")
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    sp = torch.cat([sp_raw, attn @ v], dim=-1)
    sp_out = F.linear(F.gelu(sp), sd["model.conv_linear.1.weight"], sd.get("model.conv_linear.1.bias"))
    patch = F.linear(
        F.gelu(F.linear(z, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])),
        sd["model.mm_projector.2.weight"],
        sd["model.mm_projector.2.bias"],
    )
    return torch.cat([sp_out, patch], dim=1)  # SP tokens first


def save(sd, path):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


# ---- import ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["pooling", "cropping"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors", "dict"])
@pytest.mark.parametrize("prefix", [True, False])
def test_import_matches_official_forward(tmp_path, variant, fmt, prefix):
    sd = random_official(variant, prefix=prefix, dtype=torch.float64)
    src = sd if fmt == "dict" else save(sd, tmp_path / f"non_lora_trainables.{fmt}")
    proj = load_official_projector(src, variant, dtype=torch.float64)
    assert proj.window_layout == variant and all(p.dtype == torch.float64 for p in proj.parameters())
    z = torch.randn(2, G * G, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = proj(z)
    assert out.shape == (2, 582, H)
    torch.testing.assert_close(out, official_forward(sd, variant, z), rtol=1e-10, atol=1e-10)


def test_import_default_dtype_is_float32_and_none_keeps_the_files(tmp_path):
    sd = random_official("pooling", dtype=torch.bfloat16)
    path = save(sd, tmp_path / "w.bin")
    proj = load_official_projector(path, "pooling")
    assert {p.dtype for p in proj.parameters()} == {torch.float32}
    z = torch.randn(1, G * G, C)
    torch.testing.assert_close(proj(z).double(), official_forward(sd, "pooling", z.double()), rtol=1e-4, atol=1e-4)
    assert {p.dtype for p in load_official_projector(path, "pooling", dtype=None).parameters()} == {torch.bfloat16}
    sd[PEFT_PREFIX + "model.conv_CM.weight"] = sd[PEFT_PREFIX + "model.conv_CM.weight"].float()
    with pytest.raises(OfficialCheckpointError, match=r"mixes.*conv_CM"):
        load_official_projector(sd, "pooling", dtype=None)


def test_import_does_not_alias_the_callers_tensors():
    sd = random_official("cropping")
    proj = load_official_projector(sd, "cropping")
    proj.sfe.weights[0].data.zero_()
    assert sd[PEFT_PREFIX + "model.conv_4.weight"].abs().sum() > 0


@pytest.mark.parametrize("variant", ["pooling", "cropping"])
def test_real_release_shapes_map_onto_our_projector(variant):
    """C=1024, D=512, H=4096 on the meta device: the key/shape tables only, no 3.6 GB of weights."""
    shapes = official_shapes(variant, c=1024, d=512, h=4096)
    sd = {PEFT_PREFIX + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert check_official_state_dict(sd, variant) == OfficialWidths(C=1024, D=512, H=4096)
    proj = load_official_projector(sd, variant)
    ours = dict(proj.named_parameters())
    assert [tuple(ours[f"sfe.weights.{i}"].shape) for i in range(6)] == [(512, 1024, s, s) for s in SIDES]
    assert ours["dfi.kv_weight"].shape == (512, 1024, 16, 16)
    assert ours["spatial_head.1.weight"].shape == (4096, 1024)
    assert ("spatial_head.1.bias" in ours) == (variant == "cropping")
    assert ours["patch_head.2.weight"].shape == (4096, 4096)
    sp = sum(p.numel() for n, p in ours.items() if n.startswith(("sfe", "dfi")))
    assert 0.89e9 < sp < 0.91e9 and ours["sfe.weights.5"].numel() == 301_989_888
    back = official_state_dict(proj, variant)
    assert {k: tuple(v.shape) for k, v in back.items()} == {PEFT_PREFIX + k: s for k, s in shapes.items()}


def test_key_table_is_one_to_one():
    for variant, rows in KEY_TABLE.items():
        assert len({r.ours for r in rows}) == len({r.official for r in rows}) == len(rows)
        assert {r.official for r in rows} == set(official_shapes(variant))


# ---- strictness --------------------------------------------------------------------------------------------------


def test_missing_keys_are_all_named():
    sd = random_official("pooling")
    for k in ("model.conv_8.1.weight", "model.conv_12.1.weight", "model.query_projector.0.bias"):
        del sd[PEFT_PREFIX + k]
    with pytest.raises(OfficialCheckpointError) as e:
        load_official_projector(sd, "pooling")
    assert e.value.missing == ["model.conv_12.1.weight", "model.conv_8.1.weight", "model.query_projector.0.bias"]
    assert "missing (3): model.conv_{8,12}.1.weight, model.query_projector.0.bias" in str(e.value)


def test_unexpected_keys_are_named():
    sd = random_official("cropping")
    sd[PEFT_PREFIX + "model.conv_2.weight"] = torch.zeros(D, C, 2, 2)
    sd["model.conv_CM.bias"] = torch.zeros(D)
    with pytest.raises(OfficialCheckpointError, match=r"unexpected \(2\): model\.conv_2\.weight, model\.conv_CM\.bias"):
        load_official_projector(sd, "cropping")


@pytest.mark.parametrize("file_variant,asked", [("cropping", "pooling"), ("pooling", "cropping")])
def test_the_other_variant_is_refused_and_recognised(tmp_path, file_variant, asked):
    path = save(random_official(file_variant), tmp_path / "non_lora_trainables.bin")
    with pytest.raises(OfficialCheckpointError) as e:
        load_official_projector(path, asked)
    msg = str(e.value)
    assert str(path) in msg and f"pass variant='{file_variant}'" in msg
    pooled, plain = "model.conv_{4,8,12,16,20}.1.weight", "model.conv_{4,8,12,16,20}.weight"
    if asked == "pooling":
        assert f"missing (5): {pooled}" in msg and f"unexpected (6): {plain}, model.conv_linear.1.bias" in msg
    else:
        assert f"missing (6): {plain}, model.conv_linear.1.bias" in msg and f"unexpected (5): {pooled}" in msg


def test_wrong_shapes_are_all_named_with_the_expected_shape():
    sd = random_official("cropping")
    sd[PEFT_PREFIX + "model.conv_4.weight"] = torch.zeros(D, C, 5, 5)  # wrong kernel size
    sd[PEFT_PREFIX + "model.conv_CM.weight"] = torch.zeros(D, C, 12, 12)  # the 49-token ablation, not the release
    sd[PEFT_PREFIX + "model.key_projector.1.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(OfficialCheckpointError) as e:
        load_official_projector(sd, "cropping")
    msg = str(e.value)
    assert f"model.conv_4.weight: got [{D}, {C}, 5, 5], expected [{D}, {C}, 4, 4]" in msg
    assert f"model.conv_CM.weight: got [{D}, {C}, 12, 12], expected [{D}, {C}, 16, 16]" in msg
    assert f"model.key_projector.1.weight: got [{D}, {D + 1}], expected [{D}, {D}]" in msg
    assert sorted(e.value.bad) == ["model.conv_4.weight", "model.conv_CM.weight", "model.key_projector.1.weight"]


def test_a_head_without_dfi_width_is_a_shape_error():
    sd = random_official("pooling")
    sd[PEFT_PREFIX + "model.conv_linear.1.weight"] = torch.zeros(H, D)  # an SFE-only arm's W_s
    match = rf"conv_linear\.1\.weight: got \[{H}, {D}\], expected \[{H}, {2 * D}\]"
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official_projector(sd, "pooling")


def test_prefix_with_and_without_may_not_name_one_tensor_twice():
    sd = random_official("pooling")
    sd["model.conv_24.weight"] = sd[PEFT_PREFIX + "model.conv_24.weight"].clone()
    with pytest.raises(OfficialCheckpointError, match=r"with and without.*base_model\.model\.model\.conv_24\.weight"):
        load_official_projector(sd, "pooling")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(bad):
    sd = random_official("cropping")
    sd[PEFT_PREFIX + "model.conv_16.weight"][0, 0, 0, 0] = bad
    sd[PEFT_PREFIX + "model.value_projector.1.bias"][3] = bad
    match = r"non-finite.*model\.conv_16\.weight, model\.value_projector"
    with pytest.raises(OfficialCheckpointError, match=match) as e:
        load_official_projector(sd, "cropping")
    assert e.value.bad == ["model.conv_16.weight", "model.value_projector.1.bias"]


def test_non_float_and_non_tensor_entries_are_named(tmp_path):
    sd = random_official("pooling")
    sd[PEFT_PREFIX + "model.conv_CM.weight"] = sd[PEFT_PREFIX + "model.conv_CM.weight"].to(torch.int64)
    with pytest.raises(OfficialCheckpointError, match=r"non-floating-point.*conv_CM\.weight \(torch\.int64\)"):
        load_official_projector(sd, "pooling")
    sd = random_official("pooling")
    sd["step"] = 3  # weights_only allows plain values; they are still not tensors
    with pytest.raises(OfficialCheckpointError, match="not tensors.*step"):
        load_official_projector(save(sd, tmp_path / "w.bin"), "pooling")


MARKS = []


def _mark():
    MARKS.append("unpickled")
    return {}


class Payload:
    def __reduce__(self):  # what arbitrary unpickling would execute
        return (_mark, ())


def test_pickled_objects_are_refused_not_executed(tmp_path):
    sd = random_official("pooling")
    sd["extra"] = Payload()
    path = tmp_path / "non_lora_trainables.bin"
    torch.save(sd, path)
    with pytest.raises(OfficialCheckpointError, match="weights_only"):
        load_official_projector(path, "pooling")
    assert MARKS == []


def test_unknown_variant_and_missing_file():
    with pytest.raises(OfficialCheckpointError, match="pooling, cropping"):
        load_official_projector(random_official("pooling"), "mlp")
    with pytest.raises(FileNotFoundError):
        load_official_projector("/nonexistent/non_lora_trainables.bin", "pooling")


def test_split_separates_llm_weights_but_keeps_stray_projector_keys():
    sd = random_official("pooling")
    llm = {
        PEFT_PREFIX + "model.embed_tokens.weight": torch.zeros(5, 8),
        PEFT_PREFIX + "lm_head.weight": torch.zeros(5, 8),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2),
    }
    with pytest.raises(OfficialCheckpointError, match=r"(?s)unexpected \(3\).*split_official_state_dict") as e:
        load_official_projector({**sd, **llm}, "pooling")
    assert e.value.unexpected == ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    projector_part, rest = split_official_state_dict({**sd, **llm})
    assert projector_part == sd and rest == llm
    load_official_projector(projector_part, "pooling")
    stray = {**sd, **llm, PEFT_PREFIX + "model.conv_2.weight": torch.zeros(D, C, 2, 2)}
    with pytest.raises(OfficialCheckpointError, match=r"unexpected \(1\): model\.conv_2\.weight"):
        load_official_projector(split_official_state_dict(stray)[0], "pooling")


# ---- export and round trip -----------------------------------------------------------------------------------


def random_projector(variant, seed=0):
    torch.manual_seed(seed)
    proj = build_projector(ProjectorConfig(name=variant, sp_width=D), vision_width=C, llm_width=H, grid=G)
    with torch.no_grad():  # LayerNorms start at 1/0: perturb so that a swapped mapping would show
        for p in proj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return proj


@pytest.mark.parametrize("variant", ["pooling", "cropping"])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_round_trip_is_exact(tmp_path, variant, suffix):
    proj = random_projector(variant)
    path = export_official_projector(proj, tmp_path / f"out{suffix}", variant)
    if suffix == ".bin":
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == {PEFT_PREFIX + k for k in official_shapes(variant)}
    back = load_official_projector(path, variant)
    ours, theirs = proj.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    z = torch.randn(2, G * G, C)
    assert torch.equal(proj(z), back(z))
    # and the exported tensors are the official layout that the independent forward understands
    torch.testing.assert_close(
        back(z.double().float()).double(),
        official_forward(official_state_dict(proj, variant), variant, z.double()),
        rtol=1e-4,
        atol=1e-4,
    )


def test_safetensors_export_records_its_variant(tmp_path):
    path = export_official_projector(
        random_projector("cropping"), tmp_path / "w.safetensors", "cropping", dtype=torch.bfloat16
    )
    assert {p.dtype for p in load_official_projector(path, "cropping", dtype=None).parameters()} == {torch.bfloat16}
    with pytest.raises(OfficialCheckpointError, match="records variant 'cropping'"):
        load_official_projector(path, "pooling")


def test_export_refuses_layouts_the_release_cannot_express(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="cannot export a pooling projector as variant 'cropping'"):
        official_state_dict(random_projector("pooling"), "cropping")
    arms = [
        ({"dfi": False}, r"lacks .*dfi\.kv_weight"),
        ({"head_bias": False}, r"lacks \[spatial_head\.1\.bias\]$"),
        ({"sides": [8, 16, 24]}, r"lacks \[sfe\.weights\.\{3-5\}\]$"),
        ({"sides": [2, 4, 8, 12, 16, 24]}, r"model\.conv_4\.weight: got \[16, 32, 2, 2\], expected \[16, 32, 4, 4\]"),
        ({"dfi_kv_tokens": 49}, r"model\.conv_CM\.weight: got \[16, 32, 12, 12\], expected \[16, 32, 16, 16\]"),
    ]
    for overrides, match in arms:
        cfg = ProjectorConfig(**{"name": "cropping", "sp_width": D, **overrides})
        with pytest.raises(OfficialCheckpointError, match=match):
            official_state_dict(build_projector(cfg, vision_width=C, llm_width=H, grid=G), "cropping")
    nan = random_projector("cropping")
    with torch.no_grad():
        nan.dfi.value[1].weight[0, 0] = float("nan")
    with pytest.raises(OfficialCheckpointError, match=r"non-finite.*model\.value_projector\.1\.weight"):
        export_official_projector(nan, tmp_path / "w.bin", "cropping")
    mlp = build_projector(ProjectorConfig(name="mlp"), vision_width=C, llm_width=H, grid=G)
    with pytest.raises(OfficialCheckpointError, match="MLPProjector"):
        official_state_dict(mlp, "pooling")
    with pytest.raises(OfficialCheckpointError, match="extension"):
        export_official_projector(random_projector("pooling"), tmp_path / "w.ckpt", "pooling")
    assert not list(tmp_path.iterdir())


def test_compact_keys():
    assert compact_keys(["a.conv_12.w", "a.conv_4.w", "a.conv_8.w"]) == "a.conv_{4,8,12}.w"
    assert (
        compact_keys([f"m.layers.{i}.q_proj.weight" for i in range(32)] + ["m.layers.3.k_proj.bias"])
        == "m.layers.{0-31}.q_proj.weight, m.layers.3.k_proj.bias"
    )
    assert (
        compact_keys(["m.{}_projector.0.weight".format(p) for p in ("query", "key", "value")])
        == "m.{key,query,value}_projector.0.weight"
    )
    assert compact_keys([]) == ""
