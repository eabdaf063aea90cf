"""The Triton dense step after the first (lvopt/_fast_step.py, lvopt/triton/_plan.py): it gives
what the full step gives, bit for bit (AdamW fp32/bf16, AMSGrad, AdamH, nonfinite="skip" with a
NaN, a float lr changed every step, a tensor lr, moved gradients, a gradient gone); the setup
kernel's coefficients and counters equal torch's fp64 arithmetic bit for bit; and the host work
of a step does not grow with the number of tensors (a count of Python-level calls, not a time).
On CUDA tensors with a GPU, else on CPU tensors under TRITON_INTERPRET=1 in a child pytest
(tests/_triton_support.py)."""

import os
import sys

import pytest
import torch
from torch import nn

from _triton_support import IN_CHILD, run_file_under_interpreter, triton_device

DEV = triton_device()
needs_triton_device = pytest.mark.skipif(DEV is None, reason="no GPU: these run in the interpreter child")

if not IN_CHILD:

    def test_interpreter_in_child():
        run_file_under_interpreter(__file__)


SHAPES = [(33, 17), (7,), (16384 + 1029,), (5, 4), (1,), (0,)]


def _params(gen, dtype=torch.float32, shapes=SHAPES):
    return [nn.Parameter(torch.randn(s, generator=gen).to(device=DEV, dtype=dtype)) for s in shapes]


def _make(cls_name, ps, case):
    import lvopt

    kw = dict(lr=1e-2, backend="triton")
    if case == "amsgrad":
        kw["amsgrad"] = True
    if case == "skip":
        kw["nonfinite"] = "skip"
    if case == "capturable":
        kw["capturable"] = True
    if cls_name == "AdamH":
        groups = [
            {"params": [p for p in ps if p.dim() >= 2]},
            {"params": [p for p in ps if p.dim() < 2], "hyperball": False, "weight_decay": 0.1},
        ]
        return lvopt.AdamH(groups, **kw)
    groups = [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0}]
    return lvopt.AdamW(groups, weight_decay=0.1, **kw)


@needs_triton_device
@pytest.mark.parametrize(
    "cls_name,case,dtype",
    [
        ("AdamW", "plain", torch.float32),
        ("AdamW", "plain", torch.bfloat16),
        ("AdamW", "amsgrad", torch.float32),
        ("AdamW", "skip", torch.float32),
        ("AdamW", "sched", torch.float32),
        ("AdamW", "tensor_lr", torch.float32),
        ("AdamW", "capturable", torch.float32),
        ("AdamH", "plain", torch.float32),
        ("AdamH", "skip", torch.bfloat16),
        ("AdamH", "sched", torch.float32),
    ],
)
def test_fast_step_equals_full_step(gen, cls_name, case, dtype):
    """Two optimizers on equal parameters: one takes the steady-state path after its first step
    (checked: the same FastStep object steps), the other the full step every time (its FastStep
    dropped before each step). Gradients re-allocated, kept, NaN (skip), a float lr changed
    every step (sched), a device-tensor lr changed in place, a gradient set to None and then
    back (the full step runs both times, then the new FastStep): every parameter and state tensor bit for bit equal."""
    ps = _params(gen, dtype)
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    fast, full = _make(cls_name, ps, case), _make(cls_name, qs, case)
    if case == "tensor_lr":
        for o in (fast, full):
            o.param_groups[1]["lr"] = torch.full((), 1e-2, device=DEV)
    for k in range(8):
        grads = [torch.randn(p.shape, generator=gen).to(device=DEV, dtype=dtype) for p in ps]
        if case == "skip" and k == 3:
            grads[2].view(-1)[5] = float("nan")
        gone = k == 5
        for i, (p, q, g) in enumerate(zip(ps, qs, grads)):
            if k == 2:  # the gradients stay where they were (zero_grad(set_to_none=False))
                p.grad.copy_(g)
                q.grad.copy_(g)
            else:
                p.grad, q.grad = g, g.clone()
            if gone and i == 1:
                p.grad = q.grad = None
        if case == "sched":
            for o in (fast, full):
                o.param_groups[0]["lr"] = 1e-2 * (1 - 0.1 * k)
        if case == "tensor_lr":
            for o in (fast, full):
                o.param_groups[1]["lr"].fill_(1e-2 * (1 + 0.2 * k))
        before = fast._fast
        full._fast = None
        fast.step()
        full.step()
        if k in (1, 2, 3, 4, 7):
            assert before is not None and fast._fast is before, k  # the steady-state path stepped
        if k in (5, 6):
            assert fast._fast is not before, k  # a gradient gone, then back: the full step ran
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
            for key, v in full.state[q].items():
                assert torch.equal(fast.state[p][key], v), key
    assert fast.skipped_steps == full.skipped_steps == (1 if case == "skip" else 0)
    assert float(fast.state[ps[0]]["step"]) == (7 if case == "skip" else 8)


