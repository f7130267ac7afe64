"""Stage-2 (LoRA) training step of LLaVA-SP at the 7B shape on one GPU: step time, tokens/s, peak memory, MFU/HFU.

The model is built by the package itself (`LlavaSP.from_config` + `set_trainable`, as `LlavaSPModule` does) from
`conf/model/llava7b.yaml` + `conf/stage/finetune.yaml` with the hub names switched off and the widths set by
overrides, so it has the exact shapes of the real run with random weights:

- vision: CLIP ViT-L/14-336 shape (hidden 1024, 24 layers, 16 heads, MLP 4096, 336 px, patch 14: 576 patches)
- LLM: Vicuna-7B shape (Llama, hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000), SDPA attention,
  gradient checkpointing (non-reentrant), LoRA r128 / alpha 256 on q,k,v,o,gate,up,down (peft)
- projector: the selected variant (default SP-Pooling: 6 SP + 576 patch tokens, D=512)

The frozen vision tower and LLM are created directly in bf16 on the device (default dtype + device context
while the package's builders run: no fp32 copy, no host round trip); the trainable projector is then cast to
fp32 and LoRA is fp32 (peft's default upcast): fp32 master weights with bf16 autocast compute, as
`trainer.precision=bf16-mixed` trains. The vocabulary size comes from a stand-in tokenizer with 32000 entries
(`<image>` is id 31999: image positions are replaced by visual tokens before any embedding lookup).

A step: forward under bf16 autocast, loss on the text positions, backward, AdamW step, zero_grad. Sequences are
`--max-length` long: BOS + the projector's visual tokens + random text (every sample full length: the
worst case the length cap allows, which is what sizes the memory).

FLOPs are counted explicitly (`step_flops`, printed with the formula): the frozen LLM needs forward (2NT) and
backward w.r.t. activations (2NT) but no weight gradients, so 4*N*T; LoRA 6*N_lora*T; causal attention
2*L^2*H per layer and sequence forward, x3 with backward; the vision tower forward only; the projector's
forward + weight-gradient FLOPs are measured with torch's FlopCounterMode on the meta device. MFU counts these
(model FLOPs); HFU adds the forward that gradient checkpointing recomputes. Peak: 989 TFLOP/s dense bf16 (H100
SXM and H200), 756 (H100 PCIe), or `--peak-tflops`.

    python benchmarks/gpu_step_bench.py [--batch 16] [--max-length 2048] [--steps 5] [--write benchmarks/RESULTS.md]
    python benchmarks/gpu_step_bench.py --flops-only          # the FLOP budget of a step, no GPU needed
    python benchmarks/gpu_step_bench.py --tiny                # same code at a tiny shape on CPU (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import load_average, machine, now, write_section  # noqa: E402

SECTION = "gpu_step_bench"
VOCAB = 32000  # Vicuna / Llama-2
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Dense bf16 TFLOP/s by device name, first match wins: H100 SXM and H200 989, H100 NVL 835, H100 PCIe 756.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0))

SHAPE_7B = [
    "model.vision.hidden_size=1024",
    "model.vision.num_layers=24",
    "model.vision.num_heads=16",
    "model.vision.intermediate_size=4096",
    "model.vision.image_size=336",
    "model.vision.patch_size=14",
    "model.llm.hidden_size=4096",
    "model.llm.num_layers=32",
    "model.llm.num_heads=32",
    "model.llm.num_kv_heads=32",
    "model.llm.intermediate_size=11008",
    "model.llm.max_position_embeddings=4096",
]
SHAPE_TINY = [  # same structure, CPU-sized; the 336 px / patch 14 geometry is kept (the SP windows need 24x24)
    "model.vision.hidden_size=32",
    "model.vision.num_layers=2",
    "model.vision.num_heads=2",
    "model.vision.intermediate_size=64",
    "model.llm.hidden_size=64",
    "model.llm.num_layers=2",
    "model.llm.num_heads=4",
    "model.llm.num_kv_heads=4",
    "model.llm.intermediate_size=128",
    "model.llm.max_position_embeddings=4096",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "projector.sp_width=16",
]
TINY_VOCAB = 1000


def overrides(variant: str, tiny: bool, grad_ckpt: bool) -> list[str]:
    return [
        "model=llava7b",
        "stage=finetune",
        f"variant={variant}",
        "model.vision.name_or_path=null",
        "model.llm.name_or_path=null",
        "model.llm.dtype=bfloat16",
        "model.llm.attn_implementation=sdpa",
        f"model.llm.gradient_checkpointing={str(grad_ckpt).lower()}",
        *(SHAPE_TINY if tiny else SHAPE_7B),
    ]


class VocabOnly:
    """Stands in for the tokenizer where the builders only need its size and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        assert token == "<image>", token
        return self.size - 1


