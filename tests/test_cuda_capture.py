"""opt.step() captured in a CUDA graph and replayed (issue 21), on the CUDA and Triton backends:
AdamW (with amsgrad), AdamH, nonfinite="skip" with a NaN gradient in a replay, and lr changed
between replays through its tensor, each equal to the same optimizer stepped eagerly; and an
eager step under torch.cuda.set_sync_debug_mode("error") (no host synchronisation). GPU only:
skipped here without one (run by benchmarks/gpu_check.sh on a lent GPU)."""

import pytest
import torch
from torch import nn

import lvopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def _backends():
    out = []
    if lvopt.build_info()["cuda"]:
        out.append("cuda")
    try:
        import triton  # noqa: F401

        out.append("triton")
    except ImportError:
        pass
    return out or ["cuda"]


BACKENDS = _backends()
SHAPES = [(64, 48), (48,), (3 * 16384 + 17,), (7, 5, 3)]


def _params(gen, dtype=torch.float32):
    return [nn.Parameter(torch.randn(s, generator=gen).to(device="cuda", dtype=dtype)) for s in SHAPES]


def _make(cls, params, backend, lr, **kw):
    if cls is lvopt.AdamH:
        groups = [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "hyperball": False, "weight_decay": 0.1},
        ]
        return cls(groups, lr=lr, backend=backend, capturable=True, **kw)
    return cls(params, lr=lr, weight_decay=0.1, backend=backend, capturable=True, **kw)


def _capture(opt, params, grads_fn, warmup=2):
    """Steps `warmup` times eagerly on a side stream (states, tables), then captures one step.
    The gradients are static tensors the replays refill."""
    for p in params:
        p.grad = torch.zeros_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(warmup):
            for p, g in zip(params, grads_fn(k)):
                p.grad.copy_(g)
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def _assert_same(opt_a, pa, opt_b, pb):
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        for key, v in opt_a.state[p].items():
            w = opt_b.state[q][key]
            assert torch.equal(v, w.to(v.device)), key


def _replay_beside_eager(graph, pa, b, pb, grads, warmup=2, before_each=None):
    """b stepped eagerly on the warm-up's gradients (_capture's), then for each later k: the
    captured step replayed on ``grads[k]`` copied into pa's static gradients, and b stepped
    eagerly on the same gradients."""
    for k in range(warmup):
        for q, g in zip(pb, grads[k]):
            q.grad = g.clone()
        b.step()
    for k in range(warmup, len(grads)):
        if before_each is not None:
            before_each(k)
        for p, q, g in zip(pa, pb, grads[k]):
            p.grad.copy_(g)
            q.grad = g.clone()
        graph.replay()
        b.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,amsgrad", [(lvopt.AdamW, False), (lvopt.AdamW, True), (lvopt.AdamH, False)])
def test_capture_replay_equals_eager_with_tensor_lr(backend, cls, amsgrad, gen):
    pa, pb = _params(gen), None
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    lr = torch.tensor(1e-2, device="cuda", dtype=torch.float64)
    extra = {"amsgrad": True} if amsgrad else {}
    a = _make(cls, pa, backend, lr, **extra)
    b = _make(cls, pb, backend, 1e-2, **extra)
    grads = [[torch.randn(p.shape, generator=gen).to("cuda") for p in pa] for _ in range(8)]
    graph = _capture(a, pa, lambda k: grads[k])

    def new_lr(k):  # a changed lr, through the tensor, between replays
        lr.fill_(1e-2 * (1 + k))
        for g in b.param_groups:
            g["lr"] = 1e-2 * (1 + k)

    _replay_beside_eager(graph, pa, b, pb, grads, before_each=new_lr)
    torch.cuda.synchronize()
    _assert_same(a, pa, b, pb)
    assert all(float(a.state[p]["step"]) == 8.0 for p in pa)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [lvopt.AdamW, lvopt.AdamH])