@needs_triton_device
def test_no_fast_step_for_a_step_with_sharded_parameters(gen, monkeypatch):
    """A step with FSDP2 shards (DTensor parameters, whose AdamH sums are all-reduced between the
    two ops of lvopt/_shards.py) gets no steady-state step: the full step tells
    _fast_step.build (sharded=True) and it returns None, where the same step unsharded gets a
    FastStep."""
    from lvopt import _fast_step

    real, calls = _fast_step.build, []

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(_fast_step, "build", spy)
    ps = _params(gen)
    opt = _make("AdamH", ps, "plain")
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(DEV)
    opt.step()
    assert opt._fast is not None and len(calls) == 1
    o, batches, items, sparse_items, to_flush, sharded = calls[0]
    assert sharded is False  # no DTensor among these parameters
    assert real(o, batches, items, sparse_items, to_flush, True) is None


@needs_triton_device
@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unit_step", [False, True])
def test_setup_kernel_equals_torch_fp64(gen, step_dtype, unit_step):
    """adam_setup_kernel (counters advanced in their dtype; bias corrections and coefficients in
    fp64 with the power by double-double squaring, rounded once to fp32) against the same
    arithmetic in torch fp64 on the host (C.advance_steps: torch.pow): equal bit for bit, for 300
    tensors (three programs) with betas from 0 to 0.9999 and steps from 0 to 2^24 - 2; with a
    set found_inf the counters stay."""
    from lvopt.triton import _common as C
    from lvopt.triton import _plan as P

    n = 300
    u = torch.rand(n, 6, generator=gen, dtype=torch.float64)
    betas = torch.tensor([0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 0.9999], dtype=torch.float64)
    hyper = torch.stack(
        [
            u[:, 0] * 1e-2,
            torch.where(u[:, 1] < 0.5, betas[torch.arange(n) % 7], u[:, 1]),
            torch.where(u[:, 2] < 0.5, betas[(torch.arange(n) * 3) % 7], u[:, 2]),
            u[:, 3] * 0.2,
            u[:, 4] * 1e-6 + 1e-12,
            (u[:, 5] < 0.3).double(),
        ],
        1,
    ).contiguous()
    big = torch.tensor([0, 1, 2, 9, 99, 999, 12345, 2**20 + 7, 2**24 - 2], dtype=torch.float64)
    start = torch.where(torch.arange(n) < 100, torch.arange(n).double() % 12, big[torch.arange(n) % 9])
    ps = [torch.zeros(1, device=DEV) for _ in range(n)]
    for found in (None, torch.zeros(1, device=DEV), torch.ones(1, device=DEV)):
        steps = [torch.tensor(float(s), dtype=step_dtype, device=DEV) for s in start]
        ref_steps = [s.clone().cpu() for s in steps]
        plan = P.plan_for(ps, ps, ps, ps, steps)
        assert plan.step_tab is not None
        coef = plan.advance(steps, hyper.to(DEV), unit_step, found)
        ref = C.advance_steps(ref_steps, hyper, torch.device("cpu"), unit_step, None if found is None else found.cpu())
        assert torch.equal(torch.stack(steps).cpu(), torch.stack(ref_steps))
        if found is not None and float(found):
            assert torch.equal(torch.stack(steps).cpu(), start.to(step_dtype))
            continue
        assert torch.equal(coef.cpu(), ref), (coef.cpu() != ref).nonzero()[:5]


def _stub_kernels(monkeypatch):
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "studies")
    )
    import host_triton_step

    launches = []
    from lvopt.triton import _plan as P
    from lvopt.triton import fused_adamh as H
    from lvopt.triton import fused_adamw as W

    for mod in (W, H, P):
        for name in host_triton_step.KERNELS[mod.__name__]:
            monkeypatch.setattr(mod, name, getattr(mod, name))  # restored after the test
    host_triton_step.stub_kernels(launches)
    return launches


