"""Forward+backward of the LLaVA-SP projector at the paper's shape: our matmul form vs plain nn.Conv2d.

Patches (B, 576, 1024) -> (B, 582, 4096): SFE (6 windows) + DFI (25 K/V tokens) + W_s + W_p, fp32, for the
pooling and the cropping variant. "ours" is `lightning_sp`'s SpatialProjector (each whole-window convolution as
one matmul over the flattened window, the DFI conv as unfold + matmul). "conv" is a reference module written
here with `nn.Conv2d` per window (`nn.AdaptiveAvgPool2d` + `nn.Conv2d` for pooling) and
`nn.Conv2d(k=16, stride=2)` for the DFI K/V tokens, sharing the very same Parameters; LayerNorm/Linear/heads are
the same modules in both. Both run in the same process, on the same input and output cotangent. The first
iteration of each form also checks that the two agree: outputs (SP and patch tokens separately) and the
gradient of every parameter, relative error ||a-b|| / ||b|| <= 1e-5 (TF32 is switched off on CUDA); see
`compare` for the two gradients that need a different yardstick.

Each timed iteration: grads set to None, forward, backward with a fixed cotangent (the patches need no grad:
CLIP is frozen). Defaults: CPU --batch 2 --iters 1 --warmup 1 --conv-warmup 0 (the conv form takes ~45 s per
iteration on an otherwise idle 2-core host, nearly all of it in the backward, so its single iteration is timed
without a warm-up: the whole run then takes ~2.5 minutes, twice that if other processes share the cores);
CUDA --batch 8 --iters 10 --warmup 3 --conv-warmup 3. Peak host memory on CPU: ~13 GB (0.9 B parameters, their
gradients, and the first form's gradients kept for the check).

    python benchmarks/projector_bench.py [--device cuda] [--batch B] [--iters N] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import load_average, write_section  # noqa: E402
from lightning_sp.models.projectors import build_projector  # noqa: E402
from lightning_sp.models.projectors.spatial import SpatialProjector  # noqa: E402

SECTION = "projector_bench"  # its span of RESULTS.md: <!-- projector_bench --> ... <!-- /projector_bench -->
TOLERANCE = 1e-5
# Gradients that are exactly zero in exact arithmetic: a bias on the keys adds the same q.b to all 25 logits of a
# query, and softmax ignores a shift. Both forms give rounding noise there, so a relative error between them is
# meaningless; the check is instead that this noise is negligible against the total gradient norm.
ZERO_GRADS = ("dfi.key.0.bias", "dfi.key.1.bias")


class ConvReference(nn.Module):
    """The same projector as plain nn.Conv2d / nn.AdaptiveAvgPool2d modules, sharing `proj`'s Parameters."""

    def __init__(self, proj: SpatialProjector) -> None:
        super().__init__()
        assert proj.dfi is not None, "the benchmark is for the released variants, which have DFI"
        self.mode, self.grid, self.boxes = proj.sfe_mode, proj.grid, proj.sfe.boxes()
        d, c = proj.dfi.kv_weight.shape[:2]
        windows = []
        for side, weight in zip(proj.sfe.sides, proj.sfe.weights):
            conv = nn.Conv2d(c, d, side, bias=False, device="meta")
            conv.weight = weight  # shared Parameter: same values, one gradient
            pooled = self.mode == "pooling" and side != self.grid
            windows.append(nn.Sequential(nn.AdaptiveAvgPool2d(side), conv) if pooled else conv)
        self.windows = nn.ModuleList(windows)
        self.kv_conv = nn.Conv2d(c, d, proj.dfi.kernel, stride=proj.dfi.stride, bias=False, device="meta")
        self.kv_conv.weight = proj.dfi.kv_weight
        self.query, self.key, self.value = proj.dfi.query, proj.dfi.key, proj.dfi.value
        self.spatial_head, self.patch_head = proj.spatial_head, proj.patch_head

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, c = patches.shape
        zmap = patches.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        tokens = []
        for window, (r0, c0, r1, c1) in zip(self.windows, self.boxes):
            x = zmap[:, :, r0:r1, c0:c1] if self.mode == "cropping" else zmap
            tokens.append(window(x).flatten(1))  # (B, D, 1, 1) -> (B, D)
        sp = torch.stack(tokens, dim=1)
        kv = self.kv_conv(zmap).flatten(2).transpose(1, 2)  # (B, 25, D)
        q, k, v = self.query(sp), self.key(kv), self.value(kv)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        sp = torch.cat([sp, attention @ v], dim=-1)
        return torch.cat([self.spatial_head(sp), self.patch_head(patches)], dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def compare(out, ref_out, params, ref_grads, n_sp) -> list[tuple[str, float, float]]:
    """(what, relative error, limit) of the conv form against ours.

    The two forms compute the SP tokens and the gradients of the big window/DFI conv weights differently: those
    must agree to 1e-5. The small DFI/W_s parameters get their gradients from the same code in both forms, fed
    with SP tokens that differ by rounding; where that gradient is a difference of near-equal terms (the query
    bias, through the softmax) rounding is amplified a little, so they are checked to 1e-4 one by one, and to
    1e-5 all together (global norm over every gradient)."""

    def sq(t):
        return torch.linalg.vector_norm(t).item() ** 2

    conv_weights = [n for n in ref_grads if n.startswith("sfe.weights.") or n == "dfi.kv_weight"]
    others = [n for n in ref_grads if n not in conv_weights and n not in ZERO_GRADS]
    per_param = {n: rel_err(params[n].grad, ref_grads[n]) for n in conv_weights + others}
    worst_conv = max(conv_weights, key=per_param.get)
    worst_other = max(others, key=per_param.get)
    total = math.sqrt(sum(sq(g) for g in ref_grads.values()))
    diff = math.sqrt(sum(sq(params[n].grad - g) for n, g in ref_grads.items()))
    key_bias = max(math.sqrt(sq(t)) for n in ZERO_GRADS for t in (params[n].grad, ref_grads[n]))
    return [
        ("output, SP tokens", rel_err(out[:, :n_sp], ref_out[:, :n_sp]), TOLERANCE),
        ("output, patch tokens", rel_err(out[:, n_sp:], ref_out[:, n_sp:]), TOLERANCE),
        ("all gradients (global)", diff / total, TOLERANCE),
        (f"conv-weight gradient, worst ({worst_conv})", per_param[worst_conv], TOLERANCE),
        (f"other gradient, worst ({worst_other})", per_param[worst_other], 10 * TOLERANCE),
        ("key-bias gradients / total gradient norm", key_bias / total, TOLERANCE),
    ]


def run_form(model, params, x, cotangent, warmup, iters, device, reference=None):
    """Time fwd and bwd; iteration 0 is kept (output, grads) or checked against `reference`."""
    fwd, bwd, kept, errors = [], [], None, None
    for i in range(warmup + iters):
        for p in params.values():
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        out = model(x)
        sync(device)
        t1 = time.perf_counter()
        out.backward(cotangent)
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        if i == 0:
            n_sp = out.shape[1] - x.shape[1]
            if reference is None:
                kept = (out.detach(), {n: p.grad for n, p in params.items()})
            else:
                errors = compare(out.detach(), reference[0], params, reference[1], n_sp)
                reference = None
        del out
    return fwd, bwd, kept, errors


def bench_variant(variant, args, device):
    torch.manual_seed(0)
    # The released configuration, spelled out (no omegaconf needed, so the script also runs on a bare GPU box).
    cfg = SimpleNamespace(name=variant, sp_width=args.sp_width, dfi=True, dfi_kv_tokens=25, sides=None, head_bias=None)
    with torch.device(device):
        proj = build_projector(cfg, vision_width=args.vision_width, llm_width=args.llm_width, grid=24)
    conv = ConvReference(proj)
    params = dict(proj.named_parameters())
    assert {id(p) for p in conv.parameters()} == {id(p) for p in params.values()}, "the two forms must share weights"
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, 576, args.vision_width, device=device, generator=gen)
    cotangent = torch.randn(args.batch, 6 + 576, args.llm_width, device=device, generator=gen)

    ours_fwd, ours_bwd, kept, _ = run_form(proj, params, x, cotangent, args.warmup, args.iters, device)
    conv_fwd, conv_bwd, _, errors = run_form(
        conv, params, x, cotangent, args.conv_warmup, args.iters, device, reference=kept
    )
    del kept
    n_params = sum(p.numel() for p in params.values())
    return {
        "variant": variant,
        "params": n_params,
        "ours": (ours_fwd, ours_bwd),
        "conv": (conv_fwd, conv_bwd),
        "errors": errors,
    }


