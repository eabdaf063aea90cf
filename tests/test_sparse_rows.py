"""Sparse embedding rows (docs/design.md section 2.3): lvopt::coalesce_rows, lvopt::sparse_adamw_ and
lvopt::sparse_catchup_ (csrc/cpu/sparse_rows.cpp) against the reference (lvopt/reference.py);
the exact mode against dense fp64 AdamW; lazy mode against torch.optim.SparseAdam; the
optimizer and lvopt.nn.Embedding end to end."""
import math
import os
import warnings

import pytest
import torch
from torch import nn

import lvopt
from lvopt import reference
from lvopt.sparse import RowClock
from conftest import IN_TRITON_CHILD, needs_native, rel_err, run_python, run_triton_child

if not IN_TRITON_CHILD:

    def test_triton_in_interpreter_child():
        """The Triton cases of the backend-parametrised tests here (coalescing, errors, opcheck); the
        rest of the Triton sparse-row tests are tests/test_triton_sparse_rows.py's."""
        run_triton_child(__file__)


def _zipf_ids(n, v, gen, a=1.1):
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    return torch.multinomial(ranks ** -a, n, replacement=True, generator=gen)


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
        ids = ids_fn(t, g2) if ids_fn else torch.randint(0, V, (int(torch.randint(0, 9, (1,), generator=g2)),), generator=g2)
        vals = torch.randn(ids.numel(), d, generator=g2).to(dtype)
        h, q, base, e, w = clock.op_args()
        fn(p, ids, vals, m, v, step, last, h, q, hyper, base, e, w, exact)
        G = torch.zeros(V, d, dtype=torch.float64).index_add_(0, ids, vals.double())
        reference.fused_adamw_([P], [G], [M], [Vv], [torch.tensor(float(t - 1), dtype=torch.float64)], hyper)
    if exact:
        h, q, base, e, w = clock.op_args()
        catchup(p, torch.arange(V), m, v, step, last, h, q, clock.hyper(), base, e, w)
    return (p, m, v, step, last), (P, M, Vv)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [True, False])
def test_sparse_adamw_matches_reference(gen, dtype, exact):
    V, d = 23, 37
    cpu, _ = _run_ops(torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_, V, d, dtype,
                      torch.Generator().manual_seed(gen.initial_seed()), 60, exact=exact)
    ref, _ = _run_ops(reference.sparse_adamw_, reference.sparse_catchup_, V, d, dtype,
                      torch.Generator().manual_seed(gen.initial_seed()), 60, exact=exact)
    assert float(cpu[3]) == float(ref[3]) == 60.0
    if exact:
        assert torch.equal(cpu[4], ref[4])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(cpu[:3], ref[:3]):
        assert rel_err(a, b) < tol


@needs_native
@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.9, 0.95), 1e-6), ((0.8, 0.95), 1e-10),
                                       ((0.9, 0.999), 3e-2)])
def test_exact_matches_dense_fp64(gen, betas, eps):
    """Rows untouched for up to hundreds of steps, LR schedule, weight decay: the closed-form
    catch-up equals dense AdamW with g = 0 within fp32 rounding (eps = 3e-2 puts many elements
    on the exact windowed loop)."""
    V, d = 40, 33

    def ids_fn(t, g):
        hot = torch.randint(0, 4, (3,), generator=g)
        rare = torch.randint(4, V, (1,), generator=g) if t % 23 == 0 else torch.empty(0, dtype=torch.int64)
        return torch.cat([hot, rare, hot[:1]])

    (p, m, v, *_), (P, M, Vv) = _run_ops(torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_, V, d,
                                         torch.float32, gen, 700, betas=betas, eps=eps, ids_fn=ids_fn)
    # fp32 rounding of 700 steps of the hot rows (dense fp32 AdamW drifts as much: v's
    # beta2 = 0.999 accumulation gains ~1e-6 relative per few hundred steps).
    assert rel_err(p, P) < 5e-6 and rel_err(m, M) < 5e-6 and rel_err(v, Vv) < 2e-5


