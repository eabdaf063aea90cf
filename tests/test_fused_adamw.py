"""lvopt::fused_adamw_ (csrc/cpu/fused_adamw.cpp) against the reference (lvopt/reference.py),
and the reference against an fp64 evaluation of docs/design.md section 2.1."""
import pytest
import torch

from lvopt import reference
from conftest import assert_close_at_list_scale, clone_all, make_hyper, make_state, needs_native, rel_err, run_python

SHAPES = [(1,), (7,), (33, 17), (65536 + 5,), (3, 4, 5), (0,), (129, 257)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(gen, dtype, maximize):
    ps, gs, ms, vs, ss = make_state(SHAPES, dtype, gen, steps=3)
    hyper = make_hyper(len(SHAPES), maximize=maximize, gen=gen)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    initial = [p.clone() for p in ps]
    for _ in range(3):
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper)
        reference.fused_adamw_(rp, rg, rm, rv, rs, hyper)
    assert_close_at_list_scale(ms, rm, 1e-6, "exp_avgs")
    assert_close_at_list_scale(vs, rv, 1e-6, "exp_avg_sqs")
    if dtype == torch.float32:
        assert_close_at_list_scale(ps, rp, 1e-6, "params")
    for p, p0, m, v, s, q, qm, qv, qs in zip(ps, initial, ms, vs, ss, rp, rm, rv, rs):
        assert float(s) == float(qs) == 6.0
        if p.numel() == 0:
            continue
        if dtype != torch.float32:
            # Same fp32 math, one bf16 rounding per step: at most one bf16 ulp apart per element.
            ulp = q.float().abs().clamp_min(1e-30) * 2.0**-7
            assert bool(((p.float() - q.float()).abs() <= ulp * 3).all())
        if dtype == torch.float32 or p.numel() > 100:  # a tiny bf16 step can round to nothing
            assert not torch.equal(p, p0)


def test_reference_matches_fp64_formula(gen):
    """The fp32 reference against the AdamW of docs/design.md section 2.1 evaluated in fp64 on the same inputs."""
    shape = (257, 31)
    p = torch.randn(shape, generator=gen)
    m = 0.1 * torch.randn(shape, generator=gen)
    v = 0.01 * torch.rand(shape, generator=gen) + 1e-6
    lr, b1, b2, wd, eps = 3e-3, 0.9, 0.95, 0.1, 1e-8
    hyper = make_hyper(1, lr=lr, betas=(b1, b2), wd=wd, eps=eps)
    P, M, Vv = p.double(), m.double(), v.double()
    step = torch.tensor(0.0)
    for t in range(1, 6):
        g = torch.randn(shape, generator=gen)
        reference.fused_adamw_([p], [g], [m], [v], [step], hyper)
        G = g.double()
        P = P * (1 - lr * wd)
        M = b1 * M + (1 - b1) * G
        Vv = b2 * Vv + (1 - b2) * G * G
        P = P - (lr / (1 - b1**t)) * M / (Vv.sqrt() / (1 - b2**t) ** 0.5 + eps)
    assert rel_err(p, P) < 1e-6 and rel_err(m, M) < 1e-6 and rel_err(v, Vv) < 1e-6