def machine(device: torch.device) -> str:
    parts = [
        platform.platform(),
        f"{os.cpu_count()} CPU cores",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} intra-op threads",
    ]
    if device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, TF32 off)")
    else:
        parts.append(f"device cpu ({platform.processor() or platform.machine()})")
    return "; ".join(parts)


def mean(xs):
    return sum(xs) / len(xs)


def report(results, args, device, elapsed, load_before) -> str:
    lines = [
        f"## SP projector: matmul form vs nn.Conv2d (fwd+bwd), {device.type}",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine(device)}",
        f"- shape: patches ({args.batch}, 576, {args.vision_width}) -> ({args.batch}, 582, {args.llm_width}), "
        f"D={args.sp_width}, DFI 25 K/V tokens, fp32; both forms share the weights",
        f"- iterations: warm-up {args.warmup} (ours) / {args.conv_warmup} (conv), then {args.iters} timed "
        f"(mean shown); whole run {elapsed:.0f} s",
        f"- host load average (1/5/15 min) before / after: {load_before} / {load_average()} "
        f"(a 'before' load near 0 means nothing else was running)",
        f"- command: `python benchmarks/projector_bench.py {' '.join(sys.argv[1:])}`",
        "",
        "| variant | form | fwd s/iter | bwd s/iter | fwd+bwd s/iter | conv / ours |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        o_total = mean(r["ours"][0]) + mean(r["ours"][1])
        c_total = mean(r["conv"][0]) + mean(r["conv"][1])
        lines.append(
            f"| {r['variant']} | ours (matmul) | {mean(r['ours'][0]):.3f} | {mean(r['ours'][1]):.3f} | "
            f"{o_total:.3f} | |"
        )
        lines.append(
            f"| {r['variant']} | nn.Conv2d | {mean(r['conv'][0]):.3f} | {mean(r['conv'][1]):.3f} | "
            f"{c_total:.3f} | {c_total / o_total:.1f}x |"
        )
    lines += [
        "",
        "Numerical agreement, relative error ||ours - conv|| / ||conv|| (limit 1e-5; 1e-4 for one small "
        "DFI/W_s gradient alone; the key biases' gradients are 0 up to rounding and are compared with the "
        "total gradient norm):",
        "",
    ]
    for r in results:
        errs = ", ".join(
            f"{what} {value:.1e}{'' if value <= limit else f' ABOVE {limit:g}'}" for what, value, limit in r["errors"]
        )
        lines.append(f"- {r['variant']} ({r['params'] / 1e6:.0f} M parameters): {errs}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--batch", type=int, help="default 2 on CPU, 8 (the paper's shape) on CUDA")
    parser.add_argument("--iters", type=int, help="timed iterations per form (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed iterations of our form (default 1 on CPU, 3 on CUDA)")
    parser.add_argument(
        "--conv-warmup", type=int, help="untimed iterations of the conv form (default 0 on CPU, 3 on CUDA)"
    )
    parser.add_argument("--variants", nargs="+", default=["pooling", "cropping"], choices=["pooling", "cropping"])
    parser.add_argument("--vision-width", type=int, default=1024, help="C (CLIP ViT-L/14-336: 1024)")
    parser.add_argument("--sp-width", type=int, default=512, help="D (paper: 512)")
    parser.add_argument("--llm-width", type=int, default=4096, help="H (Vicuna-7B: 4096)")
    parser.add_argument("--write", type=Path, help="write the results as this benchmark's section of a Markdown file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 in both forms, for the 1e-5 check
        torch.backends.cudnn.allow_tf32 = False
    for name, cpu_default, cuda_default in (("batch", 2, 8), ("iters", 1, 10), ("warmup", 1, 3), ("conv_warmup", 0, 3)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if cuda else cpu_default)
    if args.iters < 1 or args.batch < 1:
        parser.error("--iters and --batch must be positive")

    start, load_before = time.perf_counter(), load_average()
    results = []
    for variant in args.variants:
        print(f"[{variant}] running ...", flush=True)
        results.append(bench_variant(variant, args, device))
        if cuda:
            torch.cuda.empty_cache()
    body = report(results, args, device, time.perf_counter() - start, load_before)
    print(body)
    if args.write:
        write_section(args.write, SECTION, body, device.type)
        print(f"wrote {args.write}")
    failed = [(r["variant"], what, value) for r in results for what, value, limit in r["errors"] if not value <= limit]
    if failed:
        print(f"NUMERICAL MISMATCH: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
