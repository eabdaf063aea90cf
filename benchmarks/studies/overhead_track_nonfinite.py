"""What track=True and nonfinite="skip" cost on one fp32 AdamW step (64 Mi params by default):
three optimizers on three equal tensors, stepped in turn, median of --rounds.

    python benchmarks/studies/overhead_track_nonfinite.py [--n 67108864] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import lvopt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import measure  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64 << 20)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    def make(**kw):
        p = torch.nn.Parameter(torch.randn(args.n))
        p.grad = torch.randn(args.n)
        return lvopt.AdamW([p], lr=1e-3, weight_decay=0.1, **kw)

    opts = {"plain": make(), "track=True": make(track=True), 'nonfinite="skip"': make(nonfinite="skip")}
    # One warm-up step each, then round-robin (harness.measure), median of the rounds.
    times = measure({k: o.step for k, o in opts.items()}, args.rounds, warmup=1)
    base = times["plain"].median_ms
    for k, t in times.items():
        print(f"{k:20s} {t.median_ms:8.2f} ms  {t.median_ms / base:.3f}x")


if __name__ == "__main__":
    main()
