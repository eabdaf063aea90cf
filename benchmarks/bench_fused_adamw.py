"""Dense AdamW: lvopt (fp32, bf16) against torch.optim.AdamW fused/foreach and DeepSpeedCPUAdam.

Byte model (docs/design.md section 4): fp32 28 B/param (read p, g, m, v; write p, m, v); bf16
params and grads with fp32 moments 22 B/param; torch's bf16 AdamW keeps bf16 moments, 14 B/param.
`pytest benchmarks/bench_fused_adamw.py` runs the pytest-benchmark version (LVOPT_BENCH_SIZE).
"""

from __future__ import annotations

import os

import pytest
import torch

import lvopt
from harness import Case, Contender, deepspeed_adam, gpt2_groups, gpt2_small_shapes, optimizer_step

SIZES = {
    "small": dict(n=4 << 20, gpt2=dict(V=8192, L=2, ctx=256)),
    "default": dict(n=64 << 20, gpt2=dict()),
}


def _contenders(shapes, groups=None, dtype=torch.float32, track=False):
    kw = dict(lr=1e-3, weight_decay=0.1)
    extra = []
    if track:
        extra = [
            Contender(
                "lvopt AdamW track=True",
                optimizer_step(lambda ps: lvopt.AdamW(ps, track=True, **kw), shapes, dtype, groups),
                anchor=False,
            )
        ]
    return [
        Contender("lvopt AdamW", optimizer_step(lambda ps: lvopt.AdamW(ps, **kw), shapes, dtype, groups), anchor=False),
        *extra,
        Contender(
            "torch AdamW fused",
            optimizer_step(lambda ps: torch.optim.AdamW(ps, fused=True, **kw), shapes, dtype, groups),
        ),
        Contender(
            "torch AdamW foreach",
            optimizer_step(lambda ps: torch.optim.AdamW(ps, foreach=True, **kw), shapes, dtype, groups),
        ),
        Contender(
            "DeepSpeedCPUAdam",
            optimizer_step(lambda ps: deepspeed_adam()(ps, adamw_mode=True, **kw), shapes, dtype, groups),
            per_isa=lambda isa: optimizer_step(
                lambda ps: deepspeed_adam(isa)(ps, adamw_mode=True, **kw), shapes, dtype, groups
            ),
        ),
    ]


def _huge_pages(cls, params, **kw):
    """An optimizer whose CPU moments are allocated on transparent huge pages (its state is
    created by its first step, so every step runs with lvopt/_memory.py switched on)."""
    from lvopt import _memory

    opt = cls(params, **kw)
    step = opt.step

    def huge_pages_step(*args, **kwargs):
        was, _memory.ENABLED = _memory.ENABLED, True
        try:
            return step(*args, **kwargs)
        finally:
            _memory.ENABLED = was

    opt.step = huge_pages_step
    return opt


def cases(size: str = "default") -> list[Case]:
    cfg = SIZES[size]
    n = cfg["n"]
    gshapes = gpt2_small_shapes(**cfg["gpt2"])
    gn = sum(torch.Size(s).numel() for s in gshapes)
    kw = dict(lr=1e-3, weight_decay=0.1)
    bf16 = [
        Contender(
            "lvopt AdamW bf16", optimizer_step(lambda ps: lvopt.AdamW(ps, **kw), [(n,)], torch.bfloat16), anchor=False
        ),
        Contender(
            "lvopt AdamW fp32", optimizer_step(lambda ps: lvopt.AdamW(ps, **kw), [(n,)]), anchor=False, bytes=28 * n
        ),
        Contender(
            "torch AdamW fused bf16",
            optimizer_step(lambda ps: torch.optim.AdamW(ps, fused=True, **kw), [(n,)], torch.bfloat16),
            bytes=14 * n,
        ),
        # lvopt's CPU moments on transparent huge pages (lvopt/_memory.py, off by default): what they buy.
        Contender(
            "lvopt AdamW bf16 (huge pages)",
            optimizer_step(lambda ps: _huge_pages(lvopt.AdamW, ps, **kw), [(n,)], torch.bfloat16),
            anchor=False,
        ),
    ]
    return [
        Case(
            "adamw_1x", f"AdamW fp32, one tensor of {n / 2**20:.0f}Mi params", 28 * n, _contenders([(n,)], track=True)
        ),
        Case(
            "adamw_gpt2",
            f"AdamW fp32, GPT-2-small list ({gn / 1e6:.0f}M params, {len(gshapes)} tensors, 4 groups)",
            28 * gn,
            _contenders(gshapes, gpt2_groups, track=True),
        ),
        # nonfinite="skip" reads the gradients once more inside the op: 32 B/param instead of 28.
        Case(
            "adamw_nonfinite",
            f"AdamW fp32, one tensor of {n / 2**20:.0f}Mi: nonfinite policy",
            28 * n,
            [
                Contender(
                    "lvopt AdamW propagate", optimizer_step(lambda ps: lvopt.AdamW(ps, **kw), [(n,)]), anchor=False
                ),
                Contender(
                    "lvopt AdamW skip",
                    optimizer_step(lambda ps: lvopt.AdamW(ps, nonfinite="skip", **kw), [(n,)]),
                    anchor=False,
                    bytes=32 * n,
                ),
                Contender(
                    "torch AdamW fused", optimizer_step(lambda ps: torch.optim.AdamW(ps, fused=True, **kw), [(n,)])
                ),
            ],
        ),
        Case("adamw_bf16", f"AdamW bf16 params/grads, fp32 moments, one tensor of {n / 2**20:.0f}Mi", 22 * n, bf16),
    ]


_SIZE = os.environ.get("LVOPT_BENCH_SIZE", "small")
_ALL = [(c, k) for c in cases(_SIZE) for k in c.contenders]


@pytest.mark.parametrize("case,contender", _ALL, ids=[f"{c.name}-{k.name}" for c, k in _ALL])
def test_step(benchmark, case, contender):
    try:
        step = contender.make()
    except ImportError as e:
        pytest.skip(str(e))
    benchmark.extra_info["bytes"] = contender.bytes or case.bytes
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
