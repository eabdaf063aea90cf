"""Exactness of sparse embedding rows (benchmarks/RESULTS.md, "Sparse embedding rows").

Exact mode against dense fp64 AdamW: 2,000 steps, Zipf(1.1) token ids, cosine LR with
warmup, weight decay 0.1; the error is compared with dense fp32 lvopt AdamW's against the same
fp64 reference. Lazy mode (wd = 0) against torch.optim.SparseAdam on the same gradients.

    python benchmarks/studies/accuracy_sparse_rows.py [--V 4096] [--d 64] [--n 512] [--steps 2000]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import lvopt
from lvopt import reference

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_sparse_rows import zipf_ids  # noqa: E402  (the benchmark's Zipf(1.1) token ids)
from harness import hyper_table  # noqa: E402


def lr_at(t, steps, peak=3e-3, warmup=100):
    if t <= warmup:
        return peak * t / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args(argv)
    V, d, n, steps = args.V, args.d, args.n, args.steps
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(V, d, generator=gen)
    exact = torch.nn.Parameter(w0.clone())
    dense32 = torch.nn.Parameter(w0.clone())
    ref64 = w0.double()
    m64, v64 = torch.zeros_like(ref64), torch.zeros_like(ref64)
    o_exact = lvopt.AdamW([exact], lr=0.0, weight_decay=0.1)
    o_dense = lvopt.AdamW([dense32], lr=0.0, weight_decay=0.1)
    lazy = torch.nn.Parameter(w0.clone())
    sadam_p = torch.nn.Parameter(w0.clone())
    o_lazy = lvopt.AdamW([lazy], lr=1e-3, weight_decay=0.0, sparse_mode="lazy")
    o_sadam = torch.optim.SparseAdam([sadam_p], lr=1e-3)
    for t in range(1, steps + 1):
        lr = lr_at(t, steps)
        for o in (o_exact, o_dense):
            o.param_groups[0]["lr"] = lr
        ids = zipf_ids(n, V, gen)
        vals = torch.randn(n, d, generator=gen)
        g = torch.sparse_coo_tensor(ids[None], vals, (V, d))
        gd = g.to_dense()
        exact.grad = g
        dense32.grad = gd
        lazy.grad = g
        sadam_p.grad = g.clone()
        for o in (o_exact, o_dense, o_lazy, o_sadam):
            o.step()
        hyper = hyper_table(lr=lr, weight_decay=0.1)
        reference.fused_adamw_(
            [ref64], [gd.double()], [m64], [v64], [torch.tensor(float(t - 1), dtype=torch.float64)], hyper
        )
    o_exact.flush()
    last = lvopt.sparse  # noqa: F841
    st = o_exact.state[exact]
    e_exact, e_dense = rel(exact, ref64), rel(dense32, ref64)
    print(f"V={V} d={d} ids/step={n} steps={steps} cosine LR (peak 3e-3, warmup 100) wd=0.1, Zipf(1.1)")
    print(
        f"exact vs fp64 dense: max|dp|/max|p| = {e_exact:.3e}  (m {rel(st['exp_avg'], m64):.3e}, "
        f"v {rel(st['exp_avg_sq'], v64):.3e})"
    )
    print(f"dense fp32 lvopt vs fp64 dense: {e_dense:.3e}   ratio exact/dense32 = {e_exact / e_dense:.2f}")
    print(
        f"lazy (wd=0) vs torch SparseAdam: max rel {rel(lazy, sadam_p.detach().double()):.3e}, "
        f"norm rel {float((lazy - sadam_p).norm() / sadam_p.norm()):.3e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
