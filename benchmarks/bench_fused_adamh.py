"""AdamH: lvopt's two-pass fused step against lvopt AdamW on the same matrix and an eager
PyTorch AdamH (lvopt.reference, one tensor op at a time, as a user would write it).

Byte model: pass 1 reads W, g, m, v and writes m, v (24 B/param); pass 2 reads W, m, v and
writes W (16 B/param): 40 B/param in fp32.
"""
from __future__ import annotations

import os

import pytest

import lvopt
from harness import Case, Contender, optimizer_step

SIZES = {"small": (2048, 2048), "default": (8192, 8192)}


def cases(size: str = "default") -> list[Case]:
    shape = SIZES[size]
    n = shape[0] * shape[1]
    return [Case("adamh", f"AdamH fp32, one {shape[0]}x{shape[1]} matrix", 40 * n, [
        Contender("lvopt AdamH", optimizer_step(lambda ps: lvopt.AdamH(ps, lr=1e-3), [shape]), anchor=False),
        Contender("lvopt AdamW (same matrix)", optimizer_step(lambda ps: lvopt.AdamW(ps, lr=1e-3), [shape]), anchor=False, bytes=28 * n),
        Contender("eager PyTorch AdamH", optimizer_step(lambda ps: lvopt.AdamH(ps, lr=1e-3, backend="reference"), [shape])),
    ])]


_ALL = [(c, k) for c in cases(os.environ.get("LVOPT_BENCH_SIZE", "small")) for k in c.contenders]


@pytest.mark.parametrize("case,contender", _ALL, ids=[f"{c.name}-{k.name}" for c, k in _ALL])
def test_step(benchmark, case, contender):
    step = contender.make()
    benchmark.extra_info["bytes"] = contender.bytes or case.bytes
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
