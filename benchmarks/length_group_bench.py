"""Padding and step time with LLaVA's length grouping (`data.length_group_batches`) against stream order.

Sample lengths are a synthetic draw shaped like LLaVA-665K (we cannot read the real file here): 6 % text-only
records (~40K of 665K), image records = 582 visual tokens (the paper's 24x24 grid + 6 SP tokens) + a text part
drawn log-normal (median 180 tokens, sigma 0.7: short-answer VQA rounds to long conversations), text-only
records log-normal (median 600, sigma 0.9: ShareGPT), all capped at max_length 2048. The draw is shuffled (what
the shuffle buffer hands on) and cut into the preset's per-device batches of 16, once in stream order and once
through `train_stream.length_grouped` in groups of G batches, the function training uses.

Padding: the share of the padded batch tensors that is padding. Step time: the embedded model at the paper's
grid (random tiny encoder, 582 visual tokens; LoRA + projector trainable, fwd + bwd + AdamW) on the padded shapes of
the same samples -- the first `--steps` batches of whole groups, so both orders hold exactly the same samples; total
time of both, measured in one run, alternating the orders batch by batch so that host load hits both alike.

    python benchmarks/length_group_bench.py [--samples 40000] [--groups 1 2 4 8 16] [--steps 16] [--write RESULTS.md]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import load_average, machine, now, publish  # noqa: E402

SECTION = "length_group_bench"
VISUAL, MAX_LENGTH, BATCH, TEXT_ONLY_SHARE = 582, 2048, 16, 0.06
OVERRIDES = [
    "variant=pooling",
    "model.llm.max_position_embeddings=4096",
    "model.vision.name_or_path=null",
    "model.vision.patch_size=14",
]


def draw(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        if rng.random() < TEXT_ONLY_SHARE:
            length, has_image = min(MAX_LENGTH, max(20, round(rng.lognormvariate(6.397, 0.9)))), False  # e^6.397=600
        else:
            text = min(MAX_LENGTH - VISUAL, max(30, round(rng.lognormvariate(5.193, 0.7))))  # e^5.193 = 180
            length, has_image = VISUAL + text, True
        # range() has a len() and costs nothing: length_grouped only asks for len(sample["input_ids"])
        samples.append({"id": i, "input_ids": range(length), "has_image": has_image})
    return samples


def batches_of(samples: list[dict], group_batches: int, seed: int = 0) -> list[list[dict]]:
    from lightning_sp.data.train_stream import length_grouped

    whole = len(samples) - len(samples) % (group_batches * BATCH)
    if group_batches == 1:
        return [samples[i : i + BATCH] for i in range(0, whole, BATCH)]
    size, out = group_batches * BATCH, []
    for start in range(0, whole, size):
        out += length_grouped(samples[start : start + size], BATCH, random.Random(f"{seed}/{start}"))
    return out


def padding_share(batches: list[list[dict]]) -> tuple[float, float]:
    """(share of padded tokens, mean padded length) over the batches."""
    padded = sum(len(b) * max(len(s["input_ids"]) for s in b) for b in batches)
    real = sum(len(s["input_ids"]) for b in batches for s in b)
    return 1 - real / padded, padded / sum(len(b) for b in batches)


def step_times(plain: list[list[dict]], grouped: list[list[dict]], threads: int) -> tuple[float, float]:
    """Total seconds of fwd + bwd + AdamW over each list of batches (the same samples in both)."""
    import torch

    from lightning_sp.config import compose
    from lightning_sp.module import LlavaSPModule

    torch.set_num_threads(threads)
    cfg = compose(OVERRIDES)
    torch.manual_seed(0)
    module = LlavaSPModule(cfg)
    model, vocab = module.model, len(module.tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    size = cfg.model.vision.image_size

    def tensors(batch):
        width = max(len(s["input_ids"]) for s in batch)
        ids = torch.randint(5, vocab - 1, (len(batch), width))
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, s in enumerate(batch):
            n = len(s["input_ids"])
            mask[row, :n] = 1
            if s["has_image"]:
                ids[row, 1 : 1 + model.num_visual_tokens] = model.image_token_id
            labels[row, n - 8 : n] = ids[row, n - 8 : n]  # an answer at the end
        return ids, mask, labels, torch.randn(len(batch), 3, size, size)

    def step(batch) -> float:
        ids, mask, labels, pixels = tensors(batch)
        start = time.perf_counter()
        model(ids, mask, pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(plain[0])  # warm-up
    totals = [0.0, 0.0]
    for a, b in zip(plain, grouped):
        totals[0] += step(a)
        totals[1] += step(b)
    return totals[0], totals[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=16, help="batches timed per order (whole groups of 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    started, load_before = time.perf_counter(), load_average()
    samples = draw(args.samples)
    rows = []
    for g in args.groups:
        share, mean_len = padding_share(batches_of(samples, g))
        rows.append((g, share, mean_len))
        print(f"groups of {g:2d} batches: padding {share:.1%}, mean padded length {mean_len:.0f}", flush=True)
    steps = args.steps - args.steps % 8
    plain, grouped = batches_of(samples[: steps * BATCH], 1), batches_of(samples[: steps * BATCH], 8)
    assert sorted(s["id"] for b in plain for s in b) == sorted(s["id"] for b in grouped for s in b)
    t_plain, t_grouped = step_times(plain, grouped, args.threads)
    real = sum(len(s["input_ids"]) for b in plain for s in b)
    base = rows[0][1]
    lines = [
        "## Length grouping (LLaVA's group_by_modality_length): padding and step time, cpu",
        "",
        f"- date: {now()}; whole run {time.perf_counter() - started:.0f} s",
        f"- machine: {machine()}",
        f"- host load average (1/5/15 min) before / after: {load_before} / {load_average()}",
        f"- lengths: a synthetic LLaVA-665K-shaped draw of {args.samples} records ({TEXT_ONLY_SHARE:.0%} text-only, "
        f"image = {VISUAL} visual + log-normal text of median 180, text-only log-normal median 600, max "
        f"{MAX_LENGTH}); batches of {BATCH} per device; `benchmarks/length_group_bench.py` says why",
        f"- command: `python benchmarks/length_group_bench.py {' '.join(sys.argv[1:])}`",
        "",
        "| data.length_group_batches | padding share | mean padded length | padding vs stream order |",
        "|---:|---:|---:|---:|",
    ]
    for g, share, mean_len in rows:
        lines.append(
            f"| {g}{' (off)' if g == 1 else ''} | {share:.1%} | {mean_len:.0f} | "
            f"{share / base if base else float('nan'):.2f}x |"
        )
    lines += [
        "",
        f"Step time, the embedded model at the paper's grid ({VISUAL} visual tokens), {len(plain)} batches "
        f"of the same {len(plain) * BATCH} samples ({real} real tokens), fwd + bwd + AdamW, {args.threads} "
        f"threads: stream order {t_plain:.1f} s, grouped by 8 {t_grouped:.1f} s: **{t_plain / t_grouped:.2f}x** "
        "faster grouped.",
    ]
    publish("\n".join(lines) + "\n", args.write, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
