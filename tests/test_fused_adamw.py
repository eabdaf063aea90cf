"""lvopt::fused_adamw_ on every backend (the ``backend`` fixture of conftest.py: the CPU kernel
csrc/cpu/fused_adamw.cpp, the Triton kernel lvopt/triton/fused_adamw.py, the CUDA kernel)
against the reference (lvopt/reference.py), and the reference against an fp64 evaluation of
docs/design.md section 2.1 and against torch.optim.AdamW."""

import os

import pytest
import torch

from conftest import (
    IN_TRITON_CHILD,
    assert_bf16_step_close,
    assert_close_at_list_scale,
    assert_unchanged,
    clone_all,
    make_hyper,
    make_state,
    needs_cuda_kernels,
    needs_native,
    rel_err,
    restart_reference_from,
    run_python,
    run_triton_child,
    single_threaded_on_cpu,
)
from lvopt import reference

# Per backend: odd sizes (scalar tails), tensors spanning several chunks with a partial last
# tile, an empty tensor; kept small for the interpreter.
SHAPES = {
    "cpu": [(1,), (7,), (33, 17), (65536 + 5,), (3, 4, 5), (0,), (129, 257)],
    "triton": [(1,), (7,), (33, 17), (2 * 16384 + 1029,), (3, 4, 5), (0,)],
    "cuda": [(1,), (7,), (33, 17), (3 * 16384 + 5,), (3, 4, 5), (0,), (129, 257)],
}
STEPS = {"cpu": 3, "triton": 2, "cuda": 3}
DETERMINISM_SHAPES = {
    "cpu": [(300001,), (512, 130)],
    "triton": [(2 * 16384 + 1029,), (129, 130)],
    "cuda": [(300001,), (512, 130)],
}
# Relative tolerance of the track=True sums (||w||^2, ||dw||^2) per backend. The CPU kernel adds
# 16 squares per lane in fp32 before the fp64 lane sums (csrc/cpu/multi_tensor.h, kTrackBlock):
# relative error <= 16 * 2^-24 = 1e-6 of a sum of positive terms (1.2e-7 was seen: seed 340526402).
STATS_REL = {"cpu": (1e-6, 1e-6), "triton": (1e-12, 1e-10), "cuda": (1e-7, 1e-7)}

if not IN_TRITON_CHILD:

    def test_triton_in_interpreter_child():
        run_triton_child(__file__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("device_state", [False, True])
def test_matches_reference(backend, gen, dtype, maximize, device_state):
    """``device_state``: step counters and hyper table on the CUDA device (the capturable form)."""
    if device_state and backend.name != "cuda":
        pytest.skip("device-resident step counters and hyper table: the CUDA kernels' case")
    shapes = SHAPES[backend.name]
    ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=3)
    hyper = make_hyper(len(shapes), maximize=maximize, gen=gen)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    hyper_k = hyper
    if device_state:
        ss, hyper_k = [s.to(backend.device) for s in ss], hyper.to(backend.device)
    initial = [p.clone() for p in ps]
    # A bf16 parameter is compared one step at a time from the kernel's state
    # (conftest.assert_bf16_step_close): the kernel and the reference's torch ops may round the
    # fp32 terms differently by an ulp (GPU compilers contract a*b+c into FMAs; torch's own CPU
    # kernels vectorise with FMAs too), which can flip one bf16 rounding, and over several steps
    # such a one-ulp difference at a large |p| outlives a later crossing of zero (seed 2016959319
    # failed that way on the CPU backend).
    one_step = dtype == torch.bfloat16
    for _ in range(STEPS[backend.name]):
        if one_step:
            before = restart_reference_from(rp, ps)
        backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper_k)
        reference.fused_adamw_(rp, rg, rm, rv, rs, hyper)
    assert_close_at_list_scale(ms, rm, 1e-6, "exp_avgs")
    assert_close_at_list_scale(vs, rv, 1e-6, "exp_avg_sqs")
    if dtype == torch.float32:
        assert_close_at_list_scale(ps, rp, 1e-6, "params")
    for i, (p, p0, s, q, qs) in enumerate(zip(ps, initial, ss, rp, rs)):
        assert float(s) == float(qs) == 3.0 + STEPS[backend.name]
        if p.numel() == 0:
            continue
        p, p0 = p.cpu(), p0.cpu()
        if one_step:
            assert_bf16_step_close(p, q, before[i])
        if dtype == torch.float32 or p.numel() > 100:  # a tiny bf16 step can round to nothing
            assert not torch.equal(p, p0)


