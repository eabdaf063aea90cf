"""Non-finite gradient policy (issue 9): nonfinite="propagate" | "skip" | "raise".

"skip" and "raise" must leave parameters, moments, step counts and the exact-mode row
bookkeeping bit for bit as they were, for dense and sparse groups, whichever tensor holds the
NaN/inf (the batch whose op scans inside its own pass, a pre-scanned batch, a sparse table),
and the next clean step must continue exactly as if the bad step had never been attempted.
"""

import copy

import pytest
import torch

import lvopt
from conftest import make_hyper, make_state, needs_native

BACKENDS = ["cpu", "reference"]
BAD = [float("nan"), float("inf"), float("-inf")]


def _model(dtype, gen, hyperball=False):
    """Dense tensors (one large, several small, fp32 or bf16), a sparse exact table and a
    sparse lazy table; with hyperball=True an AdamH optimizer gets two dense batches."""
    dense = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(300, 257), (17,), (5, 9)]]
    tables = [torch.nn.Parameter(torch.randn(40, 12, generator=gen).to(dtype)) for _ in range(2)]
    return dense, tables


def _optimizer(cls, dense, tables, backend, nonfinite, **kw):
    groups = [
        {"params": dense[:1]},
        {"params": dense[1:], "weight_decay": 0.0, "hyperball": False},
        {"params": tables[:1], "sparse_mode": "exact", "hyperball": False},
        {"params": tables[1:], "sparse_mode": "lazy", "hyperball": False},
    ]
    if cls is lvopt.AdamW:
        for g in groups:
            g.pop("hyperball", None)
    return cls(
        groups, lr=1e-2, weight_decay=0.0 if cls is lvopt.AdamH else 0.1, backend=backend, nonfinite=nonfinite, **kw
    )


def _set_grads(dense, tables, gen, bad_at=None, bad=float("nan")):
    for i, p in enumerate(dense):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        if bad_at == ("dense", i):
            g.view(-1)[g.numel() // 2] = bad
        p.grad = g
    for i, t in enumerate(tables):
        idx = torch.randint(0, t.shape[0], (9,), generator=gen)
        vals = torch.randn(9, t.shape[1], generator=gen).to(t.dtype)
        if bad_at == ("sparse", i):
            vals[4, 3] = bad
        t.grad = torch.sparse_coo_tensor(idx[None], vals, t.shape)


def _snapshot(opt, params):
    state = {}
    for p in params:
        st = opt.state.get(p, {})
        state[p] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in st.items()}
    return [p.detach().clone() for p in params], state


def _assert_same(opt, params, snap):
    values, state = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    for p in params:
        st = opt.state.get(p, {})
        assert set(st) == set(state[p])
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, state[p][k]), k
            elif k == "row_clock":
                assert v.n == state[p][k].n and v.base == state[p][k].base, k


