"""Training-step time and peak memory as the text length and the batch grow (embedded default, SP-Pooling).

The model is the embedded default (conf/model/tiny.yaml: random-init CLIP 336 px / patch 14, width 64, 3 layers;
Llama width 128, 2 layers; LoRA; SP-Pooling projector), so every sequence starts with the 582 visual tokens
(6 SP + 576 patch) and then carries `text` random text tokens. Each (batch, text) point runs in a fresh
subprocess, so its memory figure is its own: peak RSS of that process on CPU (`resource.getrusage`, measured,
not estimated; it includes Python, torch and the model, shown separately as "after build"), or
`torch.cuda.max_memory_allocated` on CUDA. A step is forward + backward + AdamW with the stage-2 trainables
(LoRA + projector); one warm-up step, then the mean of `--iters` steps. On CPU each point runs with one intra-op
thread (`--threads`): on a shared 2-core host a second thread mostly waits for the core, and the step times
scatter by 2-4x from run to run.

    python benchmarks/scaling_bench.py [--device cuda] [--batches 1 4 16] [--texts 64 256 1024] [--write RESULTS.md]
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

SECTION = "scaling_bench"
VARIANT = "pooling"
# Positions beyond the tiny preset's 1024 (582 visual + 1024 text): RoPE needs no table, the field only documents.
# The paper's 24x24 grid (a random tiny encoder), not the embedded default's 12x12: 582 visual tokens.
OVERRIDES = [
    f"variant={VARIANT}",
    "model.llm.max_position_embeddings=4096",
    "model.vision.name_or_path=null",
    "model.vision.patch_size=14",
]


def peak_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(batch: int, text: int, device: str, iters: int, threads: int | None) -> dict:
    import torch

    from lightning_sp.config import compose
    from lightning_sp.data.tokenizer import load_tokenizer
    from lightning_sp.module import LlavaSPModule
    from lightning_sp.paths import resolve

    if threads:
        torch.set_num_threads(threads)
    cfg = compose(OVERRIDES)
    tokenizer = load_tokenizer(str(resolve(cfg.model.tokenizer)))
    torch.manual_seed(0)
    model = LlavaSPModule(cfg, tokenizer).model.to(device)
    n = model.num_visual_tokens
    ids = torch.randint(5, len(tokenizer) - 1, (batch, 1 + n + text), device=device)
    ids[:, 1 : 1 + n] = model.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n] = -100
    pixels = torch.randn(batch, 3, cfg.model.vision.image_size, cfg.model.vision.image_size, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    built = peak_gib(device)

    def step() -> None:
        loss = model(ids, torch.ones_like(ids), pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the optimizer state and the allocator's pools
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / iters
    return {
        "batch": batch,
        "text": text,
        "visual": n,
        "seq": ids.shape[1],
        "step_s": step_s,
        "tokens_per_s": batch * ids.shape[1] / step_s,
        "peak_gib": peak_gib(device),
        "built_gib": built,
    }


def run_point(batch: int, text: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(batch),
        str(text),
        "--device",
        args.device,
        "--iters",
        str(args.iters),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"point batch={batch} text={text} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(points: list[dict], args, elapsed: float, load_before: str) -> str:
    cuda = args.device.startswith("cuda")
    memory = (
        "torch.cuda.max_memory_allocated"
        if cuda
        else "peak RSS of the point's own process (ru_maxrss), after build = RSS once the model is built"
    )
    by = {(p["batch"], p["text"]): p for p in points}
    lines = [
        f"## Step time and peak memory vs sequence length and batch, embedded default ({VARIANT}), {args.device}",
        "",
        f"- date: {now()}; whole run {elapsed:.0f} s",
        f"- machine: {machine(args.device)} (in each point's process)",
        f"- host load average (1/5/15 min) before / after: {load_before} / {load_average()}",
        f"- step = fwd + bwd + AdamW (LoRA + projector trainable), mean of {args.iters} after one warm-up; "
        f"sequence = BOS + {points[0]['visual']} visual + text tokens; memory: {memory}",
        f"- command: `python benchmarks/scaling_bench.py {' '.join(sys.argv[1:])}`",
        "",
        "| batch | text | sequence | step s | tokens/s | peak GiB | after build GiB | peak - build GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p['batch']} | {p['text']} | {p['seq']} | {p['step_s']:.3f} | {p['tokens_per_s']:.0f} | "
            f"{p['peak_gib']:.2f} | {p['built_gib']:.2f} | {p['peak_gib'] - p['built_gib']:.2f} |"
        )
    # Growth factors measured in this run: along the batch at the shortest text, along the text at the largest batch.
    b_lo, b_hi, t_lo, t_hi = min(args.batches), max(args.batches), min(args.texts), max(args.texts)

    def growth(lo: dict, hi: dict) -> str:
        extra = (hi["peak_gib"] - hi["built_gib"]) / max(1e-9, lo["peak_gib"] - lo["built_gib"])
        return f"step time x{hi['step_s'] / lo['step_s']:.1f}, peak - build x{extra:.1f}"

    notes = []
    if (b_lo, t_lo) in by and (b_hi, t_lo) in by and b_hi > b_lo:
        notes.append(
            f"batch {b_lo} -> {b_hi} (x{b_hi / b_lo:g}) at text {t_lo}: " + growth(by[(b_lo, t_lo)], by[(b_hi, t_lo)])
        )
    if (b_hi, t_lo) in by and (b_hi, t_hi) in by and t_hi > t_lo:
        lo, hi = by[(b_hi, t_lo)], by[(b_hi, t_hi)]
        notes.append(
            f"text {t_lo} -> {t_hi} at batch {b_hi} (sequence x{hi['seq'] / lo['seq']:.2f}): " + growth(lo, hi)
        )
    if notes:
        lines += ["", "Measured growth: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--texts", type=int, nargs="+", default=[64, 256, 1024], help="text tokens after the visual ones"
    )
    parser.add_argument("--skip", nargs="*", default=[], metavar="BxT", help="grid points to leave out, e.g. 16x1024")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads in each point (default 1 on CPU: on a shared 2-core host a second "
        "thread mostly spin-waits, and step times scatter 2-4x; torch's default on CUDA)",
    )
    parser.add_argument("--write", type=Path, help="write the results as this benchmark's section of a Markdown file")
    parser.add_argument("--child", nargs=2, type=int, metavar=("BATCH", "TEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.iters, args.threads)))
        return 0

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # so that the machine line names the points' thread count
    started, load_before = time.perf_counter(), load_average()
    points = []
    for batch in args.batches:
        for text in args.texts:
            if f"{batch}x{text}" in args.skip:
                continue
            points.append(run_point(batch, text, args))
            p = points[-1]
            print(
                f"batch {batch:3d} text {text:5d}: {p['step_s']:.3f} s/step, {p['tokens_per_s']:.0f} tokens/s, "
                f"peak {p['peak_gib']:.2f} GiB (after build {p['built_gib']:.2f})",
                flush=True,
            )
    body = report(points, args, time.perf_counter() - started, load_before)
    print(body)
    if args.write:
        write_section(args.write, SECTION, body, "cuda" if args.device.startswith("cuda") else "cpu")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