# AMSGrad (max_exp_avg_sqs): odd sizes, one tensor across chunks, an empty one.
AMSGRAD_SHAPES = {
    "cpu": [(1,), (33, 17), (65536 + 3,), (0,)],
    "triton": [(1,), (7,), (33, 17), (16384 + 1029,), (0,)],
    "cuda": [(1,), (33, 17), (3 * 16384 + 5,), (0,), (7, 3)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amsgrad_matches_reference(backend, gen, dtype):
    """fused_adamw_ with max_exp_avg_sqs against the reference (on CUDA with the step counters and
    hyper table on the device, the capturable form); the maximum includes this step's v; opcheck."""
    shapes = AMSGRAD_SHAPES[backend.name]
    ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=2)
    xs = [v * 2 * torch.rand(v.shape, generator=gen) for v in vs]  # half above v, half below
    hyper = make_hyper(len(shapes), gen=gen)
    rp, rg, rm, rv, rs, rx = clone_all(ps, gs, ms, vs, ss, xs)
    ps, gs, ms, vs, xs = backend.to((ps, gs, ms, vs, xs))
    hyper_k = hyper
    if backend.name == "cuda":
        ss, hyper_k = [s.to(backend.device) for s in ss], hyper.to(backend.device)
    before = [p.clone() for p in ps]
    backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper_k, max_exp_avg_sqs=xs)
    reference.fused_adamw_(rp, rg, rm, rv, rs, hyper, max_exp_avg_sqs=rx)
    assert_close_at_list_scale(xs, rx, 1e-6, "max_exp_avg_sqs")
    assert_close_at_list_scale(vs, rv, 1e-6, "exp_avg_sqs")
    if dtype == torch.float32:
        assert_close_at_list_scale(ps, rp, 1e-6, "params")
    else:
        for p, q, p0 in zip(ps, rp, before):
            assert_bf16_step_close(p.float(), q.float(), p0.float())
    for x, v in zip(xs, vs):
        assert torch.equal(x, torch.maximum(x, v))  # the maximum includes this step's v
    torch.library.opcheck(
        backend.op("fused_adamw_"),
        (ps[:3], gs[:3], ms[:3], vs[:3], ss[:3], hyper_k[:3].contiguous()),
        {"max_exp_avg_sqs": xs[:3]},
    )


def test_amsgrad_nan_propagates_into_the_maximum(backend):
    """NaN enters the running maximum from either side, as torch.maximum."""
    p, g, m, s = torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(())
    v, x = torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, float("nan")])
    ((p, g, m, v, x),) = backend.to(([p, g, m, v, x],))
    backend.ops.fused_adamw_([p], [g], [m], [v], [s], make_hyper(1), max_exp_avg_sqs=[x])
    assert torch.isnan(x).all()


def test_amsgrad_errors_write_nothing(backend, gen):
    ps, gs, ms, vs, ss = make_state([(3, 5), (7,)], torch.float32, gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    xs = [torch.rand_like(v) for v in vs]
    hyper = make_hyper(2)
    before = [t.clone() for t in ps + ms + vs + ss + xs]
    for pattern, arg in [
        (r"max_exp_avg_sqs has 1 tensors, params has 2", xs[:1]),
        (r"max_exp_avg_sqs\[1\] has dtype", [xs[0], xs[1].double()]),
        (r"max_exp_avg_sqs\[0\] has shape", [xs[1], xs[1]]),
    ]:
        with pytest.raises(RuntimeError, match=pattern):
            backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper, max_exp_avg_sqs=arg)
    for a, b in zip(before, ps + ms + vs + ss + xs):
        assert torch.equal(a, b)


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
    """Every CPU ISA level computes the same bits (-ffp-contract=off, no reassociation)."""
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
    env = {"PYTHONPATH": os.path.dirname(__file__)}
    best = run_python(code, env=env).split(" ", 1)
    lower = run_python(code, env={**env, "LVOPT_CPU_ISA": isa}).split(" ", 1)
    assert lower[0] == isa or best[0] == lower[0]
    assert best[1] == lower[1]