def test_reference_matches_torch_adamw(gen):
    p = torch.nn.Parameter(torch.randn(40, 30, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    opt = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
    m, v, s = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    hyper = make_hyper(1, lr=1e-2, wd=0.1)
    for _ in range(20):
        g = torch.randn(p.shape, generator=gen)
        q.grad = g.clone()
        opt.step()
        reference.fused_adamw_([p.data], [g], [m], [v], [s], hyper)
    assert rel_err(p, q) < 1e-6


@needs_native
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_isa_levels_give_identical_bits(isa):
    """Every ISA level computes the same bits (-ffp-contract=off, no reassociation)."""
    code = """
import torch, lvopt
from conftest import make_hyper, make_state
g = torch.Generator().manual_seed(5)
out = []
for dt in (torch.float32, torch.bfloat16):
    ps, gs, ms, vs, ss = make_state([(70001,), (33, 65)], dt, g, steps=2)
    torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, make_hyper(2, gen=g, maximize=True))
    out += [t.view(torch.int16 if dt == torch.bfloat16 else torch.int32).long().sum().item() for t in ps + ms + vs]
print(lvopt.build_info()["cpu_isa_active"], out)
"""
    import os
    env = {"PYTHONPATH": os.path.dirname(__file__)}
    best = run_python(code, env=env).split(" ", 1)
    lower = run_python(code, env={**env, "LVOPT_CPU_ISA": isa}).split(" ", 1)
    assert lower[0] == isa or best[0] == lower[0]
    assert best[1] == lower[1]


@needs_native
def test_thread_count_does_not_change_bits(gen):
    ps, gs, ms, vs, ss = make_state([(300001,), (512, 130)], torch.float32, gen)
    hyper = make_hyper(2, gen=gen)
    a = clone_all(ps, gs, ms, vs, ss)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.ops.lvopt.fused_adamw_(*a, hyper)
    finally:
        torch.set_num_threads(n)
    torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper)
    for x, y in zip(ps + ms + vs, a[0] + a[2] + a[3]):
        assert torch.equal(x, y)


@needs_native
def test_opcheck(gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11,)], torch.float32, gen)
    torch.library.opcheck(torch.ops.lvopt.fused_adamw_.default, (ps, gs, ms, vs, ss, make_hyper(2)))
    ps, gs, ms, vs, ss = make_state([(5, 7)], torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.lvopt.fused_adamw_.default, (ps, gs, ms, vs, ss, make_hyper(1)))


@needs_native
def test_compiles_with_torch_compile(gen):
    ps, gs, ms, vs, ss = make_state([(64, 3)], torch.float32, gen)
    hyper = make_hyper(1)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps, gs, ms, vs, ss, hyper):
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper)

    step(ps, gs, ms, vs, ss, hyper)
    torch.ops.lvopt.fused_adamw_(rp, rg, rm, rv, rs, hyper)
    assert torch.equal(ps[0], rp[0])


def _bad_cases(gen):
    ps, gs, ms, vs, ss = make_state([(4, 4), (6,)], torch.float32, gen)
    h = make_hyper(2)
    yield "grads\\[1\\] has shape", (ps, [gs[0], torch.randn(7)], ms, vs, ss, h)
    yield "grads\\[0\\] has dtype", (ps, [gs[0].double(), gs[1]], ms, vs, ss, h)
    yield "params\\[0\\] has dtype", ([ps[0].double(), ps[1]], [gs[0].double(), gs[1]], ms, vs, ss, h)
    yield "exp_avgs\\[1\\] has dtype", (ps, gs, [ms[0], ms[1].bfloat16()], vs, ss, h)
    yield "differ in length", (ps, gs[:1], ms, vs, ss, h)
    yield "hyper must be", (ps, gs, ms, vs, ss, h.float())
    bad = h.clone(); bad[1, 0] = -1.0
    yield "lr of tensor 1", (ps, gs, ms, vs, ss, bad)
    bad = h.clone(); bad[0, 1] = 1.0
    yield "beta1 of tensor 0", (ps, gs, ms, vs, ss, bad)
    bad = h.clone(); bad[1, 4] = 0.0
    yield "eps of tensor 1", (ps, gs, ms, vs, ss, bad)
    bad = h.clone(); bad[1, 3] = float("nan")
    yield "weight_decay of tensor 1", (ps, gs, ms, vs, ss, bad)
    yield "strides", (ps, [gs[0].t().contiguous().t(), gs[1]], ms, vs, ss, h)
    yield "SparseCPU", (ps, [gs[0].to_sparse(), gs[1]], ms, vs, ss, h)


@needs_native
def test_errors_write_nothing(gen):
    for pattern, args in _bad_cases(gen):
        before = [[t.clone() for t in lst] if isinstance(lst, list) else lst.clone() for lst in args]
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.lvopt.fused_adamw_(*args)
        for lst, old in zip(args, before):
            for t, o in zip(lst if isinstance(lst, list) else [lst], old if isinstance(old, list) else [old]):
                if t.layout == torch.strided and t.dtype == o.dtype:
                    assert torch.equal(t, o) or (t.isnan() == o.isnan()).all()
