"""The sparse-row ops (docs/design.md section 2.3) on every backend (the ``backend`` fixture of
conftest.py: lvopt::coalesce_rows, lvopt::sparse_adamw_ and lvopt::sparse_catchup_ of
csrc/cpu/sparse_rows.cpp and csrc/cuda/sparse_rows.cu, lvopt_triton's of
lvopt/triton/sparse_rows.py) against the reference (lvopt/reference.py) and, on the Triton and
CUDA backends, against the CPU op: runs of many steps and single calls on rows lagging by up to
hundreds of steps, the exact mode against dense fp64 AdamW, coalescing, telemetry sums, argument
errors, the error word, opcheck and torch.compile. The optimizer and lvopt.nn.Embedding end to
end: tests/test_sparse_rows_optimizer.py. Without a GPU the Triton cases run on CPU tensors in an
interpreter child (run_triton_child) and the CUDA ones are skipped; small widths and few rows for
the Triton cases, whose interpreter cost is per operation."""

import math
import os

import pytest
import torch

from lvopt import reference
from lvopt.sparse import RowClock
from conftest import IN_TRITON_CHILD, needs_native, rel_err, run_python, run_triton_child, sparse_clock

if not IN_TRITON_CHILD:

    def test_triton_in_interpreter_child():
        run_triton_child(__file__)


def _zipf_ids(n, v, gen, a=1.1):
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    return torch.multinomial(ranks**-a, n, replacement=True, generator=gen)


