"""Attention on a CPU: PyTorch's fused kernel (``scaled_dot_product_attention``) next to the plain
softmax(q k^T) v, forward (inference) and forward + backward (training), fp32 and bf16, at ViT shapes.

    python benchmarks/attention.py                  # the shapes below, 2 threads (~1 min)
    python benchmarks/attention.py --tiny           # seconds: what the test runs

Prints one row per shape x precision x mode: milliseconds of each (median of ``--repeats`` after ``--warmup``),
explicit / fused, and which one ``vit.models.layers.attention`` runs there. On a CPU the fused kernel is flash
attention, whose backward pass in bf16 is the slow case this measures (the reason ``attention`` computes the plain
form when training in bf16 on a CPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit.models.layers import explicit_attention, use_explicit_attention  # noqa: E402

# (batch, heads, tokens, head dim): the small-data recipe (32 px, patch 4), ViT-S/16 at 224 px (batch 16 and 1),
# ViT-B/16 at 384 px, ViT-S/16 at 512 px
SHAPES = [(128, 4, 65, 32), (16, 6, 197, 64), (1, 6, 197, 64), (2, 12, 577, 64), (1, 6, 1025, 64)]
TINY_SHAPES = [(2, 2, 17, 8)]


def time_ms(fn, q, k, v, train: bool, repeats: int, warmup: int) -> float:
    def once():
        out = fn(q, k, v)
        if train:
            out.float().sum().backward()
    times = []
    with torch.set_grad_enabled(train):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            once()
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="one tiny shape, 1 repeat")
    args = parser.parse_args(argv)
    if args.tiny:
        args.repeats, args.warmup = 1, 0
    torch.set_num_threads(args.threads)
    rows = []
    print(f"CPU, {args.threads} threads, torch {torch.__version__}")
    print("| batch x heads x tokens x dim | dtype | mode | fused (ms) | explicit (ms) | explicit / fused | "
          "vit runs |")
    print("|---|---|---|---|---|---|---|")
    for shape in TINY_SHAPES if args.tiny else SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for train in (False, True):
                q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=train) for _ in range(3))
                fused = time_ms(F.scaled_dot_product_attention, q, k, v, train, args.repeats, args.warmup)
                plain = time_ms(explicit_attention, q, k, v, train, args.repeats, args.warmup)
                with torch.set_grad_enabled(train):
                    picks = "explicit" if use_explicit_attention(q) else "fused"
                row = dict(shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."),
                           mode="train" if train else "infer", fused=fused, explicit=plain, picks=picks)
                rows.append(row)
                print(f"| {row['shape']} | {row['dtype']} | {row['mode']} | {fused:.2f} | {plain:.2f} | "
                      f"{plain / fused:.2f} | {picks} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