@needs_native
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [lvopt.AdamW, lvopt.AdamH])
@pytest.mark.parametrize("where", [("dense", 0), ("dense", 1), ("sparse", 0), ("sparse", 1)])
def test_skip_writes_nothing_and_continues_exactly(backend, dtype, cls, where, gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    runs = []
    for attempt_bad in (True, False):
        g = torch.Generator().manual_seed(seed)
        dense, tables = _model(dtype, g)
        params = dense + tables
        opt = _optimizer(cls, dense, tables, backend, "skip")
        for _ in range(2):
            _set_grads(dense, tables, g)
            opt.step()
        if attempt_bad:
            snap = _snapshot(opt, params)
            for bad in BAD:
                _set_grads(dense, tables, torch.Generator().manual_seed(1), bad_at=where, bad=bad)
                opt.step()
                _assert_same(opt, params, snap)
            assert opt.skipped_steps == len(BAD)
        for _ in range(2):
            _set_grads(dense, tables, g)
            opt.step()
        opt.flush()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", [("dense", 0), ("dense", 2), ("sparse", 0)])
def test_raise_names_the_parameter_and_writes_nothing(backend, where, gen):
    dense, tables = _model(torch.float32, gen)
    params = dense + tables
    opt = _optimizer(lvopt.AdamW, dense, tables, backend, "raise")
    _set_grads(dense, tables, gen)
    opt.step()
    snap = _snapshot(opt, params)
    _set_grads(dense, tables, gen, bad_at=where, bad=float("inf"))
    kind, i = where
    gi = 0 if (kind, i) == ("dense", 0) else 1 if kind == "dense" else 2 + i
    pi = i - 1 if kind == "dense" and i > 0 else 0
    with pytest.raises(lvopt.NonFiniteGradientError, match=rf"param {pi} of group {gi} .*1 of \d+ gradient elements"):
        opt.step()
    _assert_same(opt, params, snap)
    assert opt.skipped_steps == 0


@needs_native
@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_first_step_creates_no_state(backend, gen):
    dense, tables = _model(torch.float32, gen)
    opt = _optimizer(lvopt.AdamH, dense, tables, backend, "skip")
    _set_grads(dense, tables, gen, bad_at=("dense", 1))
    opt.step()
    assert len(opt.state) == 0 and opt.skipped_steps == 1


@needs_native
@pytest.mark.parametrize("backend", BACKENDS)
def test_propagate_lets_nan_through_like_torch(backend, gen):
    p = torch.nn.Parameter(torch.randn(64, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    ours = lvopt.AdamW([p], lr=1e-2, backend=backend)  # the default policy
    ref = torch.optim.AdamW([q], lr=1e-2)
    g = torch.randn(64, generator=gen)
    g[3] = float("nan")
    p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    assert ours.nonfinite == "propagate"
    assert torch.equal(torch.isnan(p), torch.isnan(q)) and bool(torch.isnan(p[3]))


def test_policy_is_validated():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        lvopt.AdamW([torch.nn.Parameter(torch.zeros(2))], nonfinite="ignore")


# ----- the ops' found_inf protocol ------------------------------------------------------------


def _ops_and_ref():
    return [torch.ops.lvopt, lvopt.reference]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_found_inf_protocol(dtype, gen):
    shapes = [(70000,), (33, 65)]
    for ops in _ops_and_ref():
        ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=2)
        before = [t.clone() for t in ps + ms + vs + ss]
        gs[1][3, 4] = float("nan")
        found = torch.zeros(1)
        ops.fused_adamw_(ps, gs, ms, vs, ss, make_hyper(2), found)
        assert float(found) == 1.0
        assert all(torch.equal(a, b) for a, b in zip(ps + ms + vs + ss, before))
        radii = [torch.tensor(1.0, dtype=torch.float64) for _ in shapes]
        found.zero_()
        stats = ops.fused_adamh_(ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0), found)
        assert float(found) == 1.0 and not stats.any()
        assert all(torch.equal(a, b) for a, b in zip(ps + ms + vs + ss, before))
        # A flag already set by an earlier op stops a clean step too.
        gs[1][3, 4] = 0.0
        found.fill_(1.0)
        ops.fused_adamw_(ps, gs, ms, vs, ss, make_hyper(2), found)
        assert all(torch.equal(a, b) for a, b in zip(ps + ms + vs + ss, before))
        found.zero_()
        ops.fused_adamw_(ps, gs, ms, vs, ss, make_hyper(2), found)
        assert float(found) == 0.0 and all(float(s) == 3.0 for s in ss)


@needs_native
def test_nonfinite_scan_op(gen):
    for ops in _ops_and_ref():
        ts = [torch.randn(70001, generator=gen), torch.randn(5, 3, generator=gen).bfloat16(), torch.empty(0)]
        found = torch.zeros(1)
        ops.nonfinite_scan_(ts, found)
        assert float(found) == 0.0
        for bad in BAD:
            for i in (0, 1):
                found.zero_()
                t = ts[i].clone()
                t.view(-1)[-1] = bad
                ops.nonfinite_scan_([ts[1 - i], t], found)
                assert float(found) == 1.0


@needs_native
def test_found_inf_argument_is_checked(gen):
    ps, gs, ms, vs, ss = make_state([(4,)], torch.float32, gen)
    with pytest.raises(RuntimeError, match="found_inf must be a one-element float32"):
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, make_hyper(1), torch.zeros(2))
    assert float(ss[0]) == 0.0


@needs_native
def test_opcheck_with_found_inf(gen):
    ps, gs, ms, vs, ss = make_state([(33, 17), (5,)], torch.float32, gen, steps=1)
    torch.library.opcheck(
        torch.ops.lvopt.fused_adamw_.default,
        (ps, gs, ms, vs, ss, make_hyper(2), torch.zeros(1), torch.zeros(2, 2, dtype=torch.float64)),
    )
    radii = [torch.tensor(3.0, dtype=torch.float64) for _ in ps]
    torch.library.opcheck(
        torch.ops.lvopt.fused_adamh_.default, (ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0), torch.zeros(1))
    )
    torch.library.opcheck(torch.ops.lvopt.nonfinite_scan_.default, ([gs[0], gs[1]], torch.zeros(1)))


@needs_native
def test_policy_survives_pickling():
    import pickle

    p = torch.nn.Parameter(torch.randn(3))
    opt = lvopt.AdamW([p], nonfinite="skip", track=True, backend="reference")
    opt.skipped_steps = 2
    back = pickle.loads(pickle.dumps(opt))
    assert (back.nonfinite, back.track, back.skipped_steps, back.backend) == ("skip", True, 2, "reference")
    back.param_groups[0]["params"][0].grad = torch.full((3,), float("nan"))
    back.step()
    assert back.skipped_steps == 3
