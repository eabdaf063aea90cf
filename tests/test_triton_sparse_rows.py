"""lvopt_triton::coalesce_rows / sparse_adamw_ / sparse_catchup_ (lvopt/triton/sparse_rows.py)
against the native CPU ops (csrc/cpu/sparse_rows.cpp) and the reference (lvopt/reference.py):
on CUDA tensors with a GPU, else on CPU tensors under TRITON_INTERPRET=1 in a child pytest
(tests/_triton_support.py). Small widths and few rows: the interpreter's cost is per operation."""
import math

import pytest
import torch

from _triton_support import IN_CHILD, run_file_under_interpreter, triton_device
from conftest import needs_native, rel_err

DEV = triton_device()
needs_triton_device = pytest.mark.skipif(DEV is None, reason="no GPU: these run in the interpreter child")


if not IN_CHILD:

    def test_interpreter_parity_in_child():
        run_file_under_interpreter(__file__)


def _ops():
    import lvopt.triton

    return lvopt.triton


def _hyper(lr=1e-2, betas=(0.9, 0.999), wd=0.1, eps=1e-8, maximize=False):
    return torch.tensor([[lr, betas[0], betas[1], wd, eps, float(maximize)]], dtype=torch.float64)


def _ulps(a, b):
    """Largest distance in fp32 units in the last place (a, b fp32, same signs where nonzero)."""
    ia = a.contiguous().view(torch.int32).long()
    ib = b.contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def _clock(T, betas=(0.9, 0.999), eps=1e-8, wd=0.1):
    """A RowClock with steps 1..T (an LR schedule), as lvopt.optim builds it."""
    from lvopt.sparse import RowClock

    clock = RowClock(betas[0], betas[1], eps, 0)
    for t in range(1, T + 1):
        clock.append(t, 1e-2 * (0.55 + 0.45 * math.cos(t / 37.0)), wd)
    return clock


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


def _to(ts):
    return [t.to(DEV) for t in ts]


# ----- coalesce_rows -------------------------------------------------------------------------------

# ----- sparse_adamw_ -------------------------------------------------------------------------------

def _step_all(V, d, dtype, gen, T, exact, ids, tiny=(), stats=False, eps=1e-8, maximize=False):
    """One sparse_adamw_ call at step T on the same inputs through the Triton op, the CPU op and
    the reference; returns the three (p, m, v, step, last, stats) tuples."""
    from lvopt import reference

    clock = _clock(T, eps=eps)
    h, q, base, e, w = clock.op_args()
    p, m, v, step, last = _state(V, d, dtype, gen, T, tiny)
    vals = torch.randn(ids.numel(), d, generator=gen).to(dtype)
    hyper = _hyper(lr=float(h[T - base, 0]), wd=0.1, eps=eps, maximize=maximize)
    outs = []
    for fn, dev in ((_ops().sparse_adamw_, DEV), (torch.ops.lvopt.sparse_adamw_, "cpu"),
                    (reference.sparse_adamw_, "cpu")):
        pp, mm, vv = (t.clone().to(dev) for t in (p, m, v))
        ss, ll = step.clone(), last.clone().to(dev)
        st = torch.full((1, 2), 7.0, dtype=torch.float64, device=dev) if stats else None
        kw = {} if st is None else {"stats": st}
        if exact:
            fn(pp, ids.to(dev), vals.to(dev), mm, vv, ss, ll, h, q, hyper, base, e, w, True, **kw)
        else:
            fn(pp, ids.to(dev), vals.to(dev), mm, vv, ss, torch.empty(0, dtype=torch.int64), torch.empty(0),
               torch.empty(0), hyper, 0, 1, 0, False, **kw)
        outs.append((pp.cpu(), mm.cpu(), vv.cpu(), ss, ll.cpu(), None if st is None else st.cpu()))
    return (p, m, v, step, last, vals), outs