class _Calls:
    """Counts Python function calls and calls of C functions from Python (every torch op the
    step calls from Python is one) while active: sys.setprofile."""

    def __init__(self):
        self.n = 0

    def __call__(self, frame, event, arg):
        if event in ("call", "c_call"):
            self.n += 1

    def __enter__(self):
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


@pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (CPU tensors, launches recorded)")
@pytest.mark.parametrize(
    "cls_name,case",
    [
        ("AdamW", "plain"),
        ("AdamW", "moved"),
        ("AdamW", "sched"),
        ("AdamW", "skip"),
        ("AdamW", "capturable"),
        ("AdamW", "amsgrad"),
        ("AdamH", "plain"),
        ("AdamH", "moved"),
    ],
)
def test_host_work_per_step_does_not_grow_with_tensors(monkeypatch, cls_name, case):
    """The host work of a step after the first, counted (Python calls and calls into C from
    Python, sys.setprofile) with the kernel launches recorded: the same count for 12 and for
    120 tensors, with the gradients kept, re-allocated (moved), a float lr changed every step
    (sched), nonfinite="skip", capturable=True, AMSGrad, AdamH. (The full step makes ~25 calls
    per tensor; a count that grew by one call per tensor would differ by 108.)"""
    launches = _stub_kernels(monkeypatch)
    counts = {}
    for n in (12, 120):
        shapes = [(3 + i % 5, 4) if i % 2 else (5 + i,) for i in range(n)]
        ps = [nn.Parameter(torch.ones(s)) for s in shapes]  # finite: AdamH checks its radii ||W_0||
        for p in ps:
            p.grad = torch.empty(p.shape)
        opt = _make(cls_name, ps, "plain" if case in ("moved", "sched") else case)
        lr = iter([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])

        def prepare(ps=ps, opt=opt, lr=lr):
            if case == "moved":
                for p in ps:
                    p.grad = torch.empty(p.shape)
            if case == "sched":
                opt.param_groups[0]["lr"] = next(lr)

        for _ in range(2):
            prepare()
            opt.step()
        assert opt._fast is not None
        prepare()
        del launches[:]
        with _Calls() as c:
            opt.step()
        counts[n] = (c.n, len(launches))
        with _Calls() as full:
            opt._fast = None
            opt.step()
        assert full.n > c.n + 10 * n  # the full step does per-tensor work; the count sees it
    assert counts[12] == counts[120], counts


@needs_triton_device
@pytest.mark.parametrize("found", [None, 0.0, 1.0])
def test_counters_the_setup_kernel_cannot_take_use_torch_ops(gen, found):
    """Step counters of mixed dtypes (an fp64 one among fp32 ones) get no step table: the plan
    advances them and computes the coefficients with torch ops (C.advance_steps), and the op
    still equals the reference; with a set found_inf nothing is written."""
    from conftest import assert_close_at_list_scale, make_hyper, make_state

    import lvopt.triton as T
    from lvopt import reference
    from lvopt.triton import _plan as P

    ps, gs, ms, vs, ss = make_state([(33, 17), (7,)], torch.float32, gen, steps=3)
    ss[1] = ss[1].double()
    ps, gs, ms, vs, ss = ([t.to(DEV) for t in lst] for lst in (ps, gs, ms, vs, ss))
    hyper = make_hyper(2, gen=gen)
    r = [[t.cpu().clone() for t in lst] for lst in (ps, gs, ms, vs, ss)]
    flag = None if found is None else torch.full((1,), found, device=DEV)
    assert P.plan_for(ps, gs, ms, vs, ss).step_tab is None
    T.fused_adamw_(ps, gs, ms, vs, ss, hyper.to(DEV), *(() if flag is None else (flag,)))
    rflag = None if found is None else torch.full((1,), found)
    reference.fused_adamw_(*r, hyper, rflag)
    for got, ref, what in zip((ps, ms, vs), (r[0], r[2], r[3]), ("params", "exp_avgs", "exp_avg_sqs")):
        assert_close_at_list_scale([t.cpu() for t in got], ref, 1e-6, what)
    assert [float(s) for s in ss] == ([3.0, 3.0] if found == 1.0 else [4.0, 4.0])
