"""What one element of the dense CPU steps costs, arithmetic against memory: the time per element
per thread of AdamW (fp32; bf16 parameters and gradients; fp32 with track=True's sums) and of
the AdamH step, on a state that stays in the L2 cache (one 8 Ki-element state passed 128 times
in one call, one thread: the arithmetic and the conversions, no DRAM) and on a 64 Mi state with
one thread and with all of them, at each vector ISA level this machine has.

    python benchmarks/studies/cpu_cost_per_element.py [--rounds 11] [--big 67108864]

Read: a row costs its L2 time per element in arithmetic wherever its data comes from; at 64 Mi
it can only be as fast as the bytes it moves allow when that arithmetic fits under the memory
time per element (the fp32 AdamW step's 64 Mi time is that memory time, 28 B per element). The
bf16 step moves 20 B/param against fp32's 28, so it is faster than fp32 only while its
arithmetic stays under 20/28 of that time. (AdamH with fewer than 4 Mi elements recomputes u in
pass 2, csrc/cpu/fused_adamh.cpp, so its L2 row is the recomputing step and its 64 Mi rows the
one that keeps u.) benchmarks/RESULTS.md, "An AVX2-only EPYC", has this machine class's numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import lvopt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import hyper_table, measure  # noqa: E402


def rows(n: int, copies: int) -> dict:
    """The step ops on an n-element state passed ``copies`` times in one call (lr 0, no decay:
    every call does the same work)."""
    ops, g = torch.ops.lvopt, torch.Generator().manual_seed(0)
    hyper = hyper_table(copies, lr=0.0)

    def state(dtype):
        p, grad = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
        m, v = torch.randn(n, generator=g) * 1e-3, torch.rand(n, generator=g) * 1e-6
        return [[t] * copies for t in (p, grad, m, v, torch.tensor(5.0))]

    f, b, t, h = state(torch.float32), state(torch.bfloat16), state(torch.float32), state(torch.float32)
    stats = torch.zeros(copies, 2, dtype=torch.float64)
    radii = [torch.linalg.vector_norm(h[0][0], dtype=torch.float64)] * copies
    return {
        "AdamW fp32": _with_state(lambda: ops.fused_adamw_(*f, hyper, None, None), f),
        "AdamW bf16": _with_state(lambda: ops.fused_adamw_(*b, hyper, None, None), b),
        "AdamW track=True": _with_state(lambda: ops.fused_adamw_(*t, hyper, None, stats), t),
        "AdamH fp32": _with_state(lambda: ops.fused_adamh_(*h, radii, hyper, None), h),
    }


def _with_state(fn, lists):
    fn.state = (lists[2][0], lists[3][0])  # the moments m, v the call steps
    return fn


def state_of(fn) -> tuple:
    """The moments (m, v) a row of :func:`rows` steps."""
    return fn.state


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--big", type=int, default=64 << 20)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    configs = [("in L2, 1 thread", 8192, 128, 1), ("64 Mi, 1 thread", args.big, 1, 1)]
    configs.append((f"64 Mi, {threads} threads", args.big, 1, threads))
    info = lvopt.build_info()
    print(f"{info['cpu_isa_hardware']} CPU, median of {args.rounds} rounds, ns per element per thread")
    for level in lvopt.cpu_isa_levels():
        if level == "baseline":
            continue
        with lvopt.set_cpu_isa(level):
            print(f"\n{level}:")
            print(f"  {'row':18s}" + "".join(f"{name:>20s}" for name, *_ in configs))
            out = {}
            for name, n, copies, th in configs:
                torch.set_num_threads(th)
                t = measure(rows(n, copies), rounds=args.rounds, warmup=2)
                for row, timing in t.items():
                    out.setdefault(row, []).append(timing.median_s * 1e9 * th / (n * copies))
            torch.set_num_threads(threads)
            for row, cells in out.items():
                print(f"  {row:18s}" + "".join(f"{c:20.3f}" for c in cells))


if __name__ == "__main__":
    main()