def test_deterministic(backend, gen):
    """The same inputs give the same bits: on the CPU with one thread against all of them, on a
    device twice."""
    shapes = DETERMINISM_SHAPES[backend.name]
    ps, gs, ms, vs, ss = make_state(shapes, torch.float32, gen)
    hyper = make_hyper(len(shapes), gen=gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    a = clone_all(ps, gs, ms, vs, ss)
    single_threaded_on_cpu(backend, backend.ops.fused_adamw_, *a, hyper)
    backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper)
    for x, y in zip(ps + ms + vs, a[0] + a[2] + a[3]):
        assert torch.equal(x, y)


def test_misaligned_views(backend, gen):
    """A view at a 4-byte offset cannot use 16-byte vectors (the Triton and CUDA kernels take
    their unhinted/scalar path); results are unchanged."""
    base = [torch.randn(16384 + 9, generator=gen) for _ in range(4)]
    p, g, m, v = (b[1:] for b in base)
    v = v.abs() + 1e-6
    ps, gs, ms, vs, ss = [p], [g], [m], [v], [torch.tensor(2.0)]
    r = clone_all(ps, gs, ms, vs, ss)
    hyper = make_hyper(1, gen=gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper)
    reference.fused_adamw_(*r, hyper)
    assert rel_err(ps[0].cpu(), r[0][0]) < 1e-6 and rel_err(vs[0].cpu(), r[3][0]) < 1e-6


def test_triton_launch_tables_are_reused_only_for_the_same_tensors(triton_backend, gen):
    """Launch tables are cached by the parameters' and moments' addresses, sizes and dtypes, not
    by the gradients' (zero_grad(set_to_none=True) re-allocates those): new gradients reuse the
    tables with their address column rewritten in place; another parameter or moment gets its
    own tables; steps through reused tables still match the reference."""
    from lvopt.triton import _common as C

    backend = triton_backend
    ps, gs, ms, vs, ss = make_state([(40, 3), (17,)], torch.float32, gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    first = C.first_chunks(ps)[0]
    plan = C.launches(ps, gs, ms, vs, first)
    assert C.launches(ps, gs, ms, vs, first) is plan
    other = [gs[0], gs[1].clone()]  # a gradient at another address: same tables, new column
    meta = plan[0][2]
    assert C.launches(ps, other, ms, vs, first) is plan and plan[0][2] is meta
    assert torch.equal(C._build_launches(ps, other, ms, vs, first, [None, None]).launches[0][2], meta)
    plan3 = C.launches(ps, gs, [ms[0], ms[1].clone()], vs, first)  # a moment elsewhere: new tables
    assert plan3 is not plan and not torch.equal(plan3[0][2], plan[0][2])
    r = clone_all([p.cpu() for p in ps], [g.cpu() for g in gs], [m.cpu() for m in ms], [v.cpu() for v in vs], ss)
    hyper = make_hyper(2, gen=gen)
    for k in range(3):  # the second and third steps run from the cached tables, with new gradients
        gs = [g.clone() * (k + 1) for g in gs]
        r[1] = [g.cpu() for g in gs]
        backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper)
        reference.fused_adamw_(*r, hyper)
    for p, q in zip(ps, r[0]):
        assert rel_err(p.cpu(), q) < 1e-6


