"""Training-step cost of SP-Pooling vs the LLaVA-1.5 MLP on the same model, measured in one run.

Each (shape, variant) runs in its own subprocess so that peak memory (ru_maxrss on CPU, max_memory_allocated on
CUDA) belongs to that configuration alone. A step is forward + backward + AdamW on a random batch whose text part
is 64 tokens after the visual tokens, with the stage-2 trainable set (LoRA + projector).

    python benchmarks/step_bench.py [--device cuda] [--shapes tiny mid] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import load_average, machine, now, write_section  # noqa: E402

SHAPES = {
    # the embedded default's widths (conf/model/tiny.yaml) on the paper's 24x24 grid, batch 16
    "tiny": {"batch": 16, "overrides": []},
    # real widths: CLIP-L features (1024), SP width 512, a Llama with hidden 2048; 2 layers each to fit 2 cores
    "mid": {
        "batch": 2,
        "overrides": [
            "model.vision.hidden_size=1024",
            "model.vision.num_layers=2",
            "model.vision.num_heads=16",
            "model.vision.intermediate_size=4096",
            "model.llm.hidden_size=2048",
            "model.llm.num_layers=2",
            "model.llm.num_heads=16",
            "model.llm.num_kv_heads=16",
            "model.llm.intermediate_size=5504",
            "projector.sp_width=512",
            "model.lora.r=64",
            "model.lora.alpha=128",
            "model.lora.modules_to_save=[]",
        ],
    },
}
TEXT_TOKENS = 64


def child(shape: str, variant: str, device: str, iters: int) -> dict:
    import torch

    from lightning_sp.config import compose
    from lightning_sp.data.tokenizer import load_tokenizer
    from lightning_sp.module import LlavaSPModule
    from lightning_sp.paths import resolve

    spec = SHAPES[shape]
    # The paper's 24x24 grid with a random encoder of the shape's width (the shipped encoder is 64 wide, 12x12).
    cfg = compose(
        [f"variant={variant}", "model.vision.name_or_path=null", "model.vision.patch_size=14", *spec["overrides"]]
    )
    tokenizer = load_tokenizer(str(resolve(cfg.model.tokenizer)))
    torch.manual_seed(0)
    model = LlavaSPModule(cfg, tokenizer).model.to(device)
    n, b = model.num_visual_tokens, spec["batch"]
    ids = torch.randint(5, len(tokenizer) - 1, (b, n + TEXT_TOKENS), device=device)
    ids[:, 1 : 1 + n] = model.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n] = -100
    pixels = torch.randn(b, 3, cfg.model.vision.image_size, cfg.model.vision.image_size, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss = model(ids, torch.ones_like(ids), pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocates optimizer state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "step_s": (time.perf_counter() - start) / iters,
        "peak_gib": peak,
        "tokens": n + TEXT_TOKENS,
        "trainable": trainable,
        "batch": b,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["tiny", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--write", help="write the results as this benchmark's section of a Markdown file")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.iters)))
        return

    started, load_before = time.perf_counter(), load_average()
    rows = []
    for shape in args.shapes:
        results = {}
        for variant in ("mlp", "pooling"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    shape,
                    variant,
                    "--device",
                    args.device,
                    "--iters",
                    str(args.iters),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(shape, variant, results[variant], flush=True)
        m, p = results["mlp"], results["pooling"]
        rows.append(
            f"| {shape} | {m['batch']} | {m['tokens']} / {p['tokens']} | {m['trainable'] / 1e6:.1f} M / "
            f"{p['trainable'] / 1e6:.1f} M | {m['step_s']:.3f} / {p['step_s']:.3f} | "
            f"{p['step_s'] / m['step_s']:.2f} | {m['peak_gib']:.2f} / {p['peak_gib']:.2f} | "
            f"{p['peak_gib'] / m['peak_gib']:.2f} |"
        )
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS of the process"
    section = (
        "\n".join(
            [
                f"## Training step: SP-Pooling vs MLP on the same model, {args.device}",
                "",
                f"- date: {now()}; whole run {time.perf_counter() - started:.0f} s",
                f"- machine: {machine(args.device)}",
                f"- step = fwd + bwd + AdamW, stage-2 trainables (LoRA + projector), {TEXT_TOKENS} text tokens "
                f"after the visual ones, mean of {args.iters} steps after one warm-up; memory: {memory}",
                f"- host load average (1/5/15 min) before / after: {load_before} / {load_average()}",
                "- command: `python benchmarks/step_bench.py"
                + (f" --device {args.device}" if args.device != "cpu" else "")
                + " --write benchmarks/RESULTS.md`",
                "",
                "| shape | batch | sequence mlp / pooling | trainable mlp / pooling | step s mlp / pooling | ratio "
                "| peak GiB mlp / pooling | ratio |",
                "|---|---:|---|---|---|---:|---|---:|",
                *rows,
                "",
                "The SP projector adds ~0.9 B *trainable* parameters at real widths (the 24x24 conv alone is 302 M): "
                "their",
                "gradients and AdamW state (16 bytes per parameter in fp32) dominate the memory ratio at these small "
                "LLM",
                "sizes, and their matmuls the time ratio. With a 7B LLM the frozen bf16 weights and activations dilute "
                "both.",
            ]
        )
        + "\n"
    )
    print(section)
    if args.write:
        write_section(args.write, "step_bench", section, "cuda" if args.device.startswith("cuda") else "cpu")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
