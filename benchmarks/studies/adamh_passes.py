"""Where the CPU AdamH step's time goes: each pass alone against the AdamW step and a bare torch
op with the same reads and writes, round-robin on one n x n fp32 matrix (8192 by default).

    python benchmarks/studies/adamh_passes.py [--n 8192] [--rounds 11]

The rows (bytes per parameter read / written):
- AdamW step: reads p, g, m, v (16), writes p, m, v (12);
- AdamH pass 1 (fused_adamh_reduce_): reads W, g, m, v (16), writes m, v (8);
- AdamH pass 2, u recomputed (fused_adamh_apply_): reads W, m, v (12), writes W (4);
- addcmul_ (p += 0 * m * v): the same 12 read / 4 written, no square root or division;
- AdamH step (fused_adamh_, u kept: pass 1 also streams u out, pass 2 reads W, u: 8 / 4);
- add_ (p += 0 * u): pass 2's traffic with u kept.
If each pass takes as long as the bare op with its reads, a CPU pass is set by what it reads,
not by its arithmetic or its writes (docs/design.md section 4).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import lvopt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import hyper_table, measure  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args(argv)
    n, ops = args.n, torch.ops.lvopt
    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    m, v = torch.randn(n, n, generator=g) * 1e-3, torch.rand(n, n, generator=g) * 1e-6
    u = torch.randn(n, n, generator=g)
    step = torch.tensor(5.0)
    radius = torch.linalg.vector_norm(p, dtype=torch.float64)
    # lr 0 and no weight decay: every row leaves p where it is, so the rounds time the same work.
    hyper = hyper_table(lr=0.0)
    sums = ops.fused_adamh_reduce_([p], [grad], [m], [v], [step], hyper, None)
    rows = {
        "AdamW step": lambda: ops.fused_adamw_([p], [grad], [m], [v], [step], hyper, None, None),
        "AdamH pass 1 (reduce)": lambda: ops.fused_adamh_reduce_([p], [grad], [m], [v], [step], hyper, None),
        "AdamH pass 2, u recomputed (apply)": lambda: ops.fused_adamh_apply_(
            [p], [m], [v], [step], [radius], hyper, sums, None
        ),
        "addcmul_ (pass 2's traffic)": lambda: p.addcmul_(m, v, value=0.0),
        "AdamH step, u kept": lambda: ops.fused_adamh_([p], [grad], [m], [v], [step], [radius], hyper, None),
        "add_ (pass 2's traffic, u kept)": lambda: p.add_(u, alpha=0.0),
    }
    t = measure(rows, rounds=args.rounds, warmup=2)
    info = lvopt.build_info()
    print(
        f"{n}x{n} fp32, CPU ISA {info['cpu_isa_active']}, {torch.get_num_threads()} threads, "
        f"workspace cap {info['cpu_workspace_limit_mb']:g} MiB, median of {args.rounds} rounds"
    )
    aw = t["AdamW step"].median_ms
    for name, timing in t.items():
        print(f"  {name:40s} {timing.median_ms:8.2f} ms  {timing.median_ms / aw:5.2f}x AdamW")


if __name__ == "__main__":
    main()