def test_reference_exact_matches_dense_fp64(gen):
    """The reference's step-by-step catch-up in fp64 is dense fp64 AdamW (the oracle)."""
    V, d = 9, 5
    (p, m, v, *_), (P, M, Vv) = _run_ops(reference.sparse_adamw_, reference.sparse_catchup_, V, d,
                                         torch.float64, gen, 50)
    assert rel_err(p, P) < 1e-12 and rel_err(m, M) < 1e-12


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
            tables, _ = _run_ops(torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_, 200, d,
                                 torch.float32, torch.Generator().manual_seed(3), 40,
                                 ids_fn=lambda t, g: torch.randint(0, 200, (300,), generator=g))
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
    clock = RowClock(0.9, 0.999, 1e-8, 0)
    for t in range(1, 4):
        clock.append(t, 1e-2, 0.1)
    h, q, base, e, w = clock.op_args()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    ids = torch.tensor([3, 1, 3, 7], device=dev)
    for exact in (True, False):
        last = torch.tensor([0, 1, 2] * 3 + [0, 0])
        args = (torch.randn(V, d, device=dev), ids, torch.randn(4, d, device=dev), torch.rand(V, d, device=dev),
                torch.rand(V, d, device=dev) + 0.1, torch.tensor(2.0), last if host_last else last.to(dev),
                h, q, hyper, base, e, w, exact)
        torch.library.opcheck(backend.op("sparse_adamw_"), args, kw)
    last = torch.zeros(V, dtype=torch.int64)
    torch.library.opcheck(backend.op("sparse_catchup_"),
                          (torch.randn(V, d, device=dev), ids, torch.rand(V, d, device=dev),
                           torch.rand(V, d, device=dev) + 0.1, torch.tensor(3.0), last if host_last else last.to(dev),
                           h, q, hyper, base, e, w), kw)
    torch.library.opcheck(backend.op("coalesce_rows"), (ids, torch.randn(4, d, device=dev), V),
                          test_utils=("test_schema", "test_faketensor"))


def test_reference_errors_write_nothing():
    """The reference's own checks of ids and values (the backends': test_errors_write_nothing)."""
    f = reference.sparse_adamw_
    V, d = 6, 4
    clock = RowClock(0.9, 0.999, 1e-8, 0)
    clock.append(1, 1e-2, 0.1)
    h, q, base, e, w = clock.op_args()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    for pattern, ids, vals in [("negative index -1", torch.tensor([0, -1]), torch.randn(2, d)),
                               ("index 6 at position 1 is out of range", torch.tensor([0, 6]), torch.randn(2, d)),
                               ("values", torch.tensor([0, 1]), torch.randn(2, d + 1)),
                               ("values", torch.tensor([0, 1]), torch.randn(2, d).double())]:
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
    clock = RowClock(0.9, 0.999, 1e-8, 0)
    for t in range(1, T + 1):
        clock.append(t, 1e-2 * (0.55 + 0.45 * math.cos(t / 37.0)), 0.1)
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
        return {**dict(param=p, indices=ids, values=vals, exp_avg=m, exp_avg_sq=v, step=step, last_step=last,
                       hist=h, qpow=q, hyper=hyper, hist_base=base, epoch=e, window=w, exact=True), **kw}

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


# ----- the optimizer ---------------------------------------------------------------------------

class _Model(nn.Module):
    def __init__(self, emb, V=300, d=16):
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(d, 5)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids))).square().mean()


def _train(make_emb, opt_fn, steps, gen_seed, V=300, d=16, sched=True, catch_up=False):
    torch.manual_seed(0)
    model = _Model(make_emb(), V, d)
    opt = opt_fn(model)
    g = torch.Generator().manual_seed(gen_seed)
    for t in range(steps):
        ids = _zipf_ids(20, V, g).reshape(4, 5)
        if sched:
            for grp in opt.param_groups:
                grp["lr"] = 1e-2 * (0.5 + 0.5 * math.cos(t / 20))
        if catch_up:
            opt.catch_up(model.emb.weight, ids)
        opt.zero_grad()
        model(ids).backward()
        opt.step()
    return model, opt


@needs_native
@pytest.mark.parametrize("kind", ["lvopt", "torch_sparse"])
def test_exact_optimizer_equals_dense_adamw(kind):
    """Training through lvopt.nn.Embedding (or nn.Embedding(sparse=True) with catch_up) in exact
    mode gives dense AdamW's trajectory: same forward values, same checkpoint."""
    V, d = 300, 16
    mk = (lambda: lvopt.nn.Embedding(V, d)) if kind == "lvopt" else (lambda: nn.Embedding(V, d, sparse=True))
    m1, o1 = _train(mk, lambda mod: lvopt.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1), 80, 1,
                    catch_up=kind != "lvopt")
    m2, o2 = _train(lambda: nn.Embedding(V, d), lambda mod: lvopt.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1), 80, 1)
    sd1, sd2 = o1.state_dict(), o2.state_dict()
    assert rel_err(m1.emb.weight, m2.emb.weight) < 1e-5
    assert rel_err(m1.head.weight, m2.head.weight) < 1e-5
    for k in sd2["state"]:
        assert set(sd1["state"][k]) == set(sd2["state"][k])
        for n in ("exp_avg", "exp_avg_sq"):
            assert rel_err(sd1["state"][k][n], sd2["state"][k][n]) < 1e-5
        assert float(sd1["state"][k]["step"]) == float(sd2["state"][k]["step"])
    # and torch.optim.AdamW continues from the lvopt checkpoint
    t = torch.optim.AdamW(m1.parameters())
    t.load_state_dict(sd1)


