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