@needs_triton_device
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
def test_sparse_adamw_matches_cpu_and_reference(gen, dtype, exact):
    V, d, T = 12, 70, 300
    ids = torch.tensor([3, 9, 3, 0, 11, 3, 5, 9])
    before, (tri, cpu, ref) = _step_all(V, d, dtype, gen, T, exact, ids)
    touched = torch.unique(ids)
    untouched = torch.tensor([r for r in range(V) if r not in touched.tolist()])
    assert float(tri[3]) == float(cpu[3]) == float(T)
    for a, b0 in zip(tri[:3], before[:3]):
        assert torch.equal(a[untouched], b0[untouched])  # rows not indexed are not written
        assert not torch.equal(a[touched], b0[touched])
    if exact:
        assert torch.equal(tri[4], cpu[4]) and torch.equal(tri[4], ref[4])
        assert (tri[4][touched] == T).all()
    else:
        assert torch.equal(tri[4], before[4])
    if dtype == torch.float32 and not exact:
        for a, b in zip(tri[:3], cpu[:3]):
            assert torch.equal(a, b)  # math.h's fp32 operation order: the CPU op's bits
    elif dtype == torch.float32:
        # The catch-up scalars come from torch's fp64 exp/pow instead of libm's: a few ulps.
        for a, b in zip(tri[:3], cpu[:3]):
            assert _ulps(a, b) <= 4
    else:
        assert _ulps(tri[1], cpu[1]) <= 4 and _ulps(tri[2], cpu[2]) <= 4
        assert (tri[0].float() - cpu[0].float()).abs().max() <= cpu[0].float().abs().max() * 2.0**-7
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(tri[:3], ref[:3]):
        assert rel_err(a, b) < tol


@needs_triton_device
@needs_native
def test_lazy_maximize_matches_cpu_bitwise(gen):
    before, (tri, cpu, ref) = _step_all(8, 40, torch.float32, gen, 5, False, torch.tensor([1, 6, 1]), maximize=True)
    for a, b in zip(tri[:3], cpu[:3]):
        assert torch.equal(a, b)
    assert rel_err(tri[0], ref[0]) < 1e-6


@needs_triton_device
@needs_native
def test_rows_lagging_by_various_amounts_and_catchup(gen):
    """Exact mode: rows current, one step behind and up to hundreds behind (beyond the window)
    are brought current then stepped; sparse_catchup_ brings the remaining rows to the step."""
    from lvopt import reference

    V, d, T = 10, 41, 700
    clock = _clock(T)
    h, q, base, e, w = clock.op_args()
    assert w < T - 1 - 300  # rows last current at 0, 1 and 300 lag beyond the window
    rev = [(r, c, val) for r in range(V) for c, val in ((5, 0.0), (6, 1e-26), (40, 1e-24))]
    p, m, v, step, last = _state(V, d, torch.float32, gen, T, tiny=rev + [(3, 8), (4, 9), (8, 10)])
    last = torch.tensor([T - 1, T - 2, T - 3, T - 40, T - 200, 0, 1, T - w - 3, 300, T - 1])
    hyper = _hyper(lr=float(h[T - base, 0]))
    ids = torch.arange(V)[torch.randperm(V, generator=gen)][:7]
    vals = torch.randn(7, d, generator=gen)
    res = []
    for dev, fa, fc in ((DEV, _ops().sparse_adamw_, _ops().sparse_catchup_),
                        ("cpu", torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_),
                        ("cpu", reference.sparse_adamw_, reference.sparse_catchup_)):
        pp, mm, vv = (t.clone().to(dev) for t in (p, m, v))
        ss, ll = step.clone(), last.clone()
        fa(pp, ids.to(dev), vals.to(dev), mm, vv, ss, ll, h, q, hyper, base, e, w, True)
        assert (ll[ids] == T).all()
        fc(pp, torch.arange(V).to(dev), mm, vv, ss, ll, h, q, hyper, base, e, w)
        assert (ll == T).all() and float(ss) == T
        res.append((pp.cpu(), mm.cpu(), vv.cpu()))
    tri, cpu, ref = res
    for a, b, c in zip(tri, cpu, ref):
        assert _ulps(a, b) <= 4
        assert rel_err(a, c) < 1e-5


