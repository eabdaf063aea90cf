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
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "hyperball": False, "weight_decay": 0.1}]
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
    for k in range(2):  # b's eager steps matching a's warm-up
        for q, g in zip(pb, grads[k]):
            q.grad = g.clone()
        b.step()
    for k in range(2, 8):
        new_lr = 1e-2 * (1 + k)  # a changed lr, through the tensor, between replays
        lr.fill_(new_lr)
        for g in b.param_groups:
            g["lr"] = new_lr
        for p, q, g in zip(pa, pb, grads[k]):
            p.grad.copy_(g)
            q.grad = g.clone()
        graph.replay()
        b.step()
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
    for k in range(2):
        for q, g in zip(pb, grads[k]):
            q.grad = g.clone()
        b.step()
    for k in range(2, 6):
        for p, q, g in zip(pa, pb, grads[k]):
            p.grad.copy_(g)
            q.grad = g.clone()
        graph.replay()
        b.step()
    torch.cuda.synchronize()
    _assert_same(a, pa, b, pb)
    assert a.skipped_steps == b.skipped_steps == 2
    assert all(float(a.state[p]["step"]) == 4.0 for p in pa)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,nonfinite", [(lvopt.AdamW, "propagate"), (lvopt.AdamW, "skip"),
                                           (lvopt.AdamH, "skip")])
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_amsgrad_matches_reference(gen, dtype):
    from conftest import assert_bf16_step_close, assert_close_at_list_scale, clone_all, make_hyper, make_state
    from lvopt import reference

    shapes = [(1,), (33, 17), (3 * 16384 + 5,), (0,), (7, 3)]
    ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=2)
    xs = [v * 2 * torch.rand(v.shape, generator=gen) for v in vs]
    hyper = make_hyper(len(shapes), gen=gen)
    rp, rg, rm, rv, rs, rx = clone_all(ps, gs, ms, vs, ss, xs)
    ps, gs, ms, vs, xs = ([t.cuda() for t in lst] for lst in (ps, gs, ms, vs, xs))
    ss = [s.cuda() for s in ss]
    before = [p.clone() for p in ps]
    torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper.cuda(), max_exp_avg_sqs=xs)
    reference.fused_adamw_(rp, rg, rm, rv, rs, hyper, max_exp_avg_sqs=rx)
    assert_close_at_list_scale(xs, rx, 1e-6, "max_exp_avg_sqs")
    if dtype == torch.float32:
        assert_close_at_list_scale(ps, rp, 1e-6, "params")
    else:
        for p, q, p0 in zip(ps, rp, before):
            assert_bf16_step_close(p.float(), q.float(), p0.float())
    torch.library.opcheck(torch.ops.lvopt.fused_adamw_.default, (ps[:2], gs[:2], ms[:2], vs[:2], ss[:2],
                                                                 hyper[:2].cuda().contiguous()),
                          {"max_exp_avg_sqs": xs[:2]})


@pytest.mark.skipif(not lvopt.build_info()["cuda"], reason="lvopt._C built without CUDA kernels")
@pytest.mark.parametrize("adamh", [False, True])
def test_cuda_found_inf_decided_on_the_device(gen, adamh):
    """Device step counters: a NaN gradient sets the flag, the kernels write nothing, the
    counters stay, and the op does not synchronise."""
    from conftest import clone_all, make_hyper, make_state

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
    for lst, old in zip((ps, ms, vs, ss), snap):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)