def test_opcheck(backend, gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11,)], torch.float32, gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    torch.library.opcheck(backend.op("fused_adamw_"), (ps, gs, ms, vs, ss, make_hyper(2)))
    ps, gs, ms, vs, ss = make_state([(5, 7)], torch.bfloat16, gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    torch.library.opcheck(backend.op("fused_adamw_"), (ps, gs, ms, vs, ss, make_hyper(1)))


def test_compiles_with_torch_compile(backend, gen):
    ps, gs, ms, vs, ss = make_state([(64, 3)], torch.float32, gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    hyper = make_hyper(1)
    r = clone_all(ps, gs, ms, vs, ss)
    op = backend.ops.fused_adamw_

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps, gs, ms, vs, ss, hyper):
        op(ps, gs, ms, vs, ss, hyper)

    step(ps, gs, ms, vs, ss, hyper)
    op(*r, hyper)
    assert torch.equal(ps[0], r[0][0])


def _bad_cases(backend, gen):
    """(error pattern, arguments) of fused_adamw_; every backend gives the same messages (the
    native checks are csrc/include/lvopt/step_args.h, Triton's Python ones say the same)."""
    ps, gs, ms, vs, ss = make_state([(4, 4), (6,)], torch.float32, gen)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    h = make_hyper(2)
    yield "grads\\[1\\] has shape", (ps, [gs[0], torch.randn(7, device=backend.device)], ms, vs, ss, h)
    yield "grads\\[0\\] has dtype", (ps, [gs[0].double(), gs[1]], ms, vs, ss, h)
    yield "params\\[0\\] has dtype", ([ps[0].double(), ps[1]], [gs[0].double(), gs[1]], ms, vs, ss, h)
    yield "differ in length", (ps, gs[:1], ms, vs, ss, h)
    yield "hyper must be", (ps, gs, ms, vs, ss, h.float())
    bad = h.clone()
    bad[1, 0] = -1.0
    yield "lr of tensor 1", (ps, gs, ms, vs, ss, bad)
    yield "strides", (ps, [gs[0].t().contiguous().t(), gs[1]], ms, vs, ss, h)
    if backend.name == "cpu":
        yield "exp_avgs\\[1\\] has dtype", (ps, gs, [ms[0], ms[1].bfloat16()], vs, ss, h)
        bad = h.clone()
        bad[0, 1] = 1.0
        yield "beta1 of tensor 0", (ps, gs, ms, vs, ss, bad)
        bad = h.clone()
        bad[1, 4] = 0.0
        yield "eps of tensor 1", (ps, gs, ms, vs, ss, bad)
        bad = h.clone()
        bad[1, 3] = float("nan")
        yield "weight_decay of tensor 1", (ps, gs, ms, vs, ss, bad)
        yield "SparseCPU", (ps, [gs[0].to_sparse(), gs[1]], ms, vs, ss, h)


def _assert_errors_write_nothing(backend, gen):
    for pattern, args in _bad_cases(backend, gen):
        before = [[t.clone() for t in lst] if isinstance(lst, list) else lst.clone() for lst in args]
        with pytest.raises(RuntimeError, match=pattern):
            backend.ops.fused_adamw_(*args)
        for lst, old in zip(args, before):
            for t, o in zip(lst if isinstance(lst, list) else [lst], old if isinstance(old, list) else [old]):
                if t.layout == torch.strided and t.dtype == o.dtype:
                    assert torch.equal(t, o) or (t.isnan() == o.isnan()).all()


def test_errors_write_nothing(backend, gen):
    """With lvopt._C built the Triton op runs the native checks too (lvopt/triton/_common.py)."""
    _assert_errors_write_nothing(backend, gen)


def test_triton_python_checks_give_the_same_errors(triton_backend, gen, monkeypatch):
    """The Triton op's own Python checks (used when lvopt._C is not built) raise what the native ones do."""
    from lvopt.triton import _common as C

    monkeypatch.setattr(C, "_native_check", lambda: None)
    _assert_errors_write_nothing(triton_backend, gen)


def test_optimizer_matches_torch(backend, gen):
    """lvopt.AdamW(backend=...) end to end against torch.optim.AdamW."""
    import lvopt

    w = torch.randn(40, 30, generator=gen).to(backend.device)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = lvopt.AdamW([p], lr=1e-2, weight_decay=0.1, backend=backend.name)
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(40, 30, generator=gen).to(backend.device)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert rel_err(p.cpu(), q.cpu()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_and_found_inf(backend, gen, dtype):
    """track=True sums and the found_inf protocol of fused_adamw_ and fused_adamh_, as the reference."""
    shapes = SHAPES[backend.name]
    ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=3)
    hyper = make_hyper(len(shapes), gen=gen)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    before = [p.clone() for p in ps]
    stats = torch.full((len(shapes), 2), 5.0, dtype=torch.float64, device=backend.device)
    found = torch.zeros(1, device=backend.device)
    backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper, found, stats)
    assert float(found) == 0.0
    ref_stats = torch.empty(len(shapes), 2, dtype=torch.float64)
    reference.fused_adamw_(rp, rg, rm, rv, rs, hyper, None, ref_stats)
    # Triton sums in fp64 per element; the native kernels' bound is tests/test_telemetry.py's.
    rel_w, rel_dw = STATS_REL[backend.name]
    for i, (p, b) in enumerate(zip(ps, before)):
        b64, p64 = b.cpu().double(), p.cpu().double()
        assert float(stats[i, 0]) == pytest.approx(float((b64 * b64).sum()), rel=rel_w, abs=1e-300)
        assert float(stats[i, 1]) == pytest.approx(float(((p64 - b64) ** 2).sum()), rel=rel_dw, abs=1e-300)
    # A non-finite gradient: nothing written, the flag set.
    snap = clone_all(ps, ms, vs, ss)
    gs[3][100] = float("inf")
    backend.ops.fused_adamw_(ps, gs, ms, vs, ss, hyper, found)
    assert float(found) == 1.0
    assert_unchanged((ps, ms, vs, ss), snap)
    radii = [torch.tensor(1.0, dtype=torch.float64) for _ in shapes]
    found.zero_()
    out = backend.ops.fused_adamh_(ps, gs, ms, vs, ss, radii, make_hyper(len(shapes), wd=0.0), found)
    assert float(found) == 1.0 and not out.any()
    assert_unchanged((ps, ms, vs, ss), snap)