def _run_ops(fn, catchup, V, d, dtype, gen, steps, betas=(0.9, 0.999), eps=1e-8, wd=0.1, exact=True, ids_fn=None):
    """Drives one op family through ``steps`` steps of random batches; returns its tables and
    a dense fp64 AdamW run on the same gradients."""
    g2 = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    p = torch.randn(V, d, generator=g2).to(dtype)
    m, v = (torch.zeros(V, d, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for _ in range(2))
    step, last = torch.tensor(0.0), torch.zeros(V, dtype=torch.int64)
    P, M, Vv = p.double(), torch.zeros(V, d, dtype=torch.float64), torch.zeros(V, d, dtype=torch.float64)
    clock = RowClock(betas[0], betas[1], eps, 0)
    for t in range(1, steps + 1):
        lr = 1e-2 * (0.55 + 0.45 * math.cos(t / 37.0))
        clock.append(t, lr, wd)
        hyper = torch.tensor([[lr, betas[0], betas[1], wd, eps, 0.0]], dtype=torch.float64)
        ids = (
            ids_fn(t, g2)
            if ids_fn
            else torch.randint(0, V, (int(torch.randint(0, 9, (1,), generator=g2)),), generator=g2)
        )
        vals = torch.randn(ids.numel(), d, generator=g2).to(dtype)
        h, q, base, e, w = clock.op_args()
        fn(p, ids, vals, m, v, step, last, h, q, hyper, base, e, w, exact)
        G = torch.zeros(V, d, dtype=torch.float64).index_add_(0, ids, vals.double())
        reference.fused_adamw_([P], [G], [M], [Vv], [torch.tensor(float(t - 1), dtype=torch.float64)], hyper)
    if exact:
        h, q, base, e, w = clock.op_args()
        catchup(p, torch.arange(V), m, v, step, last, h, q, clock.hyper(), base, e, w)
    return (p, m, v, step, last), (P, M, Vv)


# Positions of the op arguments that live on the table's device (param, indices, values, exp_avg,
# exp_avg_sq, last_step for sparse_adamw_; param, indices, exp_avg, exp_avg_sq, last_step for
# sparse_catchup_); step, hist, qpow and hyper stay on the host, as lvopt.optim passes them.
ADAMW_DEVICE_ARGS = (0, 1, 2, 3, 4, 6)
CATCHUP_DEVICE_ARGS = (0, 1, 2, 3, 5)


def on_device(fn, positions, dev):
    """fn run on ``dev`` copies of the CPU arguments at ``positions``; mutated ones are copied back
    (on the CPU, and in the interpreter child, the arguments themselves)."""

    def run(*args, **kw):
        moved = [a.to(dev) if i in positions else a for i, a in enumerate(args)]
        fn(*moved, **kw)
        for a, b in zip(args, moved):
            if b is not a:
                a.copy_(b.cpu())

    return run


def _backend_ops(backend):
    """The backend's sparse_adamw_ and sparse_catchup_ taking CPU arguments (for _run_ops)."""
    return (
        on_device(backend.ops.sparse_adamw_, ADAMW_DEVICE_ARGS, backend.device),
        on_device(backend.ops.sparse_catchup_, CATCHUP_DEVICE_ARGS, backend.device),
    )


def _ulps(a, b):
    """Largest distance in fp32 units in the last place (a, b fp32, same signs where nonzero)."""
    ia = a.contiguous().view(torch.int32).long()
    ib = b.contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def _assert_exact_fp32_near_cpu_op(backend, got, cpu):
    """An exact-mode fp32 result of the backend against the CPU op's on the same inputs. Triton
    takes the catch-up scalars from torch's fp64 exp/pow instead of libm's: a few ulps; CUDA:
    within 1e-6 of the table's scale."""
    if backend.name == "triton":
        assert _ulps(got, cpu) <= 4
    elif backend.name == "cuda":
        assert rel_err(got, cpu) < 1e-6


def _state(V, d, dtype, gen, T, tiny=()):
    """Random table at step T-1 with rows last current at random steps in [0, T-1]; elements
    listed in ``tiny`` (row, col) get v ~ (1e-9)^2 (sqrt(v) within a decade of eps = 1e-8: the
    windowed loop), (row, col, value) get v = value (0 or 1e-26: the reversed series)."""
    p = torch.randn(V, d, generator=gen).to(dtype)
    m = 0.1 * torch.randn(V, d, generator=gen)
    v = 0.01 * torch.rand(V, d, generator=gen) + 1e-6
    for r, c, *val in tiny:
        v[r, c] = val[0] if val else 1e-18 * (1.0 + float(torch.rand(1, generator=gen)))
    last = torch.randint(0, T, (V,), generator=gen)
    return p, m, v, torch.tensor(float(T - 1)), last


def _step_all(backend, V, d, dtype, gen, T, exact, ids, tiny=(), stats=False, eps=1e-8, maximize=False):
    """One sparse_adamw_ call at step T on the same inputs through the backend's op, the CPU op and
    the reference; returns the inputs and the three (p, m, v, step, last, stats) tuples."""
    clock, _ = sparse_clock(T, lr="schedule", eps=eps)
    h, q, base, e, w = clock.op_args()
    p, m, v, step, last = _state(V, d, dtype, gen, T, tiny)
    vals = torch.randn(ids.numel(), d, generator=gen).to(dtype)
    hyper = torch.tensor([[float(h[T - base, 0]), 0.9, 0.999, 0.1, eps, float(maximize)]], dtype=torch.float64)
    outs = []
    for fn, dev in (
        (backend.ops.sparse_adamw_, backend.device),
        (torch.ops.lvopt.sparse_adamw_, "cpu"),
        (reference.sparse_adamw_, "cpu"),
    ):
        pp, mm, vv = (t.clone().to(dev) for t in (p, m, v))
        ss, ll = step.clone(), last.clone().to(dev)
        st = torch.full((1, 2), 7.0, dtype=torch.float64, device=dev) if stats else None
        kw = {} if st is None else {"stats": st}
        if exact:
            fn(pp, ids.to(dev), vals.to(dev), mm, vv, ss, ll, h, q, hyper, base, e, w, True, **kw)
        else:
            none_f = torch.empty(0, dtype=torch.float64)
            fn(
                pp,
                ids.to(dev),
                vals.to(dev),
                mm,
                vv,
                ss,
                torch.empty(0, dtype=torch.int64, device=dev),
                none_f,
                none_f,
                hyper,
                0,
                1,
                0,
                False,
                **kw,
            )
        outs.append((pp.cpu(), mm.cpu(), vv.cpu(), ss, ll.cpu(), None if st is None else st.cpu()))
    return (p, m, v, step, last, vals), outs


# ----- many steps: runs of sparse_adamw_ and a final sparse_catchup_ ------------------------------

# (V, d) per backend: d = 37 has no 16-byte rows (the scalar path), 64 has.
RUN_SIZES = {"cpu": [(23, 37)], "cuda": [(23, 37), (31, 64)]}
RUN_STEPS = {"cpu": 60, "cuda": 60}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [True, False])
def test_runs_match_reference_and_cpu_op(backend, gen, dtype, exact):
    """``steps`` steps of random batches (an lr schedule, rows untouched for many steps) and, in
    exact mode, a catch-up of every row: against the reference; on the Triton and CUDA backends
    also against the CPU op (lazy mode: the same fp32 operations in the same order, so the same
    bits, bf16 tables included on CUDA)."""
    if backend.name == "triton":
        pytest.skip(
            "many steps cost the interpreter too much: one call at a time against the CPU op "
            "(test_one_step_matches_cpu_op_and_reference) and the optimizer's steps (test_sparse_rows_optimizer)"
        )
    seed, steps = gen.initial_seed(), RUN_STEPS[backend.name]
    for V, d in RUN_SIZES[backend.name]:

        def run(fa, fc, V=V, d=d):
            return _run_ops(fa, fc, V, d, dtype, torch.Generator().manual_seed(seed), steps, exact=exact)[0]

        got = run(*_backend_ops(backend))
        ref = run(reference.sparse_adamw_, reference.sparse_catchup_)
        assert float(got[3]) == float(ref[3]) == steps
        if exact:
            assert torch.equal(got[4], ref[4])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for a, b in zip(got[:3], ref[:3]):
            assert rel_err(a, b) < tol
        if backend.name == "cpu":
            continue
        cpu = run(torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_)
        assert torch.equal(got[4], cpu[4])
        if not exact and (backend.name == "cuda" or dtype == torch.float32):
            for a, b in zip(got[:3], cpu[:3]):
                assert torch.equal(a, b)
        for a, b in zip(got[:3], cpu[:3]):
            assert rel_err(a, b) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "betas,eps", [((0.9, 0.999), 1e-8), ((0.9, 0.95), 1e-6), ((0.8, 0.95), 1e-10), ((0.9, 0.999), 3e-2)]
)
def test_exact_matches_dense_fp64(backend, gen, betas, eps):
    """Rows untouched for up to hundreds of steps, LR schedule, weight decay: the closed-form
    catch-up equals dense AdamW with g = 0 within fp32 rounding (eps = 3e-2 puts many elements
    on the exact windowed loop, the fp64 loop kernel on CUDA)."""
    if backend.name == "triton":
        pytest.skip(
            "700 steps are too many for the interpreter: the Triton catch-up is checked against the CPU "
            "op's (test_rows_lagging_by_various_amounts_and_catchup, test_windowed_loop_elements)"
        )
    V, d = 40, 33

    def ids_fn(t, g):
        hot = torch.randint(0, 4, (3,), generator=g)
        rare = torch.randint(4, V, (1,), generator=g) if t % 23 == 0 else torch.empty(0, dtype=torch.int64)
        return torch.cat([hot, rare, hot[:1]])

    (p, m, v, *_), (P, M, Vv) = _run_ops(
        *_backend_ops(backend), V, d, torch.float32, gen, 700, betas=betas, eps=eps, ids_fn=ids_fn
    )
    # fp32 rounding of 700 steps of the hot rows (dense fp32 AdamW drifts as much: v's
    # beta2 = 0.999 accumulation gains ~1e-6 relative per few hundred steps).
    assert rel_err(p, P) < 5e-6 and rel_err(m, M) < 5e-6 and rel_err(v, Vv) < 2e-5