@needs_native
def test_lazy_matches_sparse_adam(gen):
    """Lazy mode with wd = 0 is SparseAdam, up to where SparseAdam adds eps: to sqrt(v), not to
    sqrt(v/bc2), i.e. an eps 1/sqrt(bc2) (~30x at step 1) larger on lvopt's scale. An element
    whose first gradient is ~1e-5 (about one draw in 10^5; 4 seeds in 60 had one) then steps
    ~3% apart, which alone exceeds 1e-6 of the table's norm; with eps = 1e-16 in both the
    placement is below fp32 rounding for any gradient that is not itself tiny."""
    V, d = 300, 16
    a = nn.Parameter(torch.randn(V, d, generator=gen))
    b = nn.Parameter(a.detach().clone())
    o1 = lvopt.AdamW([a], lr=1e-2, weight_decay=0.0, eps=1e-16, sparse_mode="lazy")
    o2 = torch.optim.SparseAdam([b], lr=1e-2, eps=1e-16)
    for _ in range(100):
        ids = _zipf_ids(40, V, gen)
        a.grad = torch.sparse_coo_tensor(ids[None], torch.randn(40, d, generator=gen), (V, d))
        b.grad = a.grad.clone()
        o1.step(); o2.step()
    # relative to the table's norm: the two round differently (SparseAdam folds sqrt(bc2) into
    # the step size), so single elements drift apart by a few fp32 ulps over 100 steps.
    assert float((a - b).norm() / b.norm()) < 1e-6
    assert "last_step" not in o1.state[a]


@needs_native
def test_flush_and_state_dict_bring_rows_current_and_resume():
    V, d = 300, 16
    mk = lambda: lvopt.nn.Embedding(V, d)  # noqa: E731
    opt_fn = lambda mod: lvopt.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1)  # noqa: E731
    m1, o1 = _train(mk, opt_fn, 30, 3, sched=False)
    st = o1.state[m1.emb.weight]
    assert int(st["last_step"].min()) < 30
    sd = o1.state_dict()
    assert int(st["last_step"].min()) == 30
    assert "last_step" not in sd["state"][0] and "row_clock" not in sd["state"][0]
    # resume in a fresh optimizer: identical to continuing
    m2 = _Model(mk(), V, d)
    m2.load_state_dict(m1.state_dict())
    o2 = opt_fn(m2)
    o2.load_state_dict(sd)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        ids = _zipf_ids(20, V, g).reshape(4, 5)
        for mod, opt in ((m1, o1), (m2, o2)):
            opt.zero_grad()
            mod(ids).backward()
            opt.step()
    o1.flush(); o2.flush()
    assert torch.equal(m1.emb.weight, m2.emb.weight)


