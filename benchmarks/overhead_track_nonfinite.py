"""What track=True and nonfinite="skip" cost on one fp32 AdamW step (64 Mi params by default):
three optimizers on three equal tensors, stepped in turn, median of --rounds.

    python benchmarks/overhead_track_nonfinite.py [--n 67108864] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lvopt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64 << 20)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    def make(**kw):
        p = torch.nn.Parameter(torch.randn(args.n))
        p.grad = torch.randn(args.n)
        return lvopt.AdamW([p], lr=1e-3, weight_decay=0.1, **kw)

    opts = {"plain": make(), "track=True": make(track=True), 'nonfinite="skip"': make(nonfinite="skip")}
    for o in opts.values():
        o.step()
    times: dict = {k: [] for k in opts}
    for _ in range(args.rounds):
        for k, o in opts.items():
            t = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["plain"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:20s} {med * 1e3:8.2f} ms  {med / base:.3f}x")


if __name__ == "__main__":
    main()