@needs_triton_device
@needs_native
def test_windowed_loop_elements(gen, monkeypatch):
    """Elements with sqrt(v) near eps (v ~ (1e-9)^2, eps = 1e-8) on rows lagging ~100 steps take
    catchup_element_loop's fp64 window sum (their v lies between the series' bounds), and
    the result matches the step-by-step reference and the CPU op; without the loop (turned
    off, so the series serve those elements) it would not."""
    from lvopt import reference
    from lvopt.triton import sparse_rows as S

    V, d, T = 6, 40, 400
    clock = _clock(T)
    h, q, base, e, w = clock.op_args()
    p, m, v, step, last = _state(V, d, torch.float32, gen, T, tiny=[(1, 3), (1, 17), (4, 0), (4, 39)])
    last = torch.tensor([T - 1, T - 100, T - 5, 10, T - 120, T - 2])
    hyper = _hyper(lr=float(h[T - base, 0]))
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

    tri = run(DEV, _ops().sparse_adamw_)
    cpu = run("cpu", torch.ops.lvopt.sparse_adamw_)
    ref = run("cpu", reference.sparse_adamw_)
    mids = [(1, 3), (1, 17), (4, 0), (4, 39)]
    # The reference sums ~100 fp32 steps one by one: over 40 seeds it sat up to 1.3e-6 (relative)
    # from the closed form on these elements, where the CPU and Triton ops agreed bit for bit.
    for r, c in mids:
        assert abs(float(tri[r, c]) - float(ref[r, c])) <= 4e-6 * abs(float(ref[r, c])) + 1e-7
    assert _ulps(tri, cpu) <= 4 and rel_err(tri, ref) < 1e-5

    monkeypatch.setattr(S, "WINDOW_LOOP", False)
    wrong = run(DEV, _ops().sparse_adamw_)
    err = max(abs(float(wrong[r, c]) - float(ref[r, c])) for r, c in mids)
    assert err > 1e-5 * max(abs(float(ref[r, c])) for r, c in mids)


@needs_triton_device
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
def test_stats(gen, dtype, exact):
    V, d, T = 9, 50, 60
    ids = torch.tensor([2, 7, 2, 4])
    before, (tri, cpu, ref) = _step_all(V, d, dtype, gen, T, exact, ids, stats=True)
    rows = torch.unique(ids)
    b64, a64 = before[0][rows].double(), tri[0][rows].double()
    assert float(tri[5][0, 0]) == pytest.approx(float((b64 * b64).sum()), rel=1e-12)
    assert float(tri[5][0, 1]) == pytest.approx(float(((a64 - b64) ** 2).sum()), rel=1e-10)
    assert tri[5][0, 0] > 0 and tri[5][0, 1] > 0
    assert float(tri[5][0, 0]) == pytest.approx(float(cpu[5][0, 0]), rel=1e-12)
    assert float(tri[5][0, 1]) == pytest.approx(float(cpu[5][0, 1]), rel=1e-5)


@needs_triton_device
@pytest.mark.parametrize("exact", [False, True])
def test_empty_index_list_only_advances_step(gen, exact):
    V, d, T = 5, 40, 30
    before, (tri, cpu, ref) = _step_all(V, d, torch.float32, gen, T, exact, torch.empty(0, dtype=torch.int64),
                                        stats=True)
    assert float(tri[3]) == float(T) == float(cpu[3])
    for a, b in zip(tri[:3], before[:3]):
        assert torch.equal(a, b)
    assert torch.equal(tri[4], before[4])
    assert tri[5].abs().sum() == 0.0


@needs_triton_device
def test_catchup_skips_current_rows(gen):
    V, d, T = 6, 40, 50
    clock = _clock(T)
    h, q, base, e, w = clock.op_args()
    p, m, v, _, _ = _state(V, d, torch.float32, gen, T)
    last = torch.tensor([T, T, 3, T, 20, T])
    step = torch.tensor(float(T))
    pp, mm, vv = _to((p.clone(), m.clone(), v.clone()))
    _ops().sparse_catchup_(pp, torch.tensor([0, 2, 2, 3]).to(DEV), mm, vv, step, last, h, q, _hyper(), base, e, w)
    assert last.tolist() == [T, T, T, T, 20, T] and float(step) == T
    for a, b in zip((pp.cpu(), mm.cpu(), vv.cpu()), (p, m, v)):
        assert torch.equal(a[[0, 1, 3, 4, 5]], b[[0, 1, 3, 4, 5]])
        assert not torch.equal(a[2], b[2])