def test_reference_exact_matches_dense_fp64(gen):
    """The reference's step-by-step catch-up in fp64 is dense fp64 AdamW (the oracle)."""
    V, d = 9, 5
    (p, m, v, *_), (P, M, Vv) = _run_ops(
        reference.sparse_adamw_, reference.sparse_catchup_, V, d, torch.float64, gen, 50
    )
    assert rel_err(p, P) < 1e-12 and rel_err(m, M) < 1e-12


# ----- one call ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
def test_one_step_matches_cpu_op_and_reference(backend, gen, dtype, exact):
    """One call at step 300 on rows last current anywhere in [0, 299]: rows not indexed are not
    written, indexed ones are, last_step as the CPU op and the reference; against the CPU op bit
    for bit in lazy fp32 (math.h's fp32 operation order) and near it otherwise; against the
    reference within fp32 (bf16) rounding."""
    V, d, T = 12, 70, 300
    ids = torch.tensor([3, 9, 3, 0, 11, 3, 5, 9])
    before, (got, cpu, ref) = _step_all(backend, V, d, dtype, gen, T, exact, ids)
    touched = torch.unique(ids)
    untouched = torch.tensor([r for r in range(V) if r not in touched.tolist()])
    assert float(got[3]) == float(cpu[3]) == float(T)
    for a, b0 in zip(got[:3], before[:3]):
        assert torch.equal(a[untouched], b0[untouched])  # rows not indexed are not written
        assert not torch.equal(a[touched], b0[touched])
    if exact:
        assert torch.equal(got[4], cpu[4]) and torch.equal(got[4], ref[4])
        assert (got[4][touched] == T).all()
    else:
        assert torch.equal(got[4], before[4])
    if backend.name != "cpu":
        if dtype == torch.float32 and not exact:
            for a, b in zip(got[:3], cpu[:3]):
                assert torch.equal(a, b)  # math.h's fp32 operation order: the CPU op's bits
        elif dtype == torch.float32:
            for a, b in zip(got[:3], cpu[:3]):
                _assert_exact_fp32_near_cpu_op(backend, a, b)
        elif backend.name == "triton":
            assert _ulps(got[1], cpu[1]) <= 4 and _ulps(got[2], cpu[2]) <= 4
            assert (got[0].float() - cpu[0].float()).abs().max() <= cpu[0].float().abs().max() * 2.0**-7
        else:
            for a, b in zip(got[:3], cpu[:3]):
                assert rel_err(a, b) < 1e-2
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got[:3], ref[:3]):
        assert rel_err(a, b) < tol


def test_lazy_maximize_matches_cpu_op_bitwise(backend, gen):
    before, (got, cpu, ref) = _step_all(
        backend, 8, 40, torch.float32, gen, 5, False, torch.tensor([1, 6, 1]), maximize=True
    )
    for a, b in zip(got[:3], cpu[:3]):
        assert torch.equal(a, b)
    assert rel_err(got[0], ref[0]) < 1e-6
    assert not torch.equal(got[0], before[0])