def test_capture_replay_skips_a_nan_replay(backend, cls, gen):
    pa = _params(gen)
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    a = _make(cls, pa, backend, 1e-2, nonfinite="skip")
    b = _make(cls, pb, backend, 1e-2, nonfinite="skip")
    grads = [[torch.randn(p.shape, generator=gen).to("cuda") for p in pa] for _ in range(6)]
    grads[3][2][100] = float("nan")
    grads[4][0][0, 0] = float("inf")
    graph = _capture(a, pa, lambda k: grads[k])
    _replay_beside_eager(graph, pa, b, pb, grads)
    torch.cuda.synchronize()
    _assert_same(a, pa, b, pb)
    assert a.skipped_steps == b.skipped_steps == 2
    assert all(float(a.state[p]["step"]) == 4.0 for p in pa)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,nonfinite", [(lvopt.AdamW, "propagate"), (lvopt.AdamW, "skip"), (lvopt.AdamH, "skip")])
def test_eager_step_does_not_synchronise(backend, cls, nonfinite, gen):
    params = _params(gen)
    lr = torch.tensor(1e-3, device="cuda")
    opt = _make(cls, params, backend, lr, nonfinite=nonfinite)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to("cuda")
    opt.step()  # the first step creates states and tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
            lr.mul_(0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(float(opt.state[p]["step"]) == 4.0 for p in params)


# ----- the CUDA ops themselves ----------------------------------------------------------------


@pytest.mark.skipif(not lvopt.build_info()["cuda"], reason="lvopt._C built without CUDA kernels")
@pytest.mark.parametrize("adamh", [False, True])
def test_cuda_found_inf_decided_on_the_device(gen, adamh):
    """Device step counters: a NaN gradient sets the flag, the kernels write nothing, the
    counters stay, and the op does not synchronise."""
    from conftest import assert_unchanged, clone_all, make_hyper, make_state

    ps, gs, ms, vs, ss = make_state([(33, 17), (3 * 16384 + 5,)], torch.float32, gen, steps=2)
    ps, gs, ms, vs = ([t.cuda() for t in lst] for lst in (ps, gs, ms, vs))
    ss = [s.cuda() for s in ss]
    gs[1][7] = float("nan")
    snap = clone_all(ps, ms, vs, ss)
    found = torch.zeros(1, device="cuda")
    hyper = make_hyper(2, wd=0.0 if adamh else 0.1).cuda()
    radii = [torch.linalg.vector_norm(p, dtype=torch.float64) for p in ps]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if adamh:
            out = torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper, found)
        else:
            torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper, found)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(found) == 1.0
    if adamh:
        assert not out.any()
    assert_unchanged((ps, ms, vs, ss), snap)


# ----- the sparse-row step (capturable=True: lvopt/sparse.py RingClock) -------------------------