# ----- errors, opcheck ---------------------------------------------------------------------------

@needs_triton_device
def test_sparse_adamw_compiles_with_torch_compile(gen):
    """The custom op and its fake kernel trace under torch.compile (fullgraph); same bits."""
    V, d, T = 9, 40, 20
    clock = _clock(T)
    h, q, base, e, w = clock.op_args()
    hyper = _hyper(lr=float(h[T - base, 0]))
    p, m, v, step, last = _state(V, d, torch.float32, gen, T)
    ids = torch.tensor([4, 1, 4]).to(DEV)
    vals = torch.randn(3, d, generator=gen).to(DEV)
    a = [t.clone() for t in _to((p, m, v))] + [step.clone(), last.clone()]
    b = [t.clone() for t in _to((p, m, v))] + [step.clone(), last.clone()]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(p, m, v, step, last):
        _ops().sparse_adamw_(p, ids, vals, m, v, step, last, h, q, hyper, base, e, w, True)

    f(*a)
    _ops().sparse_adamw_(b[0], ids, vals, b[1], b[2], b[3], b[4], h, q, hyper, base, e, w, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0].cpu(), p)


# ----- the optimizer -----------------------------------------------------------------------------

@needs_triton_device
@needs_native
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_optimizer_backend_triton_matches_cpu(gen, mode):
    """lvopt.AdamW(backend="triton") on an nn.Embedding(sparse=True) equals backend="cpu"."""
    import lvopt

    V, d = 30, 40
    w0 = torch.randn(V, d, generator=gen)
    embs, opts = [], []
    for backend, dev in (("triton", DEV), ("cpu", "cpu")):
        emb = torch.nn.Embedding(V, d, sparse=True).to(dev)
        with torch.no_grad():
            emb.weight.copy_(w0)
        embs.append(emb)
        opts.append(lvopt.AdamW(emb.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, sparse_mode=mode))
    for step in range(4):
        ids = torch.randint(0, 8 if step < 2 else V, (6,), generator=gen)
        ids[0] = 3
        tgt = torch.randn(6, d, generator=gen)
        for emb, opt in zip(embs, opts):
            dev = emb.weight.device
            opt.zero_grad()
            ((emb(ids.to(dev)) - tgt.to(dev)) ** 2).sum().backward()
            opt.step()
    for o in opts:
        if mode == "exact":
            o.flush()
    a, b = embs[0].weight.detach().cpu(), embs[1].weight.detach()
    assert not torch.equal(b, w0)
    if mode == "lazy":
        assert torch.equal(a, b)
    else:
        assert _ulps(a, b) <= 8 and rel_err(a, b) < 1e-6