def test_rows_lagging_by_various_amounts_and_catchup(backend, gen):
    """Exact mode: rows current, one step behind and up to hundreds behind (beyond the window),
    with elements on the reversed series (v = 0, 1e-26, 1e-24) and on the windowed loop, are
    brought current then stepped; sparse_catchup_ brings the remaining rows to the step. Against
    the CPU op and the reference."""
    V, d, T = 10, 41, 700
    clock, _ = sparse_clock(T, lr="schedule")
    h, q, base, e, w = clock.op_args()
    assert w < T - 1 - 300  # rows last current at 0, 1 and 300 lag beyond the window
    rev = [(r, c, val) for r in range(V) for c, val in ((5, 0.0), (6, 1e-26), (40, 1e-24))]
    p, m, v, step, last = _state(V, d, torch.float32, gen, T, tiny=rev + [(3, 8), (4, 9), (8, 10)])
    last = torch.tensor([T - 1, T - 2, T - 3, T - 40, T - 200, 0, 1, T - w - 3, 300, T - 1])
    hyper = torch.tensor([[float(h[T - base, 0]), 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    ids = torch.arange(V)[torch.randperm(V, generator=gen)][:7]
    vals = torch.randn(7, d, generator=gen)
    res = []
    for dev, fa, fc in (
        (backend.device, backend.ops.sparse_adamw_, backend.ops.sparse_catchup_),
        ("cpu", torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_),
        ("cpu", reference.sparse_adamw_, reference.sparse_catchup_),
    ):
        pp, mm, vv = (t.clone().to(dev) for t in (p, m, v))
        ss, ll = step.clone(), last.clone().to(dev)
        fa(pp, ids.to(dev), vals.to(dev), mm, vv, ss, ll, h, q, hyper, base, e, w, True)
        assert (ll[ids.to(dev)] == T).all()
        fc(pp, torch.arange(V).to(dev), mm, vv, ss, ll, h, q, hyper, base, e, w)
        assert (ll == T).all() and float(ss) == T
        res.append((pp.cpu(), mm.cpu(), vv.cpu()))
    got, cpu, ref = res
    for a, b, c in zip(got, cpu, ref):
        _assert_exact_fp32_near_cpu_op(backend, a, b)
        assert rel_err(a, c) < 1e-5


def test_windowed_loop_elements(triton_backend, gen, monkeypatch):
    """Elements with sqrt(v) near eps (v ~ (1e-9)^2, eps = 1e-8) on rows lagging ~100 steps take
    catchup_element_loop's fp64 window sum (their v lies between the series' bounds), and
    the result matches the step-by-step reference and the CPU op; without the loop (turned
    off, so the series serve those elements) it would not."""
    from lvopt.triton import sparse_rows as S

    dev = triton_backend.device
    V, d, T = 6, 40, 400
    clock, _ = sparse_clock(T, lr="schedule")
    h, q, base, e, w = clock.op_args()
    p, m, v, step, last = _state(V, d, torch.float32, gen, T, tiny=[(1, 3), (1, 17), (4, 0), (4, 39)])
    last = torch.tensor([T - 1, T - 100, T - 5, 10, T - 120, T - 2])
    hyper = torch.tensor([[float(h[T - base, 0]), 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    ids = torch.tensor([1, 4, 0, 2])
    vals = torch.randn(4, d, generator=gen)
    rows = torch.unique(ids)
    cr = S.catchup_scalars(last, rows, h, q, hyper, base, e, w, T - 1).cpu()
    vr = v[rows]
    mid = (~(vr >= cr[:, 11:12]) & ~(vr <= cr[:, 12:13])).any(1)
    has_loop = dict(zip(rows.tolist(), mid.tolist()))
    assert has_loop[1] and has_loop[4] and not has_loop[0] and not has_loop[2]

    def run(dev, fn):
        pp, mm, vv = (t.clone().to(dev) for t in (p, m, v))
        ss, ll = step.clone(), last.clone().to(dev)
        fn(pp, ids.to(dev), vals.to(dev), mm, vv, ss, ll, h, q, hyper, base, e, w, True)
        return pp.cpu()

    tri = run(dev, triton_backend.ops.sparse_adamw_)
    cpu = run("cpu", torch.ops.lvopt.sparse_adamw_)
    ref = run("cpu", reference.sparse_adamw_)
    mids = [(1, 3), (1, 17), (4, 0), (4, 39)]
    # The reference sums ~100 fp32 steps one by one: over 40 seeds it sat up to 1.3e-6 (relative)
    # from the closed form on these elements, where the CPU and Triton ops agreed bit for bit.
    for r, c in mids:
        assert abs(float(tri[r, c]) - float(ref[r, c])) <= 4e-6 * abs(float(ref[r, c])) + 1e-7
    assert _ulps(tri, cpu) <= 4 and rel_err(tri, ref) < 1e-5

    monkeypatch.setattr(S, "WINDOW_LOOP", False)
    wrong = run(dev, triton_backend.ops.sparse_adamw_)
    err = max(abs(float(wrong[r, c]) - float(ref[r, c])) for r, c in mids)
    assert err > 1e-5 * max(abs(float(ref[r, c])) for r, c in mids)


# (V, d, ids) of the stats test per backend: the interpreter's few rows; 80 random ids on the
# native backends.
def _stats_case(backend, gen):
    if backend.name == "triton":
        return 9, 50, torch.tensor([2, 7, 2, 4])
    return 50, 40, torch.randint(0, 50, (80,), generator=gen)


# Relative tolerance of the stats (sum of ||w||^2 and of ||dw||^2 over the touched rows) against an
# fp64 evaluation on the tables before and after the call, per backend, and against the CPU op's.
STATS_FP64_REL = {"cpu": (1e-12, 1e-10), "triton": (1e-12, 1e-10), "cuda": (1e-12, 1e-10)}
STATS_CPU_REL = {"triton": (1e-12, 1e-5), "cuda": (1e-12, 1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
def test_stats(backend, gen, dtype, exact):
    """sparse_adamw_'s stats (track=True): ||w||^2 of the touched rows before the step and ||dw||^2
    of the step, against fp64 sums over the tables and against the CPU op's."""
    if backend.name == "cuda" and dtype == torch.bfloat16:
        pytest.skip("the CUDA op's bf16 stats have not been run against these bounds on a GPU yet")
    V, d, ids = _stats_case(backend, gen)
    before, (got, cpu, ref) = _step_all(backend, V, d, dtype, gen, 60, exact, ids, stats=True)
    rows = torch.unique(ids)
    b64, a64 = before[0][rows].double(), got[0][rows].double()
    rel_w, rel_dw = STATS_FP64_REL[backend.name]
    assert float(got[5][0, 0]) == pytest.approx(float((b64 * b64).sum()), rel=rel_w)
    assert float(got[5][0, 1]) == pytest.approx(float(((a64 - b64) ** 2).sum()), rel=rel_dw)
    assert got[5][0, 0] > 0 and got[5][0, 1] > 0
    if backend.name != "cpu":
        rel_w, rel_dw = STATS_CPU_REL[backend.name]
        assert float(got[5][0, 0]) == pytest.approx(float(cpu[5][0, 0]), rel=rel_w)
        assert float(got[5][0, 1]) == pytest.approx(float(cpu[5][0, 1]), rel=rel_dw)


@pytest.mark.parametrize("exact", [False, True])
def test_empty_index_list_only_advances_step(backend, gen, exact):
    V, d, T = 5, 40, 30
    before, (got, cpu, ref) = _step_all(
        backend, V, d, torch.float32, gen, T, exact, torch.empty(0, dtype=torch.int64), stats=True
    )
    assert float(got[3]) == float(T) == float(cpu[3])
    for a, b in zip(got[:3], before[:3]):
        assert torch.equal(a, b)
    assert torch.equal(got[4], before[4])
    assert got[5].abs().sum() == 0.0


def test_catchup_skips_current_rows(backend, gen):
    dev = backend.device
    V, d, T = 6, 40, 50
    clock, hyper = sparse_clock(T, lr="schedule")
    h, q, base, e, w = clock.op_args()
    p, m, v, _, _ = _state(V, d, torch.float32, gen, T)
    last = torch.tensor([T, T, 3, T, 20, T]).to(dev)
    step = torch.tensor(float(T))
    pp, mm, vv = (t.clone().to(dev) for t in (p, m, v))
    backend.ops.sparse_catchup_(pp, torch.tensor([0, 2, 2, 3]).to(dev), mm, vv, step, last, h, q, hyper, base, e, w)
    assert last.tolist() == [T, T, T, T, 20, T] and float(step) == T
    for a, b in zip((pp.cpu(), mm.cpu(), vv.cpu()), (p, m, v)):
        assert torch.equal(a[[0, 1, 3, 4, 5]], b[[0, 1, 3, 4, 5]])
        assert not torch.equal(a[2], b[2])


def test_sparse_adamw_compiles_with_torch_compile(backend, gen):
    """The custom op and its fake kernel trace under torch.compile (fullgraph); same bits."""
    dev = backend.device
    V, d, T = 9, 40, 20
    clock, _ = sparse_clock(T, lr="schedule")
    h, q, base, e, w = clock.op_args()
    hyper = torch.tensor([[float(h[T - base, 0]), 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    p, m, v, step, last = _state(V, d, torch.float32, gen, T)
    ids = torch.tensor([4, 1, 4]).to(dev)
    vals = torch.randn(3, d, generator=gen).to(dev)
    a = [t.clone().to(dev) for t in (p, m, v)] + [step.clone(), last.clone().to(dev)]
    b = [t.clone() for t in a]
    op = backend.ops.sparse_adamw_

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(p, m, v, step, last):
        op(p, ids, vals, m, v, step, last, h, q, hyper, base, e, w, True)

    f(*a)
    op(b[0], ids, vals, b[1], b[2], b[3], b[4], h, q, hyper, base, e, w, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0].cpu(), p)


@pytest.mark.parametrize("exact", [False, True])
def test_long_runs_are_summed_in_pieces(triton_backend, gen, exact):
    """A row given 77 times (more than RUN = 32) is summed in pieces of 32 rows, then the pieces
    in order (the CUDA kernel's grouping): its gradient equals that grouping bit for bit, and the
    step equals the CPU op (a sequential sum) within fp32 rounding; rows given fewer times match
    the CPU op bit for bit in lazy mode."""
    from lvopt.triton import sparse_rows as S

    V, d, T = 9, 40, 30
    ids = torch.cat([torch.full((77,), 4), torch.tensor([1, 7, 1])])[torch.randperm(80, generator=gen)]
    before, (tri, cpu, ref) = _step_all(triton_backend, V, d, torch.float32, gen, T, exact, ids)
    # The gradient of row 4 as the pieces sum it: a plain sum of 32-row sums, in input order.
    vals = before[5]
    pos = (ids == 4).nonzero().reshape(-1)

    def in_order(rows):
        acc = rows[0].clone()
        for r in rows[1:]:
            acc = acc + r
        return acc

    pieces = [in_order(vals[pos[i : i + S.RUN]]) for i in range(0, pos.numel(), S.RUN)]
    assert len(pieces) == 3
    assert rel_err(tri[0], cpu[0]) < 1e-5
    if not exact:
        others = [r for r in range(V) if r != 4]
        assert torch.equal(tri[0][others], cpu[0][others])
        # Row 4 stepped by the CPU op with the pieces' grouping of its gradient: the same bits.
        g4 = in_order(pieces)
        assert not torch.equal(g4, in_order(vals[pos]))  # the grouping shows in the bits here
        p, m, v, step = (t.clone() for t in before[:4])
        clock, _ = sparse_clock(T, lr="schedule")
        h = clock.op_args()[0]
        hyper = torch.tensor([[float(h[T, 0]), 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
        torch.ops.lvopt.sparse_adamw_(
            p,
            torch.tensor([4]),
            g4[None],
            m,
            v,
            step,
            torch.empty(0, dtype=torch.int64),
            torch.empty(0),
            torch.empty(0),
            hyper,
            0,
            1,
            0,
            False,
        )
        assert torch.equal(tri[0][4], p[4]) and torch.equal(tri[1][4], m[4])


# ----- coalescing --------------------------------------------------------------------------------

# (ids, rows, width) per backend: empty, one row, many duplicates, ids spread over a large table,
# the full row set (64 of 64, a permutation); the interpreter takes few, with widths around its
# 32-wide tiles; on CUDA also rows given more than 32 times (summed in pieces).
COALESCE_CASES = {
    "cpu": [(0, 5, 19), (1, 1, 19), (300, 7, 19), (5000, 100000, 19), (64, 64, 19)],
    "triton": [(0, 5, 40), (1, 1, 40), (37, 7, 130), (12, 100000, 45)],
    "cuda": [(0, 5, 8), (1, 1, 8), (300, 7, 19), (5000, 100000, 64), (64, 64, 8), (3000, 3, 40)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coalesce_rows(backend, gen, dtype):
    """The distinct rows in order and their summed values. Against the reference (fp32 sums; on
    CUDA an fp64 evaluation, for its runs summed in pieces), and on the Triton and CUDA backends
    against the CPU op: the same bits for rows given at most 32 times (the same in-order fp32
    sum); CUDA twice: deterministic."""
    dev = backend.device
    for n, V, d in COALESCE_CASES[backend.name]:
        ids = torch.randint(0, V, (n,), generator=gen)
        if n == V == 64:
            ids = torch.randperm(64, generator=gen)  # the full row set
        vals = torch.randn(n, d, generator=gen)
        if backend.name == "triton":
            vals = vals * torch.logspace(-3, 3, d)
        vals = vals.to(dtype)
        rows, summed = backend.ops.coalesce_rows(ids.to(dev), vals.to(dev), V)
        rr, rs = reference.coalesce_rows(ids, vals, V)
        assert rows.device.type == dev.type
        assert torch.equal(rows.cpu(), rr) and torch.equal(rr, torch.unique(ids))
        assert summed.dtype == dtype and summed.shape == (rr.numel(), d)
        if backend.name != "cpu":
            cr, cs = torch.ops.lvopt.coalesce_rows(ids, vals, V)
            short = torch.bincount(ids, minlength=V)[cr] <= 32
            assert torch.equal(summed.cpu()[short], cs[short])
        if backend.name == "cuda":
            assert torch.equal(summed, backend.ops.coalesce_rows(ids.to(dev), vals.to(dev), V)[1])
            if n:
                exact = reference.coalesce_rows(ids, vals.double(), V)[1]  # fp64 sums
                assert rel_err(summed.cpu().double(), exact) < (5e-6 if dtype == torch.float32 else 1e-2)
        elif n:
            assert rel_err(summed.cpu(), rs) < (1e-6 if dtype == torch.float32 else 1e-2)


# Duplicates of one row: 1000 on the CPU; 40 under the interpreter; on CUDA 32 (longer runs are
# summed in pieces there, see test_coalesce_rows).
IN_ORDER_N = {"cpu": 1000, "triton": 40, "cuda": 32}


def test_coalesce_sums_duplicates_in_input_order(backend, gen):
    """A row given many times is the in-order fp32 sum of its values (values over 16 decades, so
    any other order gives other bits), and -0.0 + 0.0 + ... keeps the first value's sign rules."""
    n = IN_ORDER_N[backend.name]
    ids = torch.zeros(n, dtype=torch.int64)
    vals = torch.randn(n, 3, generator=gen) * torch.logspace(-8, 8, n).unsqueeze(1)
    vals[0, 0] = -0.0
    vals[1:, 0] = 0.0
    _, s = backend.ops.coalesce_rows(ids.to(backend.device), vals.to(backend.device), 1)
    acc = vals[0].clone()
    for i in range(1, n):
        acc = acc + vals[i]
    assert torch.equal(s[0].cpu(), acc)


@needs_native
def test_thread_count_does_not_change_bits(gen):
    V, d = 3000, 64
    ids = _zipf_ids(6000, V, gen)
    vals = torch.randn(6000, d, generator=gen)
    outs = []
    n = torch.get_num_threads()
    for threads in (1, n):
        torch.set_num_threads(threads)
        try:
            tables, _ = _run_ops(
                torch.ops.lvopt.sparse_adamw_,
                torch.ops.lvopt.sparse_catchup_,
                200,
                d,
                torch.float32,
                torch.Generator().manual_seed(3),
                40,
                ids_fn=lambda t, g: torch.randint(0, 200, (300,), generator=g),
            )
            outs.append(tables[:3] + torch.ops.lvopt.coalesce_rows(ids, vals, V))
        finally:
            torch.set_num_threads(n)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_isa_levels_give_identical_bits(isa):
    code = """
import torch, lvopt
from test_sparse_rows import _run_ops
t, _ = _run_ops(torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_, 50, 67, torch.float32,
                torch.Generator().manual_seed(9), 80, eps=1e-3)
print(lvopt.build_info()["cpu_isa_active"], [x.view(torch.int32).long().sum().item() for x in t[:3]])
"""
    env = {"PYTHONPATH": os.path.dirname(__file__)}
    best = run_python(code, env=env).split(" ", 1)
    lower = run_python(code, env={**env, "LVOPT_CPU_ISA": isa}).split(" ", 1)
    assert best[1] == lower[1]


# ----- opcheck, errors --------------------------------------------------------------------------

# Width of the opcheck tables: 40 under the Triton interpreter (32-wide tiles: one full, one
# masked tail), 8 for the native kernels.
OPCHECK_WIDTH = {"cpu": 8, "triton": 40, "cuda": 8}


@pytest.mark.parametrize("word", [False, True], ids=["raising", "error word"])
def test_opcheck(backend, gen, word):
    """opcheck of the three sparse-row ops on every backend; the table, ids, values and moments
    on the backend's device, step, hist, qpow and hyper on the host (as lvopt.optim passes them),
    last_step and the error word on the table's device for the native ops."""
    dev = backend.device
    host_last = backend.name == "triton"
    kw = {"error": torch.zeros(3, dtype=torch.int64, device=dev)} if word else {}
    V, d = 11, OPCHECK_WIDTH[backend.name]
    clock, hyper = sparse_clock(3)
    h, q, base, e, w = clock.op_args()
    ids = torch.tensor([3, 1, 3, 7], device=dev)
    for exact in (True, False):
        last = torch.tensor([0, 1, 2] * 3 + [0, 0])
        args = (
            torch.randn(V, d, device=dev),
            ids,
            torch.randn(4, d, device=dev),
            torch.rand(V, d, device=dev),
            torch.rand(V, d, device=dev) + 0.1,
            torch.tensor(2.0),
            last if host_last else last.to(dev),
            h,
            q,
            hyper,
            base,
            e,
            w,
            exact,
        )
        torch.library.opcheck(backend.op("sparse_adamw_"), args, kw)
    last = torch.zeros(V, dtype=torch.int64)
    torch.library.opcheck(
        backend.op("sparse_catchup_"),
        (
            torch.randn(V, d, device=dev),
            ids,
            torch.rand(V, d, device=dev),
            torch.rand(V, d, device=dev) + 0.1,
            torch.tensor(3.0),
            last if host_last else last.to(dev),
            h,
            q,
            hyper,
            base,
            e,
            w,
        ),
        kw,
    )
    torch.library.opcheck(
        backend.op("coalesce_rows"),
        (ids, torch.randn(4, d, device=dev), V),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_fake_kernels_take_the_cuda_argument_layout():
    """Without a GPU (test_opcheck[cuda] runs the CUDA ops on one): opcheck's schema and fake-kernel
    checks of the three ops on fake CUDA tensors laid out as lvopt.optim passes them to the CUDA
    op (table, ids, values, moments, last_step and the error word on the device; step, hist, qpow
    and hyper on the host), and coalesce_rows' outputs on the device: what torch.compile and the
    fake-CUDA host-path tests (tests/test_sync_free.py) trace through. (The fake kernels check no
    devices today: this fails if one starts refusing the CUDA layout or puts an output elsewhere.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    clock, hyper = sparse_clock(3)
    h, q, base, e, w = clock.op_args()
    V, d = 11, 8
    # coalesce_rows' output has as many rows as there are distinct ids: a data-dependent shape.
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)):

        def dev(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device="cuda")

        ids, kw = torch.tensor([3, 1, 3, 7]).to("cuda"), {"error": dev(3, dtype=torch.int64)}
        last = dev(V, dtype=torch.int64)
        for exact in (True, False):
            torch.library.opcheck(
                torch.ops.lvopt.sparse_adamw_.default,
                (
                    dev(V, d),
                    ids,
                    dev(4, d),
                    dev(V, d),
                    dev(V, d),
                    torch.tensor(2.0),
                    last,
                    h,
                    q,
                    hyper,
                    base,
                    e,
                    w,
                    exact,
                ),
                kw,
                test_utils=("test_schema", "test_faketensor"),
            )
        torch.library.opcheck(
            torch.ops.lvopt.sparse_catchup_.default,
            (dev(V, d), ids, dev(V, d), dev(V, d), torch.tensor(3.0), last, h, q, hyper, base, e, w),
            kw,
            test_utils=("test_schema", "test_faketensor"),
        )
        torch.library.opcheck(
            torch.ops.lvopt.coalesce_rows.default, (ids, dev(4, d), V), test_utils=("test_schema", "test_faketensor")
        )
        rows, summed = torch.ops.lvopt.coalesce_rows(ids, dev(4, d, dtype=torch.bfloat16), V)
        assert rows.device.type == summed.device.type == "cuda"
        assert rows.dtype == torch.int64 and summed.dtype == torch.bfloat16 and summed.shape[1] == d


def test_reference_errors_write_nothing():
    """The reference's own checks of ids and values (the backends': test_errors_write_nothing)."""
    f = reference.sparse_adamw_
    V, d = 6, 4
    clock, hyper = sparse_clock(1)
    h, q, base, e, w = clock.op_args()
    for pattern, ids, vals in [
        ("negative index -1", torch.tensor([0, -1]), torch.randn(2, d)),
        ("index 6 at position 1 is out of range", torch.tensor([0, 6]), torch.randn(2, d)),
        ("values", torch.tensor([0, 1]), torch.randn(2, d + 1)),
        ("values", torch.tensor([0, 1]), torch.randn(2, d).double()),
    ]:
        p, m, v = torch.randn(V, d), torch.rand(V, d), torch.rand(V, d)
        step, last = torch.tensor(0.0), torch.zeros(V, dtype=torch.int64)
        before = [t.clone() for t in (p, m, v, step, last)]
        with pytest.raises(RuntimeError, match=pattern):
            f(p, ids, vals, m, v, step, last, h, q, hyper, base, e, w, True)
        for a, b in zip((p, m, v, step, last), before):
            assert torch.equal(a, b)


# A row whose last_step lies outside the history: Triton names the row ("row 1 has last_step"),
# the CPU op does not ("a row has last_step 8, outside [0, 4]").
STALE_ROW = "(row 1|a row) has last_step"
# The error cases the CUDA op is known to raise (its checks are sparse_args.h's, as the CPU op's;
# the rest of the list has not been run on a GPU).
CUDA_ERROR_CASES = ("negative index -1 at position 1", "index 6 at position 1 is out of range")


def test_errors_write_nothing(backend, gen):
    """Every argument error of sparse_adamw_ (and of sparse_catchup_ and coalesce_rows): the same
    message on every backend (sparse_args.h; Triton's Python checks say the same), raised before
    anything is written."""
    dev = backend.device
    V, d, T = 6, 40 if backend.name == "triton" else 4, 5
    clock, _ = sparse_clock(T, lr="schedule")
    h, q, base, e, w = clock.op_args()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)

    def bad(col, val):
        out = hyper.clone()
        out[0, col] = val
        return out

    p, m, v = torch.randn(V, d, generator=gen).to(dev), torch.rand(V, d).to(dev), torch.rand(V, d).to(dev)
    step = torch.tensor(float(T - 1))
    last = torch.randint(0, T, (V,), generator=gen)
    if backend.name == "cuda":
        last = last.to(dev)
    vals = torch.randn(2, d).to(dev)
    ids = torch.tensor([0, 1]).to(dev)

    def A(**kw):
        return {
            **dict(
                param=p,
                indices=ids,
                values=vals,
                exp_avg=m,
                exp_avg_sq=v,
                step=step,
                last_step=last,
                hist=h,
                qpow=q,
                hyper=hyper,
                hist_base=base,
                epoch=e,
                window=w,
                exact=True,
            ),
            **kw,
        }

    stale = last.clone()
    stale[1] = T + 3
    cases = [
        ("negative index -1 at position 1", A(indices=torch.tensor([0, -1]).to(dev))),
        ("index 6 at position 1 is out of range", A(indices=torch.tensor([0, 6]).to(dev))),
        ("indices must be a 1-D int64", A(indices=torch.tensor([0, 1], dtype=torch.int32).to(dev))),
        ("values must have shape", A(values=torch.randn(2, d + 1).to(dev))),
        ("values must have shape", A(values=torch.randn(3, d).to(dev))),
        ("values have dtype", A(values=vals.double())),
        ("param has dtype", A(param=p.double(), values=vals.double())),
        ("exp_avg_sq must be", A(exp_avg_sq=v[:, :-1].contiguous())),
        ("step must be", A(step=torch.tensor([1.0, 2.0]))),
        ("hyper must be", A(hyper=hyper.float())),
        ("lr must be finite", A(hyper=bad(0, -1.0))),
        ("beta1 must be in", A(hyper=bad(1, 1.0))),
        ("beta2 must be in", A(hyper=bad(2, -0.5))),
        ("eps must be finite", A(hyper=bad(4, 0.0))),
        ("weight_decay must be finite", A(hyper=bad(3, math.nan))),
        ("last_step must be", A(last_step=last[:-1].contiguous())),
        ("hist must be", A(hist=h[:, :5].contiguous())),
        ("qpow must be", A(qpow=q[:, :-1].contiguous())),
        (STALE_ROW, A(last_step=stale)),
        ("hist covers steps", A(step=torch.tensor(float(T + 2)))),
        ("stats must be", A(stats=torch.zeros(3, dtype=torch.float64, device=dev))),
    ]
    if backend.name == "cuda":
        cases = [c for c in cases if c[0] in CUDA_ERROR_CASES]
        cases.append(("last_step must be a contiguous int64 tensor", A(last_step=last.cpu())))
    snap = [t.clone() for t in (p, m, v, step, last)]
    for pattern, kw in cases:
        with pytest.raises(RuntimeError, match=pattern):
            backend.ops.sparse_adamw_(**kw)
        for a, b in zip((p, m, v, step, last), snap):
            assert torch.equal(a, b), pattern
    if backend.name != "cuda":
        with pytest.raises(RuntimeError, match="index 6 at position 0"):
            backend.ops.sparse_catchup_(p, torch.tensor([6]).to(dev), m, v, step, last, h, q, hyper, base, e, w)
        with pytest.raises(RuntimeError, match=STALE_ROW):
            backend.ops.sparse_catchup_(p, torch.tensor([1]).to(dev), m, v, step, stale, h, q, hyper, base, e, w)
        with pytest.raises(RuntimeError, match="num_rows must be"):
            backend.ops.coalesce_rows(ids, vals, -1)
        with pytest.raises(RuntimeError, match="values must be a float32/bfloat16"):
            backend.ops.coalesce_rows(ids, vals.double(), V)
    for a, b in zip((p, m, v, step, last), snap):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("fn", ["native", "reference"])
@pytest.mark.parametrize("exact", [True, False])
def test_error_word_instead_of_raising(gen, fn, exact):
    """With an error word (what the GPU backends are given, lvopt/sparse.py CHECK_IDS) the ops
    raise for nothing that depends on the data: ids outside the table set [1, min id, max id],
    a row whose last step is outside the history sets code 2, a word already set stops the call;
    each time nothing is written (table, moments, step count, last steps, stats)."""
    adam = torch.ops.lvopt.sparse_adamw_ if fn == "native" else reference.sparse_adamw_
    catchup = torch.ops.lvopt.sparse_catchup_ if fn == "native" else reference.sparse_catchup_
    V, d = 6, 4
    clock, hyper = sparse_clock(1)
    h, q, base, e, w = clock.op_args()
    stale = torch.zeros(V, dtype=torch.int64)
    stale[2] = 5
    cases = [
        (torch.tensor([0, -3, 2]), torch.zeros(V, dtype=torch.int64), [0, 0, 0], [1, -3, 2]),
        (torch.tensor([5, 9, 1]), torch.zeros(V, dtype=torch.int64), [0, 0, 0], [1, 1, 9]),
        (torch.tensor([0, 1]), torch.zeros(V, dtype=torch.int64), [2, 0, 0], [2, 0, 0]),
    ]
    if exact:
        cases.append((torch.tensor([2, 3]), stale, [0, 0, 0], [2, 0, 0]))
    for ids, last, word0, word1 in cases:
        p, m, v = torch.randn(V, d, generator=gen), torch.rand(V, d, generator=gen), torch.rand(V, d, generator=gen)
        step, stats = torch.tensor(1.0), torch.full((1, 2), 7.0, dtype=torch.float64)
        err = torch.tensor(word0)
        before = [t.clone() for t in (p, m, v, step, last)]
        adam(
            p,
            ids,
            torch.randn(ids.numel(), d, generator=gen),
            m,
            v,
            step,
            last,
            h,
            q,
            hyper,
            base,
            e,
            w,
            exact,
            stats=stats,
            error=err,
        )
        assert err.tolist() == word1
        for a, b in zip((p, m, v, step, last), before):
            assert torch.equal(a, b)
        assert stats.abs().sum() == 0.0
        if exact:
            err = torch.tensor(word0)
            catchup(p, ids, m, v, step, last, h, q, hyper, base, e, w, error=err)
            assert err.tolist() == word1
            for a, b in zip((p, m, v, step, last), before):
                assert torch.equal(a, b)
    # A clean word stays clean and the call writes.
    err = torch.zeros(3, dtype=torch.int64)
    p = torch.randn(V, d, generator=gen)
    p0 = p.clone()
    adam(
        p,
        torch.tensor([1, 4]),
        torch.randn(2, d, generator=gen),
        torch.zeros(V, d),
        torch.zeros(V, d),
        torch.tensor(1.0),
        torch.ones(V, dtype=torch.int64),
        h,
        q,
        hyper,
        base,
        e,
        w,
        exact,
        error=err,
    )
    assert err.tolist() == [0, 0, 0] and not torch.equal(p, p0)


def test_rowclock_device_tables_follow_the_history():
    """RowClock.device_tables (the CUDA path's incremental mirror of hist/qpow) equals the host
    tables after appends, growth of the buffer, truncation and reset (checked with a CPU
    'device', which exercises the same bookkeeping)."""
    clock = RowClock(0.9, 0.999, 1e-8, 0)
    dev = torch.device("cpu")
    for t in range(1, 700):  # > 256 rows: the host buffer grows twice
        clock.append(t, 1e-3 * (1 + 0.1 * math.sin(t)), 0.1)
        if t % 97 == 0:
            clock.truncate(t - 150)
        if t % 31 == 0 or t > 690:
            h, q = clock.device_tables(dev)
            assert torch.equal(h, clock.hist) and torch.equal(q, clock.qpow)
            assert h.data_ptr() != clock.hist.data_ptr()  # a copy, not the host table
    clock.reset(700)
    h, _ = clock.device_tables(dev)
    assert torch.equal(h, clock.hist) and h.shape[0] == 1
    assert clock.op_args()[0] is not None and clock.op_args("cpu")[0].data_ptr() == clock.hist.data_ptr()