def test_optimizer_track_and_skip(backend, gen):
    import lvopt

    p = torch.nn.Parameter(torch.randn(40, 30, generator=gen).to(backend.device))
    opt = lvopt.AdamW([p], lr=1e-2, backend=backend.name, track=True, nonfinite="skip")
    p.grad = torch.randn(40, 30, generator=gen).to(backend.device)
    before = p.detach().clone()
    opt.step()
    r = opt.telemetry.per_tensor()[0]
    assert r["dw_norm"] == pytest.approx(float((p.detach() - before).double().norm()), rel=1e-6)
    p.grad[0, 0] = float("nan")
    snap = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), snap) and opt.skipped_steps == 1


@needs_cuda_kernels
def test_cuda_step_captures_in_a_cuda_graph(gen):
    """Device hyper table and step counters: no host synchronisation, so the CUDA kernels' step
    captures; a tensor lr enters by writing the hyper table's lr column on the device."""
    ps, gs, ms, vs, ss = make_state([(1000,), (33, 17)], torch.float32, gen)
    hyper = make_hyper(2, gen=gen)
    r = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = [[t.cuda() for t in lst] for lst in (ps, gs, ms, vs)]
    ss, hyper_d = [s.cuda() for s in ss], hyper.cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph, as torch requires
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper_d)
    torch.cuda.current_stream().wait_stream(s)
    reference.fused_adamw_(*r, hyper)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper_d)
    for _ in range(3):
        graph.replay()
        reference.fused_adamw_(*r, hyper)
    torch.cuda.synchronize()
    assert float(ss[0]) == 4.0
    for p, q in zip(ps, r[0]):
        assert rel_err(p.cpu(), q) < 1e-6
