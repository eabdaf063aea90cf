"""Sparse embedding rows end to end (docs/sparse-rows.md): lvopt.AdamW / AdamH on row-sparse
gradients (lvopt.nn.Embedding, nn.Embedding(sparse=True)) on every backend: the exact mode against
dense AdamW, lazy mode against torch.optim.SparseAdam, flush and state_dict, tied embeddings,
errors; the Triton and CUDA backends against the CPU one, the deferred id check, and on a GPU the
sync-free, deterministic and CUDA-graph-captured steps. The ops themselves:
tests/test_sparse_rows.py. Without a GPU the Triton cases run on CPU tensors in an interpreter
child (run_triton_child) and the CUDA ones are skipped."""

import math
import warnings

import pytest
import torch
from torch import nn

import lvopt
from conftest import IN_TRITON_CHILD, needs_cuda_kernels, needs_native, rel_err, run_triton_child
from test_sparse_rows import _ulps, _zipf_ids

if not IN_TRITON_CHILD:

    def test_triton_in_interpreter_child():
        run_triton_child(__file__)


def _needs_cuda_device(backend):
    if backend.device.type != "cuda":
        pytest.skip("needs CUDA tensors (a GPU)")


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
    m1, o1 = _train(
        mk, lambda mod: lvopt.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1), 80, 1, catch_up=kind != "lvopt"
    )
    m2, o2 = _train(
        lambda: nn.Embedding(V, d), lambda mod: lvopt.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1), 80, 1
    )
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
        o1.step()
        o2.step()
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
    o1.flush()
    o2.flush()
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
            opt.zero_grad()
            ropt.zero_grad()
            head(emb(ids)).logsumexp(-1).sum().backward()
            torch.nn.functional.linear(torch.nn.functional.embedding(ids, ref), ref).logsumexp(-1).sum().backward()
            assert emb.weight.grad.layout == torch.strided
            opt.step()
            ropt.step()
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
        opt.step()
        ref.step()
    assert rel_err(p, q) < 1e-5
    assert "last_step" not in opt.state[p]


@needs_native
def test_optimizer_errors_change_nothing():
    V, d = 10, 4
    cases = []
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(
        (
            "out of range",
            lvopt.AdamW([q, p]),
            [q, p],
            [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1, 10]]), torch.randn(2, d), (V, d))],
        )
    )
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(
        (
            "negative row index",
            lvopt.AdamW([q, p]),
            [q, p],
            [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1, -2]]), torch.randn(2, d), (V, d))],
        )
    )
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(
        (
            "hyperball group",
            lvopt.AdamH([p, q]),
            [p, q],
            [torch.sparse_coo_tensor(torch.tensor([[1]]), torch.randn(1, d), (V, d)), torch.randn(3)],
        )
    )
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(
        (
            "beta1\\*\\*2 < beta2",
            lvopt.AdamW([q, p], betas=(0.99, 0.9)),
            [q, p],
            [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1]]), torch.randn(1, d), (V, d))],
        )
    )
    p, q = nn.Parameter(torch.randn(V, d)), nn.Parameter(torch.randn(3))
    cases.append(
        (
            "sparse_mode must be",
            lvopt.AdamW([q, p], sparse_mode="lazzy") if False else lvopt.AdamW([q, p]),
            [q, p],
            [torch.randn(3), torch.sparse_coo_tensor(torch.tensor([[1]]), torch.randn(1, d), (V, d))],
        )
    )
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


# ----- the Triton and CUDA backends against the CPU one ----------------------------------------

# (V, d, steps, ids per batch) per backend: few rows, widths around the 32-wide tiles and few steps
# for the interpreter.
MATCH_CPU_SIZES = {"triton": (30, 40, 4, 6), "cuda": (500, 32, 8, 64)}