# ---- FLOP accounting ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int  # tokens per sequence, visual ones included
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    vocab: int
    head_positions: int  # positions per sequence that predict a label: the LM head runs only there (LlavaSP.forward)
    lora_r: int
    lora_targets: tuple[str, ...]
    vis_hidden: int
    vis_layers: int
    vis_intermediate: int
    image_size: int
    patch_size: int
    projector_flops_per_image: float  # projector forward + weight gradients (measured, see projector_flops)
    grad_ckpt: bool


def llama_linears(s: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one Llama decoder layer."""
    h, i, kv = s.llm_hidden, s.llm_intermediate, s.llm_hidden // s.llm_heads * s.llm_kv_heads
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


FORMULA = (
    "T = batch x seq tokens; N_llm = decoder linears + lm_head (frozen; embeddings do no FLOPs); N_lora = "
    "sum r*(in+out) over adapted linears; LLM = 4*N_decoder*T + 4*N_lm_head*T_head (forward 2NT + backward to "
    "activations 2NT, no weight grads; T_head = batch x positions that predict a label: the LM head runs only "
    "there) + 6*N_lora*T; attention (causal, half the L^2 pairs) = 3 x 2*L^2*H per layer and sequence (fwd + 2x "
    "bwd); vision (frozen, no grad) = batch x [2*N_vis_layers*P + 4*P^2*H_v per layer + patch conv], P = 577; "
    "projector = FlopCounterMode(fwd + weight grads) per image x batch. Recompute (gradient checkpointing) = the "
    "decoder layers' forward once more: 2*(N_layers + N_lora)*T + attention forward. MFU = model FLOPs / "
    "(step time x peak); HFU = (model + recompute) / (step time x peak). Norms, rotary, softmax, loss: not counted."
)


def step_flops(s: Shape) -> dict[str, float]:
    """FLOPs of one training step by component (see FORMULA), plus 'model' (MFU) and 'hardware' (HFU) totals."""
    t = s.batch * s.seq
    layer = sum(i * o for i, o in llama_linears(s).values())
    n_llm = s.llm_layers * layer + s.llm_hidden * s.vocab
    head_t = s.batch * s.head_positions
    n_lora = s.llm_layers * sum(
        s.lora_r * (i + o) for name, (i, o) in llama_linears(s).items() if name in s.lora_targets
    )
    attn_fwd = s.llm_layers * s.batch * 2 * s.seq**2 * s.llm_hidden  # QK^T + AV over the causal half
    p = (s.image_size // s.patch_size) ** 2 + 1
    vis_layer_params = 4 * s.vis_hidden**2 + 2 * s.vis_hidden * s.vis_intermediate
    vision = s.batch * (
        s.vis_layers * (2 * vis_layer_params * p + 4 * p**2 * s.vis_hidden)
        + 2 * 3 * s.patch_size**2 * s.vis_hidden * (p - 1)
    )
    out = {
        "llm_frozen": 4 * s.llm_layers * layer * t + 4 * s.llm_hidden * s.vocab * head_t,
        "llm_lora": 6 * n_lora * t,
        "llm_attention": 3 * attn_fwd,
        "vision": vision,
        "projector": s.projector_flops_per_image * s.batch,
    }
    out["model"] = sum(out.values())
    out["recompute"] = (2 * (s.llm_layers * layer + n_lora) * t + attn_fwd) if s.grad_ckpt else 0
    out["hardware"] = out["model"] + out["recompute"]
    out["n_llm"], out["n_lora"], out["tokens"] = n_llm, n_lora, t
    return out


def visual_tokens(cfg) -> int:
    """How many visual tokens the configured projector emits (built on the meta device: no memory)."""
    import torch

    from lightning_sp.models.projectors import build_projector

    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    with torch.device("meta"):
        return build_projector(
            cfg.projector, vision_width=cfg.model.vision.hidden_size, llm_width=cfg.model.llm.hidden_size, grid=grid
        ).layout.num_tokens


def projector_flops(cfg, batch: int = 1) -> float:
    """Forward + weight-gradient FLOPs of the configured projector for `batch` images, counted by torch's
    FlopCounterMode on the meta device (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_sp.models.projectors import build_projector

    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    with torch.device("meta"):
        proj = build_projector(
            cfg.projector, vision_width=cfg.model.vision.hidden_size, llm_width=cfg.model.llm.hidden_size, grid=grid
        )
        x = torch.empty(batch, grid * grid, cfg.model.vision.hidden_size)
    with FlopCounterMode(display=False) as counter:
        proj(x).float().square().mean().backward()  # the features need no grad: CLIP is frozen
    return float(counter.get_total_flops())


def shape_from(cfg, batch: int, seq: int, vocab: int, visual_tokens: int) -> Shape:
    """The step's shape; every position after BOS + the visual tokens is supervised (as in the step below)."""
    v, m = cfg.model.vision, cfg.model.llm
    return Shape(
        batch=batch,
        seq=seq,
        llm_hidden=m.hidden_size,
        llm_layers=m.num_layers,
        llm_heads=m.num_heads,
        llm_kv_heads=m.num_kv_heads,
        llm_intermediate=m.intermediate_size,
        vocab=vocab,
        head_positions=seq - 1 - visual_tokens,
        lora_r=cfg.model.lora.r if cfg.stage.lora else 0,
        lora_targets=tuple(cfg.model.lora.target_modules),
        vis_hidden=v.hidden_size,
        vis_layers=v.num_layers,
        vis_intermediate=v.intermediate_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        projector_flops_per_image=projector_flops(cfg),
        grad_ckpt=bool(m.gradient_checkpointing),
    )


# ---- the step ----------------------------------------------------------------------------------------------


@contextmanager
def built_on(device, dtype):
    """Modules created inside get their parameters on `device` in `dtype` (no fp32 copy, no host round trip)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build(cfg, vocab: int, device):
    import torch

    from lightning_sp.models.vlm import LlavaSP
    from lightning_sp.trainable import set_trainable

    with built_on(device, torch.bfloat16):
        model = LlavaSP.from_config(cfg, VocabOnly(vocab))
    model.projector.float()  # trainable: fp32 master weights (LoRA is fp32 already: peft upcasts adapters)
    set_trainable(model, cfg.stage)
    return model.train()


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def run(args) -> dict:
    import torch

    from lightning_sp.config import compose

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = compose(overrides(args.variant, args.tiny, not args.no_grad_ckpt))
    vocab = TINY_VOCAB if args.tiny else VOCAB
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build(cfg, vocab, device)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    n_vis = model.num_visual_tokens
    if args.max_length <= 1 + n_vis:
        raise SystemExit(f"--max-length {args.max_length} leaves no text after BOS + {n_vis} visual tokens")
    shape = shape_from(cfg, args.batch, args.max_length, vocab, n_vis)
    flops = step_flops(shape)

    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(5, vocab - 1, (args.batch, args.max_length), device=device, generator=gen)
    ids[:, 0] = VocabOnly.bos_token_id
    ids[:, 1 : 1 + n_vis] = model.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n_vis] = -100
    mask = torch.ones_like(ids)
    size = cfg.model.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size, device=device, generator=gen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, mask, pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    loss = float(loss)
    step_s = sorted(times)[len(times) // 2]  # median
    peak_mem = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    params = {
        "trainable": sum(p.numel() for p in trainable),
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }
    result = {
        "device": name,
        "shape": asdict(shape),
        "flops": flops,
        "step_s": step_s,
        "steps_s": times,
        "build_s": build_s,
        "tokens_per_s": flops["tokens"] / step_s,
        "peak_mem_gib": peak_mem,
        "peak_tflops": peak,
        "loss": loss,
        "params": params,
        "visual_tokens": n_vis,
        "achieved_tflops": flops["model"] / step_s / 1e12,
        "mfu": flops["model"] / step_s / (peak * 1e12) if peak else None,
        "hfu": flops["hardware"] / step_s / (peak * 1e12) if peak else None,
    }
    # The formula's parameter count must be the built model's (catches a shape the formula does not describe).
    linear_frozen = sum(
        m.weight.numel()
        for n, m in model.llm.named_modules()
        if isinstance(m, torch.nn.Linear)
        and "lora_" not in n
        and n.split(".")[-1] in (*LLAMA_LINEARS, "base_layer", "lm_head")
    )
    lora = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    result["param_check"] = {
        "n_llm_formula": flops["n_llm"],
        "n_llm_model": linear_frozen,
        "n_lora_formula": flops["n_lora"],
        "n_lora_model": lora,
    }
    if args.count_flops:
        result["flop_counter"] = counted_flops(step, shape, flops)
    return result


def counted_flops(step, shape: Shape, flops: dict) -> dict:
    """One more step under torch's FlopCounterMode: the FLOPs the executed matmuls/convolutions really did,
    against the formula. FlopCounterMode misses CPU SDPA kernels and counts GPU ones without the causal half, so
    attention is left out of both sides; what remains checks every linear, LoRA, the vision tower, the projector
    and the recompute of gradient checkpointing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    measured = sum(n for op, n in by_op.items() if "scaled_dot_product" not in op)
    p = (shape.image_size // shape.patch_size) ** 2 + 1
    vision_attention = shape.batch * shape.vis_layers * 4 * p**2 * shape.vis_hidden
    attention_fwd = flops["llm_attention"] / 3
    expected = flops["hardware"] - flops["llm_attention"] - vision_attention - (attention_fwd if shape.grad_ckpt else 0)
    return {"measured": measured, "formula": expected, "ratio": measured / expected, "by_op": by_op}


# ---- report ------------------------------------------------------------------------------------------------


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def flop_table(flops: dict) -> list[str]:
    rows = ["| component | FLOPs per step | share of model |", "|---|---:|---:|"]
    for key in ("llm_frozen", "llm_lora", "llm_attention", "vision", "projector"):
        rows.append(f"| {key} | {fmt_flops(flops[key])} | {flops[key] / flops['model']:.1%} |")
    rows.append(f"| **model (MFU numerator)** | **{fmt_flops(flops['model'])}** | 100% |")
    rows.append(
        f"| recompute (gradient checkpointing) | {fmt_flops(flops['recompute'])} | "
        f"{flops['recompute'] / flops['model']:.1%} |"
    )
    rows.append(
        f"| hardware (HFU numerator) | {fmt_flops(flops['hardware'])} | {flops['hardware'] / flops['model']:.1%} |"
    )
    return rows


def report(r: dict, args, load_before: str) -> str:
    s = r["shape"]
    pct = (lambda x: f"{x:.1%}") if r["mfu"] is not None else (lambda x: "n/a")
    lines = [
        f"## LLaVA-SP 7B-shape stage-2 LoRA step ({args.variant}), {r['device']}",
        "",
        f"- date: {now()}; machine: {machine(args.device)}",
        f"- host load average (1/5/15 min) before / after: {load_before} / {load_average()}",
        f"- shape: batch {s['batch']} x {s['seq']} tokens ({r['visual_tokens']} visual + BOS + "
        f"{s['seq'] - r['visual_tokens'] - 1} text); LLM hidden {s['llm_hidden']} x {s['llm_layers']} layers, "
        f"vocab {s['vocab']}; vision {s['vis_hidden']} x {s['vis_layers']} layers; LoRA r{s['lora_r']}; "
        f"gradient checkpointing {'on' if s['grad_ckpt'] else 'off'}; bf16 autocast, fp32 trainable weights, SDPA",
        f"- parameters: {r['params']['trainable'] / 1e6:.1f} M trainable, {r['params']['frozen'] / 1e6:.1f} M frozen; "
        f"model built in {r['build_s']:.1f} s",
        f"- step: median of {args.steps} after {args.warmup} warm-up; final loss {r['loss']:.3f}",
        f"- command: `python benchmarks/gpu_step_bench.py {' '.join(sys.argv[1:])}`",
        "",
        "| step s | tokens/s | peak memory GiB | achieved TFLOP/s (model) | MFU | HFU |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_mem_gib']:.1f} | {r['achieved_tflops']:.1f} | "
        f"{pct(r['mfu'])} | {pct(r['hfu'])} |",
        "",
        (f"Peak: {r['peak_tflops']} TFLOP/s dense bf16. " if r["peak_tflops"] else "No peak for this device: MFU n/a. ")
        + "Memory: "
        + (
            "torch.cuda.max_memory_allocated over the timed steps."
            if args.device.startswith("cuda")
            else "peak RSS of the process."
        ),
        "",
        *flop_table(r["flops"]),
        "",
        f"FLOP formula: {FORMULA}",
    ]
    if "flop_counter" in r:
        c = r["flop_counter"]
        lines += [
            "",
            f"FlopCounterMode over one executed step, attention left out of both sides: "
            f"{fmt_flops(c['measured'])} measured vs {fmt_flops(c['formula'])} by the formula "
            f"(ratio {c['ratio']:.4f}; non-reentrant checkpointing skips recomputing each layer's last "
            "LoRA-B product, which the formula counts).",
        ]
    return "\n".join(lines) + "\n"


def flops_only_report(args) -> str:
    from lightning_sp.config import compose

    cfg = compose(overrides(args.variant, args.tiny, not args.no_grad_ckpt))
    flops = step_flops(
        shape_from(cfg, args.batch, args.max_length, TINY_VOCAB if args.tiny else VOCAB, visual_tokens(cfg))
    )
    at = lambda mfu: flops["model"] / (989e12 * mfu)  # noqa: E731
    lines = [
        f"## LLaVA-SP 7B-shape stage-2 LoRA step ({args.variant}): not measured yet: no GPU lent in this session",
        "",
        f"- date: {now()}; `make bench-gpu` (`python benchmarks/gpu_step_bench.py --write benchmarks/RESULTS.md`) "
        "on a GPU machine replaces this block with the measured step time, tokens/s, peak memory, MFU and HFU",
        f"- shape: batch {args.batch} x {args.max_length} tokens per GPU (582 visual + BOS + {args.max_length - 583} "
        f"text), Vicuna-7B-shaped LLM (N_llm = {flops['n_llm'] / 1e9:.2f} B incl. lm_head), LoRA r128 "
        f"(N_lora = {flops['n_lora'] / 1e6:.0f} M), CLIP-L/14-336-shaped tower, gradient checkpointing",
        "- the FLOP budget below is computed (`python benchmarks/gpu_step_bench.py --flops-only`), not measured. "
        f"Only to read it: a step would take {at(0.4):.2f} s at 40% MFU on a 989 TFLOP/s H100 SXM (an assumed MFU, "
        "not a result)",
        "",
        *flop_table(flops),
        "",
        f"FLOP formula: {FORMULA}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", help="default cuda (cpu with --tiny)")
    parser.add_argument("--batch", type=int, help="per GPU (default 16; 2 with --tiny)")
    parser.add_argument("--max-length", type=int, help="tokens per sequence (default 2048; 640 with --tiny)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; 1 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; 0 with --tiny)")
    parser.add_argument("--variant", default="pooling")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: by device name)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shape with the same structure (tests)")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP budget of a step; build nothing")
    parser.add_argument(
        "--count-flops",
        action="store_true",
        help="one extra step under FlopCounterMode to check the formula (always on with --tiny)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw result as one JSON line at the end")
    parser.add_argument("--write", type=Path, help="write the results as this benchmark's section of a Markdown file")
    args = parser.parse_args(argv)
    defaults = {
        "device": ("cpu", "cuda"),
        "batch": (2, 16),
        "max_length": (640, 2048),
        "steps": (1, 5),
        "warmup": (0, 2),
    }
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.count_flops = args.count_flops or args.tiny
    load_before = load_average()

    if args.flops_only:
        body = flops_only_report(args)
        print(body)
        if args.write:
            write_section(args.write, SECTION, body, "cuda")
            print(f"wrote {args.write}")
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available: use --tiny (CPU) or --flops-only, or run on a GPU machine")
    result = run(args)
    body = report(result, args, load_before)
    print(body)
    check = result["param_check"]
    ok = check["n_llm_formula"] == check["n_llm_model"] and check["n_lora_formula"] == check["n_lora_model"]
    print(
        f"parameter check (formula vs built model): N_llm {check['n_llm_formula']} vs {check['n_llm_model']}, "
        f"N_lora {check['n_lora_formula']} vs {check['n_lora_model']}: {'ok' if ok else 'MISMATCH'}"
    )
    if args.write and not args.tiny:
        write_section(args.write, SECTION, body, "cuda" if args.device.startswith("cuda") else "cpu")
        print(f"wrote {args.write}")
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
