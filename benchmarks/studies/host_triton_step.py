"""Host time of one Triton dense optimizer step for GPT-2 small's 148 tensors, on the CPU,
kernels not run.

The Triton step's device work is a few launches; its host work is what this measures: what
``opt.step()`` costs the Python thread that queues it, with every Triton kernel launch replaced
by a recorder (CPU tensors under TRITON_INTERPRET=1: the same host code as on a GPU, the
kernels' launches excluded, Triton's own launcher cost not counted). Reported: the median of
--steps calls after two warm-up steps (the first step validates, creates the state and builds
the launch plans), for

- ``lvopt.AdamW(backend="triton").step()`` with the gradients where they were (CUDA graphs,
  ``zero_grad(set_to_none=False)``), with gradients re-allocated before every step
  (``zero_grad(set_to_none=True)`` and a backward; the allocation is not timed), with a new
  float ``lr`` every step (an LR scheduler), with ``nonfinite="skip"``;
- ``lvopt.AdamH(backend="triton").step()`` (GPT-2's matrices on the hyperball, the rest AdamW);
- the op alone through the dispatcher (``torch.ops.lvopt_triton.fused_adamw_``, what a direct
  caller and a compiled step pay), same gradients.

    TRITON_INTERPRET=1 python benchmarks/studies/host_triton_step.py [--steps 200]

It runs on older trees too (kernels missing there are skipped), so that before and after can
be measured side by side with PYTHONPATH set to each tree.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(BENCHMARKS))  # the checkout's lvopt
sys.path.insert(0, BENCHMARKS)
from harness import gpt2_small_shapes, hyper_table, measure  # noqa: E402

KERNELS = {
    "lvopt.triton.fused_adamw": ("adamw_kernel", "chunk_sums_kernel"),
    "lvopt.triton.fused_adamh": ("adamh_reduce_kernel", "adamh_finalize_kernel", "adamh_apply_kernel"),
    "lvopt.triton._plan": ("adam_setup_kernel", "nonfinite_scan_kernel"),
}


def stub_kernels(launches: list) -> None:
    """Replaces every Triton kernel of the dense steps by a recorder of (name, grid)."""

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append((self.name, grid))

    for mod_name, names in KERNELS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, Kernel(name))


def _median_us(fn, steps, before=None):
    """Median us of ``steps`` calls after 2 warm-up calls (harness.measure); ``before()`` untimed
    before each call."""
    return measure(fn, steps, 2, before=None if before is None else (lambda i: before())).median_s * 1e6


def _params(shapes):
    # Uninitialised storage: the kernels do not run, so no page of it is touched.
    ps = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    for p in ps:
        p.grad = torch.empty(p.shape)
    return ps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    import lvopt

    launches: list = []
    stub_kernels(launches)
    shapes = gpt2_small_shapes(conv1d=True)
    rows = {}

    ps = _params(shapes)
    opt = lvopt.AdamW(ps, lr=1e-3, weight_decay=0.1, backend="triton")
    rows["AdamW step, same gradients"] = _median_us(opt.step, args.steps)

    def new_grads():
        for p in ps:
            p.grad = torch.empty(p.shape)

    rows["AdamW step, re-allocated gradients"] = _median_us(opt.step, args.steps, new_grads)
    lrs = iter(1e-3 * (1 + 1e-4 * i) for i in range(10**7))

    def new_lr():
        opt.param_groups[0]["lr"] = next(lrs)

    rows["AdamW step, new float lr every step"] = _median_us(opt.step, args.steps, new_lr)
    skip = lvopt.AdamW(_params(shapes), lr=1e-3, weight_decay=0.1, backend="triton", nonfinite="skip")
    rows["AdamW step, nonfinite='skip'"] = _median_us(skip.step, args.steps)
    hp = _params(shapes)
    adamh = lvopt.AdamH(
        [{"params": [p for p in hp if p.dim() >= 2]}, {"params": [p for p in hp if p.dim() < 2], "hyperball": False}],
        lr=1e-3,
        backend="triton",
    )
    rows["AdamH step, same gradients"] = _median_us(adamh.step, args.steps)

    st = [opt.state[p] for p in ps]
    hyper = hyper_table(len(ps), lr=1e-3, weight_decay=0.1)
    op = torch.ops.lvopt_triton.fused_adamw_
    op_args = (
        ps,
        [p.grad for p in ps],
        [s["exp_avg"] for s in st],
        [s["exp_avg_sq"] for s in st],
        [s["step"] for s in st],
        hyper,
    )
    rows["op through the dispatcher, same gradients"] = _median_us(lambda: op(*op_args), args.steps)
    print(
        f"Triton dense step host time, GPT-2 small ({len(shapes)} tensors), kernels not run, median of "
        f"{args.steps} after 2 warm-up steps (PYTHONPATH={os.environ.get('PYTHONPATH', '')}):"
    )
    for k, v in rows.items():
        print(f"  {k:45s} {v / 1e3:8.3f} ms")
    return rows


if __name__ == "__main__":
    main()