@needs_native
def test_tied_embedding_is_stepped_densely_with_one_warning():
    V, d = 50, 8
    emb = lvopt.nn.Embedding(V, d)
    head = nn.Linear(d, V, bias=False)
    head.weight = emb.weight
    opt = lvopt.AdamW(list(emb.parameters()), lr=1e-2)
    ref = nn.Parameter(emb.weight.detach().clone())
    ropt = torch.optim.AdamW([ref], lr=1e-2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            ids = torch.randint(0, V, (6,))
            opt.zero_grad(); ropt.zero_grad()
            head(emb(ids)).logsumexp(-1).sum().backward()
            torch.nn.functional.linear(torch.nn.functional.embedding(ids, ref), ref).logsumexp(-1).sum().backward()
            assert emb.weight.grad.layout == torch.strided
            opt.step(); ropt.step()
    assert sum(issubclass(w.category, lvopt.DenseEmbeddingGradWarning) for w in rec) == 1
    assert rel_err(emb.weight, ref) < 1e-6


@needs_native
def test_sparse_then_dense_grads_flush_first():
    V, d = 40, 6
    p = nn.Parameter(torch.randn(V, d))
    q = nn.Parameter(p.detach().clone())
    opt, ref = lvopt.AdamW([p], lr=1e-2), lvopt.AdamW([q], lr=1e-2)
    for t in range(12):
        ids = torch.randint(0, 5, (3,))
        vals = torch.randn(3, d)
        g = torch.sparse_coo_tensor(ids[None], vals, (V, d))
        p.grad = g if t < 8 else g.to_dense()
        q.grad = g.to_dense()
        opt.step(); ref.step()
    assert rel_err(p, q) < 1e-5
    assert "last_step" not in opt.state[p]


@needs_native
def test_optimizer_errors_change_nothing():
    V, d = 10, 4
    cases = []
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(("out of range", lvopt.AdamW([q, p]), [q, p],
                  [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1, 10]]), torch.randn(2, d), (V, d))]))
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(("negative row index", lvopt.AdamW([q, p]), [q, p],
                  [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1, -2]]), torch.randn(2, d), (V, d))]))
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(("hyperball group", lvopt.AdamH([p, q]), [p, q],
                  [torch.sparse_coo_tensor(torch.tensor([[1]]), torch.randn(1, d), (V, d)), torch.randn(3)]))
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(("beta1\\*\\*2 < beta2", lvopt.AdamW([q, p], betas=(0.99, 0.9)), [q, p],
                  [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1]]), torch.randn(1, d), (V, d))]))
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(("sparse_mode must be", lvopt.AdamW([q, p], sparse_mode="lazzy") if False else lvopt.AdamW([q, p]),
                  [q, p], [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1]]), torch.randn(1, d), (V, d))]))
    cases[-1][1].param_groups[0]["sparse_mode"] = "lazzy"
    for pattern, opt, params, grads in cases:
        before = [t.detach().clone() for t in params]
        for t, g in zip(params, grads):
            t.grad = g
        with pytest.raises((ValueError, TypeError), match=pattern):
            opt.step()
        for t, b in zip(params, before):
            assert torch.equal(t.detach(), b)
        assert not opt.state


def test_embedding_grad_is_row_sparse_and_coalesced():
    emb = lvopt.nn.Embedding(1000, 8, padding_idx=0)
    ids = torch.tensor([[5, 0, 7], [5, 999, 5]])
    emb(ids).sum().backward()
    g = emb.weight.grad
    assert g.layout == torch.sparse_coo
    assert g._indices()[0].tolist() == [5, 7, 999]
    ref = nn.Embedding(1000, 8, padding_idx=0)
    ref.weight.data.copy_(emb.weight.data)
    ref(ids).sum().backward()
    assert torch.equal(g.to_dense(), ref.weight.grad)
    with pytest.raises(NotImplementedError):
        lvopt.nn.Embedding(10, 2, max_norm=1.0)


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
    clock = RowClock(0.9, 0.999, 1e-8, 0)
    clock.append(1, 1e-2, 0.1)
    h, q, base, e, w = clock.op_args()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    stale = torch.zeros(V, dtype=torch.int64)
    stale[2] = 5
    cases = [(torch.tensor([0, -3, 2]), torch.zeros(V, dtype=torch.int64), [0, 0, 0], [1, -3, 2]),
             (torch.tensor([5, 9, 1]), torch.zeros(V, dtype=torch.int64), [0, 0, 0], [1, 1, 9]),
             (torch.tensor([0, 1]), torch.zeros(V, dtype=torch.int64), [2, 0, 0], [2, 0, 0])]
    if exact:
        cases.append((torch.tensor([2, 3]), stale, [0, 0, 0], [2, 0, 0]))
    for ids, last, word0, word1 in cases:
        p, m, v = torch.randn(V, d, generator=gen), torch.rand(V, d, generator=gen), torch.rand(V, d, generator=gen)
        step, stats = torch.tensor(1.0), torch.full((1, 2), 7.0, dtype=torch.float64)
        err = torch.tensor(word0)
        before = [t.clone() for t in (p, m, v, step, last)]
        adam(p, ids, torch.randn(ids.numel(), d, generator=gen), m, v, step, last, h, q, hyper, base, e, w, exact,
             stats=stats, error=err)
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
    adam(p, torch.tensor([1, 4]), torch.randn(2, d, generator=gen), torch.zeros(V, d), torch.zeros(V, d),
         torch.tensor(1.0), torch.ones(V, dtype=torch.int64), h, q, hyper, base, e, w, exact, error=err)
    assert err.tolist() == [0, 0, 0] and not torch.equal(p, p0)

