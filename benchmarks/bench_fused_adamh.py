"""AdamH: lvopt's two-pass fused step against lvopt AdamW on the same matrix and an eager
PyTorch AdamH (lvopt.reference, one tensor op at a time, as a user would write it).

Byte model: pass 1 reads W, g, m, v and writes m, v (24 B/param); pass 2 reads W, m, v and
writes W (16 B/param): 40 B/param in fp32. On the CPU, lvopt's step keeps u from pass 1 for
pass 2 (a workspace write, +4 B in pass 1, -4 B in pass 2: still 40 B, but 24 B read instead of
28; docs/design.md section 4); the "u recomputed" row is the same two passes as the two ops of
sharded AdamH, which recompute u, timed side by side.
"""

from __future__ import annotations

import os

import pytest

import lvopt
import torch

from harness import Case, Contender, hyper_table, make_params, optimizer_step

SIZES = {"small": (2048, 2048), "default": (8192, 8192)}


def recomputed_step(shape):
    """A contender factory: lvopt's CPU AdamH as its two pass ops (fused_adamh_reduce_, then
    fused_adamh_apply_ with the sums), which recompute u in pass 2 instead of keeping it."""

    def make():
        (p,) = make_params([shape], torch.float32)
        g, m, v = p.grad, torch.zeros_like(p), torch.zeros_like(p)
        step = torch.zeros((), dtype=torch.float32)
        radius = torch.linalg.vector_norm(p.detach(), dtype=torch.float64)
        hyper = hyper_table(lr=1e-3)
        ops = torch.ops.lvopt

        def run():
            sums = ops.fused_adamh_reduce_([p.detach()], [g], [m], [v], [step], hyper, None)
            ops.fused_adamh_apply_([p.detach()], [m], [v], [step], [radius], hyper, sums, None)

        return run

    return make


def cases(size: str = "default") -> list[Case]:
    shape = SIZES[size]
    n = shape[0] * shape[1]
    return [
        Case(
            "adamh",
            f"AdamH fp32, one {shape[0]}x{shape[1]} matrix",
            40 * n,
            [
                Contender("lvopt AdamH", optimizer_step(lambda ps: lvopt.AdamH(ps, lr=1e-3), [shape]), anchor=False),
                Contender("lvopt AdamH (u recomputed)", recomputed_step(shape), anchor=False),
                Contender(
                    "lvopt AdamW (same matrix)",
                    optimizer_step(lambda ps: lvopt.AdamW(ps, lr=1e-3), [shape]),
                    anchor=False,
                    bytes=28 * n,
                ),
                Contender(
                    "eager PyTorch AdamH",
                    optimizer_step(lambda ps: lvopt.AdamH(ps, lr=1e-3, backend="reference"), [shape]),
                    separate=True,  # seconds per step and gigabytes of temporaries: see Contender
                ),
            ],
        )
    ]


_ALL = [(c, k) for c in cases(os.environ.get("LVOPT_BENCH_SIZE", "small")) for k in c.contenders]


@pytest.mark.parametrize("case,contender", _ALL, ids=[f"{c.name}-{k.name}" for c, k in _ALL])
def test_step(benchmark, case, contender):
    step = contender.make()
    benchmark.extra_info["bytes"] = contender.bytes or case.bytes
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