@needs_triton_device
@needs_native
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_optimizer_defers_bad_ids_and_writes_nothing(gen, mode):
    """backend="triton" checks ids on the device (check_ids="deferred"): a step given an id
    outside the table writes nothing to that table (rows, moments, step count, last steps), the
    next step() raises naming the parameter and the ids' range, and training then goes on as if
    the bad step had not been taken (equal to a run without it). check_ids="sync" raises in
    the step itself, before anything is written."""
    import lvopt

    V, d = 20, 40
    w0 = torch.randn(V, d, generator=gen)
    batches = [torch.randint(0, V, (6,), generator=gen) for _ in range(5)]
    tgts = [torch.randn(6, d, generator=gen) for _ in range(5)]

    def make(**kw):
        emb = torch.nn.Embedding(V, d, sparse=True).to(DEV)
        with torch.no_grad():
            emb.weight.copy_(w0)
        return emb, lvopt.AdamW(emb.parameters(), lr=1e-2, weight_decay=0.1, backend="triton", sparse_mode=mode, **kw)

    def step(emb, opt, ids, tgt):
        opt.zero_grad()
        ((emb(ids.to(DEV)) - tgt.to(DEV)) ** 2).sum().backward()
        opt.step()

    emb, opt = make()
    clean, copt = make()
    for i in range(2):
        step(emb, opt, batches[i], tgts[i])
        step(clean, copt, batches[i], tgts[i])
    st = opt.state[emb.weight]
    snap = [emb.weight.detach().clone()] + [st[k].clone() for k in ("exp_avg", "exp_avg_sq", "step")]
    if mode == "exact":
        snap.append(st["last_step"].clone())
    bad = emb.weight.grad.clone()
    opt.zero_grad()
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, V + 4, 2]]).to(DEV), torch.randn(3, d).to(DEV),
                                              (V, d))
    opt.step()  # queued; nothing written
    after = [emb.weight.detach()] + [st[k] for k in ("exp_avg", "exp_avg_sq", "step")]
    if mode == "exact":
        after.append(st["last_step"])
    for a, b in zip(after, snap):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=rf"param 0 of group 0 .*row indices in \[1, {V + 4}\], outside \[0, {V}\)"):
        step(emb, opt, batches[2], tgts[2])
    del bad
    for i in range(2, 5):
        step(emb, opt, batches[i], tgts[i])
        step(clean, copt, batches[i], tgts[i])
    if mode == "exact":
        opt.flush()
        copt.flush()
    assert torch.equal(emb.weight.detach(), clean.weight.detach())
    assert float(opt.state[emb.weight]["step"]) == 5.0

    emb, opt = make(check_ids="sync")
    step(emb, opt, batches[0], tgts[0])
    before = emb.weight.detach().clone()
    opt.zero_grad()
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[-2, 3]]).to(DEV), torch.randn(2, d).to(DEV), (V, d))
    with pytest.raises(ValueError, match="negative row index -2"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@needs_triton_device
@needs_native
@pytest.mark.parametrize("exact", [False, True])
def test_long_runs_are_summed_in_pieces(gen, exact):
    """A row given 77 times (more than RUN = 32) is summed in pieces of 32 rows, then the pieces
    in order (the CUDA kernel's grouping): its gradient equals that grouping bit for bit, and the
    step equals the CPU op (a sequential sum) within fp32 rounding; rows given fewer times match
    the CPU op bit for bit in lazy mode."""
    from lvopt.triton import sparse_rows as S

    V, d, T = 9, 40, 30
    ids = torch.cat([torch.full((77,), 4), torch.tensor([1, 7, 1])])[torch.randperm(80, generator=gen)]
    before, (tri, cpu, ref) = _step_all(V, d, torch.float32, gen, T, exact, ids)
    # The gradient of row 4 as the pieces sum it: a plain sum of 32-row sums, in input order.
    vals = before[5]
    pos = (ids == 4).nonzero().reshape(-1)
    def in_order(rows):
        acc = rows[0].clone()
        for r in rows[1:]:
            acc = acc + r
        return acc

    pieces = [in_order(vals[pos[i: i + S.RUN]]) for i in range(0, pos.numel(), S.RUN)]
    assert len(pieces) == 3
    assert rel_err(tri[0], cpu[0]) < 1e-5
    if not exact:
        others = [r for r in range(V) if r != 4]
        assert torch.equal(tri[0][others], cpu[0][others])
        # Row 4 stepped by the CPU op with the pieces' grouping of its gradient: the same bits.
        g4 = in_order(pieces)
        assert not torch.equal(g4, in_order(vals[pos]))  # the grouping shows in the bits here
        p, m, v, step = (t.clone() for t in before[:4])
        clock = _clock(T)
        h = clock.op_args()[0]
        torch.ops.lvopt.sparse_adamw_(p, torch.tensor([4]), g4[None], m, v, step, torch.empty(0, dtype=torch.int64),
                                      torch.empty(0), torch.empty(0), _hyper(lr=float(h[T, 0]), wd=0.1), 0, 1, 0,
                                      False)
        assert torch.equal(tri[0][4], p[4]) and torch.equal(tri[1][4], m[4])
