"""Host time of one Triton dense step for GPT-2 small's 148 tensors, on the CPU, kernels not run.

The Triton step's device work is a few launches; its host work (argument checks, step
counters and bias corrections, launch tables) is what this measures: the op's Python with its
kernel launches replaced by a recorder, on CPU tensors under TRITON_INTERPRET=1 (the same host
code as on a GPU; the tensor ops it queues run on the CPU here, on tensors of one element or one
row per parameter). Reported: median microseconds per call over --steps calls after a warm-up,
for the op (lvopt.triton.fused_adamw_) with the gradients where they were, with re-allocated
gradients (zero_grad(set_to_none=True)), and for a whole lvopt.AdamW(backend="triton").step().

    TRITON_INTERPRET=1 python benchmarks/host_triton_step.py [--steps 50]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gpt2_small_shapes(layers=12, d=768, v=50257, ctx=1024):
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _median_us(fn, steps):
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    import lvopt
    import lvopt.triton as T
    from lvopt.triton import fused_adamh as H
    from lvopt.triton import fused_adamw as W

    launches = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(self.name)

    for mod, name in ((W, "adamw_kernel"), (W, "chunk_sums_kernel"), (H, "adamh_reduce_kernel"),
                      (H, "adamh_finalize_kernel"), (H, "adamh_apply_kernel")):
        setattr(mod, name, Kernel(name))
    op = W.fused_adamw_._init_fn  # the op's own Python, as the dispatcher runs it on a GPU
    T.fused_adamw_ = op
    shapes = gpt2_small_shapes()
    # Uninitialised storage: the kernels do not run, so no page of it is touched.
    ps = [torch.empty(s) for s in shapes]
    gs = [torch.empty(s) for s in shapes]
    ms = [torch.empty(s) for s in shapes]
    vs = [torch.empty(s) for s in shapes]
    ss = [torch.zeros(()) for _ in shapes]
    hyper = torch.tensor([[1e-3, 0.9, 0.999, 0.1, 1e-8, 0.0]] * len(shapes), dtype=torch.float64)
    rows = {}
    rows["op, same gradients"] = _median_us(lambda: op(ps, gs, ms, vs, ss, hyper), args.steps)

    def moved():
        gs2 = [torch.empty(s) for s in shapes]
        t = time.perf_counter()
        op(ps, gs2, ms, vs, ss, hyper)
        return time.perf_counter() - t

    moved()
    rows["op, re-allocated gradients"] = statistics.median(moved() for _ in range(args.steps)) * 1e6
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    for p, g in zip(params, gs):
        p.grad = g
    opt = lvopt.AdamW(params, lr=1e-3, weight_decay=0.1, backend="triton")
    rows["lvopt.AdamW(backend='triton').step()"] = _median_us(opt.step, args.steps)
    print(f"Triton dense AdamW host time per step, GPT-2 small ({len(shapes)} tensors), kernels not run, "
          f"median of {args.steps}:")
    for k, v in rows.items():
        print(f"  {k:45s} {v / 1e3:8.3f} ms")
    return rows


if __name__ == "__main__":
    main()