@pytest.mark.parametrize("mode", ["exact", "lazy"])
@pytest.mark.parametrize("module", ["torch", "lvopt"])
@pytest.mark.parametrize("head", [False, True], ids=["embedding", "with dense head"])
def test_optimizer_matches_cpu(backend, gen, mode, module, head):
    """An embedding (nn.Embedding(sparse=True) or lvopt.nn.Embedding), alone or with a dense head in
    the same optimizer, trained on the backend and on the CPU: the same tables. The embedding
    alone on Triton: lazy mode bit for bit (the fp32 operations of the CPU op, rows given at most
    32 times summed in input order), exact mode within a few ulps."""
    if backend.name == "cpu":
        pytest.skip("the CPU backend is the oracle here")
    if backend.name == "triton" and (module == "lvopt" or head):
        pytest.skip(
            "the interpreter's cost: nn.Embedding(sparse=True) alone on Triton; lvopt.nn.Embedding and the "
            "dense head on CUDA"
        )
    dev = backend.device
    V, d, steps, n = MATCH_CPU_SIZES[backend.name]
    w0 = torch.randn(V, d, generator=gen)
    batches = [torch.randint(0, 8 if k < 2 else V, (n,), generator=gen) for k in range(steps)]  # rows come back
    tgts = [torch.randn(n, 3 if head else d, generator=gen) for _ in range(steps)]
    results = []
    for name, device in ((backend.name, dev), ("cpu", torch.device("cpu"))):
        torch.manual_seed(0)
        emb = (lvopt.nn.Embedding(V, d) if module == "lvopt" else nn.Embedding(V, d, sparse=True)).to(device)
        with torch.no_grad():
            emb.weight.copy_(w0)
        groups = [{"params": emb.parameters(), "sparse_mode": mode, "weight_decay": 0.1}]
        lin = nn.Linear(d, 3).to(device) if head else None
        if head:
            groups.append({"params": lin.parameters()})
        opt = lvopt.AdamW(groups, lr=1e-2, backend=name)
        for ids, tgt in zip(batches, tgts):
            out = emb(ids.to(device))
            ((lin(out) if head else out) - tgt.to(device)).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt.flush()
        results.append([t.detach().cpu() for t in ([emb.weight] + ([lin.weight] if head else []))])
    (a, *rest_a), (b, *rest_b) = results
    assert not torch.equal(b, w0)
    for x, y in zip([a] + rest_a, [b] + rest_b):
        assert rel_err(x, y) < 1e-5
    if backend.name == "triton" and not head:
        if mode == "lazy":
            assert torch.equal(a, b)
        else:
            assert _ulps(a, b) <= 8 and rel_err(a, b) < 1e-6


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_optimizer_defers_bad_ids_and_writes_nothing(triton_backend, gen, mode):
    """backend="triton" checks ids on the device (check_ids="deferred"): a step given an id
    outside the table writes nothing to that table (rows, moments, step count, last steps), the
    next step() raises naming the parameter and the ids' range, and training then goes on as if
    the bad step had not been taken (equal to a run without it). check_ids="sync" raises in
    the step itself, before anything is written."""
    DEV = triton_backend.device
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
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, V + 4, 2]]).to(DEV), torch.randn(3, d).to(DEV), (V, d))
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


# ----- sync-free, capturable, deterministic (issue 15) --------------------------------------------

DEV = "cuda"


def _sparse_training(backend, mode, dtype=torch.float32, steps=6, V=3000, d=64, N=512, seed=0, sync_check=False):
    """lvopt.nn.Embedding trained alone (sparse rows only) for ``steps`` steps; with sync_check
    every step after the first runs under torch.cuda.set_sync_debug_mode("error"), forward,
    backward, step and the final flush included."""
    g = torch.Generator().manual_seed(seed)
    emb = lvopt.nn.Embedding(V, d, padding_idx=0, device=DEV, dtype=dtype)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, d, generator=g).to(dtype))
    opt = lvopt.AdamW([{"params": emb.parameters(), "sparse_mode": mode}], lr=1e-2, weight_decay=0.1, backend=backend)
    batches = [torch.randint(0, V, (N,), generator=g).to(DEV) for _ in range(steps)]
    for i, ids in enumerate(batches):
        if sync_check and i >= 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            emb(ids).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == steps - 1:
                opt.flush()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return emb.weight.detach().clone(), opt