def _sparse_batches(V, d, N, steps, gen):
    out = []
    for t in range(steps):
        ids = torch.randint(0, V, (N,), generator=gen)
        ids[: N // 8] = torch.randint(0, 4, (N // 8,), generator=gen)  # a hot head, as in a Zipf batch
        out.append((ids.to("cuda"), torch.randn(N, d, generator=gen).to("cuda")))
    return out


def _sparse_opt(w, backend, lr, mode="exact", period=16):
    return lvopt.AdamW(
        [{"params": [w], "sparse_mode": mode, "capturable": True, "sparse_sweep_period": period}],
        lr=lr,
        weight_decay=0.1,
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_sparse_step_captured_replays_equal_eager(backend, mode, gen):
    """The sparse step (exact: the ring history appended on the device, the sweep's slice each
    step) captured once and replayed for 3 epochs and more than one trip round the ring (default
    betas: epoch 129; sweep period 16: a ring of 276 steps), with new ids, values and a tensor lr
    between replays, equals the same optimizer stepped eagerly, bit for bit; the eager steps
    run under set_sync_debug_mode("error")."""
    V, d, N = 4096, 64, 512
    w0 = torch.randn(V, d, generator=gen).to("cuda")
    epoch = 129
    steps = 3 * epoch + 8
    batches = _sparse_batches(V, d, N, steps, gen)
    lr = torch.tensor(1e-2, device="cuda", dtype=torch.float64)
    wa, wb = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    a, b = _sparse_opt(wa, backend, lr, mode), _sparse_opt(wb, backend, 1e-2, mode)
    wa.grad = torch.sparse_coo_tensor(batches[0][0].unsqueeze(0).clone(), batches[0][1].clone(), (V, d))
    static_ids, static_vals = wa.grad._indices()[0], wa.grad._values()  # what the replays refill
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(2):  # warm-up: the state, the clock and its one upload
            static_ids.copy_(batches[k][0])
            static_vals.copy_(batches[k][1])
            a.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a.step()
    for k in range(2):
        wb.grad = torch.sparse_coo_tensor(batches[k][0].unsqueeze(0), batches[k][1], (V, d))
        b.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(2, steps):
            new_lr = 1e-2 * (0.5 + 0.5 * ((k // 50) % 2))  # a schedule, through the tensor
            lr.fill_(new_lr)
            for g in b.param_groups:
                g["lr"] = new_lr
            static_ids.copy_(batches[k][0])
            static_vals.copy_(batches[k][1])
            graph.replay()
            wb.grad = torch.sparse_coo_tensor(batches[k][0].unsqueeze(0), batches[k][1], (V, d))
            b.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    sa, sb = a.state[wa], b.state[wb]
    assert float(sa["step"]) == float(sb["step"]) == steps
    if mode == "exact":
        assert sa["row_clock"].epoch == epoch and steps > sa["row_clock"].ring
        assert torch.equal(sa["row_clock"].hist, sb["row_clock"].hist)
        assert torch.equal(sa["last_step"], sb["last_step"])
    assert a._rows._errors[id(wa)][1].word.tolist() == [0, 0, 0]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(wa.detach(), wb.detach())
    if mode == "exact":
        # The ring history against the host's (RowClock): the same dense-equivalent result.
        wc = nn.Parameter(w0.clone())
        c = lvopt.AdamW([{"params": [wc], "sparse_mode": "exact"}], lr=1e-2, weight_decay=0.1, backend=backend)
        for k in range(steps):
            for g in c.param_groups:
                g["lr"] = 1e-2 * (0.5 + 0.5 * ((k // 50) % 2)) if k >= 2 else 1e-2
            wc.grad = torch.sparse_coo_tensor(batches[k][0].unsqueeze(0), batches[k][1], (V, d))
            c.step()
        b.flush()
        c.flush()
        assert float((wb.detach() - wc.detach()).norm() / wc.detach().norm()) < 1e-5


@pytest.mark.skipif(not lvopt.build_info()["cuda"], reason="lvopt._C built without CUDA kernels")
def test_cuda_coalesced_ids_skip_the_sort(gen):
    """flags bit 1 (coalesced ids): the op launches no CUB radix sort or run-length encoding (a
    profile of the call), and gives the bits of the sorting path."""
    from torch.profiler import ProfilerActivity, profile

    V, d, n = 5000, 64, 700
    ids = torch.randperm(V, generator=gen)[:n].sort().values.to("cuda")
    vals = torch.randn(n, d, generator=gen).to("cuda")
    none_i = torch.empty(0, dtype=torch.int64, device="cuda")
    none_f = torch.empty(0, dtype=torch.float64, device="cuda")
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    outs = []
    for flags in (1, 0):
        p, m, v = (
            torch.randn(V, d, generator=torch.Generator().manual_seed(0)).to("cuda"),
            torch.zeros(V, d, device="cuda"),
            torch.zeros(V, d, device="cuda"),
        )
        step = torch.zeros((), device="cuda")
        err = torch.zeros(3, dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.ops.lvopt.sparse_adamw_(
                p, ids, vals, m, v, step, none_i, none_f, none_f, hyper, 0, 1, 0, False, error=err, flags=flags
            )
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        outs.append((names, p, m, v))
    assert any("RadixSort" in x for x in outs[1][0]), outs[1][0]  # the profile can tell
    assert not any("RadixSort" in x for x in outs[0][0]), outs[0][0]
    assert len(outs[0][0]) < len(outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.equal(a, b)