@pytest.mark.parametrize("mode", ["exact", "lazy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_step_makes_no_synchronisation(backend, mode, dtype):
    _needs_cuda_device(backend)
    w, _ = _sparse_training(backend.name, mode, dtype, sync_check=True)
    assert torch.isfinite(w.float()).all()


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_sparse_training_is_bit_identical_across_runs(backend, mode):
    _needs_cuda_device(backend)
    a, _ = _sparse_training(backend.name, mode)
    b, _ = _sparse_training(backend.name, mode)
    assert torch.equal(a, b)


@needs_cuda_kernels
def test_sync_free_step_equals_cpu():
    """The deferred-check (error word) path of the CUDA op against the CPU kernel."""
    a, _ = _sparse_training("cuda", "exact")
    g = torch.Generator().manual_seed(0)
    V, d, N = 3000, 64, 512
    emb = lvopt.nn.Embedding(V, d, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, d, generator=g))
    opt = lvopt.AdamW([{"params": emb.parameters(), "sparse_mode": "exact"}], lr=1e-2, weight_decay=0.1)
    for ids in [torch.randint(0, V, (N,), generator=g) for _ in range(6)]:
        emb(ids).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.flush()
    assert rel_err(a.cpu(), emb.weight.detach()) < 1e-5


@needs_cuda_kernels
def test_lazy_step_captured_in_a_cuda_graph_equals_eager():
    """The lazy sparse step (step count and hyperparameters on the device, an error word) in a
    CUDA graph for a fixed N: replays with new ids and values, and an lr changed in the device
    hyper row between replays, equal the eager op call by call."""
    V, d, N = 2000, 64, 256
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(V, d, generator=g).to(DEV)
    batches = [
        (torch.randint(0, V, (N,), generator=g).to(DEV), torch.randn(N, d, generator=g).to(DEV)) for _ in range(5)
    ]
    lrs = [1e-2, 1e-2, 5e-3, 5e-3, 2e-3]

    def state():
        return [p0.clone(), torch.zeros(V, d, device=DEV), torch.zeros(V, d, device=DEV), torch.zeros((), device=DEV)]

    none_i, none_f = torch.empty(0, dtype=torch.int64, device=DEV), torch.empty(0, dtype=torch.float64, device=DEV)
    eager = state()
    err_e = torch.zeros(3, dtype=torch.int64, device=DEV)
    for (ids, vals), lr in zip(batches, lrs):
        hyper = torch.tensor([[lr, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
        torch.ops.lvopt.sparse_adamw_(
            eager[0],
            ids,
            vals,
            eager[1],
            eager[2],
            eager[3],
            none_i,
            none_f,
            none_f,
            hyper,
            0,
            1,
            0,
            False,
            error=err_e,
        )
    cap = state()
    err = torch.zeros(3, dtype=torch.int64, device=DEV)
    s_ids, s_vals = batches[0][0].clone(), batches[0][1].clone()
    s_hyper = torch.tensor([[lrs[0], 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, on copies
        warm = state()
        torch.ops.lvopt.sparse_adamw_(
            warm[0],
            s_ids,
            s_vals,
            warm[1],
            warm[2],
            warm[3],
            none_i,
            none_f,
            none_f,
            s_hyper,
            0,
            1,
            0,
            False,
            error=err.clone(),
        )
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.lvopt.sparse_adamw_(
            cap[0], s_ids, s_vals, cap[1], cap[2], cap[3], none_i, none_f, none_f, s_hyper, 0, 1, 0, False, error=err
        )
    for (ids, vals), lr in zip(batches, lrs):
        s_ids.copy_(ids)
        s_vals.copy_(vals)
        s_hyper[0, 0] = lr
        graph.replay()
    torch.cuda.synchronize()
    assert err.tolist() == [0, 0, 0] and float(cap[3]) == 5.0
    for a, b in zip(cap, eager):
        assert torch.equal(a, b)
