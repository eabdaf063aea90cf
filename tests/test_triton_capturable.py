"""The Triton dense steps capturable, compilable and complete (issue 21): amsgrad against torch
(against the reference: tests/test_fused_adamw.py), found_inf decided inside the kernels (no host read), torch.compile of
opt.step (fullgraph) and of a whole training step equal to eager, and, on fake CUDA tensors
(FakeTensorMode: no GPU needed), a host path that reads nothing on the host and makes no
blocking copy after the first step. On CUDA tensors with a GPU, else on CPU tensors under
TRITON_INTERPRET=1 in a child pytest (tests/_triton_support.py)."""

import copy

import pytest
import torch
from torch import nn

from _host_traffic import HostTraffic
from _triton_support import IN_CHILD, run_file_under_interpreter, triton_device
from conftest import assert_unchanged, clone_all, make_hyper, make_state, train_step

DEV = triton_device()
needs_triton_device = pytest.mark.skipif(DEV is None, reason="no GPU: these run in the interpreter child")
SHAPES = [(1,), (7,), (33, 17), (16384 + 1029,), (0,)]

if not IN_CHILD:

    def test_interpreter_in_child():
        run_file_under_interpreter(__file__)


def _ops():
    import lvopt.triton

    return lvopt.triton


@needs_triton_device
@pytest.mark.parametrize("adamh", [False, True])
def test_found_inf_decided_in_the_kernels(gen, adamh):
    """A NaN gradient: the scan sets the flag on the device, the kernels write nothing, the step
    counters stay, and nothing is read on the host."""
    ps, gs, ms, vs, ss = make_state(SHAPES[:4], torch.float32, gen, steps=2)
    ps, gs, ms, vs = ([t.to(DEV) for t in lst] for lst in (ps, gs, ms, vs))
    ss = [s.to(DEV) for s in ss]
    gs[2].view(-1)[5] = float("nan")
    snap = clone_all(ps, ms, vs, ss)
    found = torch.zeros(1, device=DEV)
    with HostTraffic() as mode:
        if adamh:
            radii = [torch.linalg.vector_norm(p, dtype=torch.float64).to(DEV) for p in ps]
            out = _ops().fused_adamh_(ps, gs, ms, vs, ss, radii, make_hyper(4, wd=0.0).to(DEV), found)
        else:
            _ops().fused_adamw_(ps, gs, ms, vs, ss, make_hyper(4).to(DEV), found)
    assert mode.reads == [], mode.reads
    assert float(found) == 1.0
    if adamh:
        assert not out.any()
    assert_unchanged((ps, ms, vs, ss), snap)
    gs[2].view(-1)[5] = 0.0
    found.zero_()
    _ops().fused_adamw_(ps, gs, ms, vs, ss, make_hyper(4).to(DEV), found)
    assert float(found) == 0.0 and all(float(s) == 3.0 for s in ss)


def _net(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4)).to(device=DEV, dtype=dtype)


@needs_triton_device
@pytest.mark.parametrize("cls_name", ["AdamW", "AdamH"])
def test_compiled_step_fullgraph_equals_eager(cls_name, gen):
    import lvopt

    cls = getattr(lvopt, cls_name)
    torch._dynamo.reset()
    net = _net(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = copy.deepcopy(net)
    x = torch.randn(8, 12, generator=gen).to(DEV)
    kw = dict(lr=1e-2, backend="triton", nonfinite="skip")
    opt, eager = cls(net.parameters(), **kw), cls(ref.parameters(), **kw)
    step = torch.compile(opt.step, fullgraph=True, backend="inductor" if cls_name == "AdamW" else "eager")
    for k in range(3):
        for m in (net, ref):
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            if k == 1:
                m[2].bias.grad[0] = float("inf")
        step()
        eager.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], eager.state[q][key]), key
    assert opt.skipped_steps == eager.skipped_steps == 1


@needs_triton_device
def test_whole_compiled_training_step_equals_eager(gen):
    import lvopt

    torch._dynamo.reset()
    net = _net(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = copy.deepcopy(net)
    kw = dict(lr=1e-2, backend="triton", amsgrad=True)
    opt, eager = lvopt.AdamW(net.parameters(), **kw), lvopt.AdamW(ref.parameters(), **kw)

    compiled = torch.compile(train_step, backend="eager")
    for _ in range(3):
        x = torch.randn(8, 12, generator=gen).to(DEV)
        torch.testing.assert_close(compiled(net, opt, x), train_step(ref, eager, x))
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@needs_triton_device
def test_amsgrad_optimizer_matches_torch(gen):
    import lvopt

    ps = [nn.Parameter(torch.randn(s, generator=gen).to(DEV)) for s in [(33, 17), (129,)]]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True)
    a, b = lvopt.AdamW(ps, backend="triton", **kw), torch.optim.AdamW(qs, **kw)
    for k in range(5):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen).to(DEV) * 0.5**k
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.state[p]["max_exp_avg_sq"], b.state[q]["max_exp_avg_sq"], rtol=1e-5, atol=0)


# ----- the host path on fake CUDA tensors ----------------------------------------------------


def gpt2_shapes(layers=12, d=768, v=50257, ctx=1024):
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


@pytest.mark.skipif(not IN_CHILD, reason="needs triton imported under TRITON_INTERPRET=1 (the child)")
@pytest.mark.parametrize(
    "cls_name,nonfinite,capturable",
    [
        ("AdamW", "propagate", False),
        ("AdamW", "skip", False),
        ("AdamW", "propagate", True),
        ("AdamH", "skip", False),
        ("AdamH", "propagate", True),
    ],
)
def test_fake_cuda_host_path_no_reads_no_blocking_copies(monkeypatch, cls_name, nonfinite, capturable):
    """GPT-2's layout as fake CUDA tensors: after the first step, an optimizer step on the
    Triton backend makes no host read (FakeTensorMode raises on one) and no copy from the host
    at all when the gradients stay where they were (CUDA graphs, zero_grad(set_to_none=False)),
    and only asynchronous copies from pinned memory (the gradient address column; the table of
    a changed float lr) when they move. The first step runs the ops' host code (the full step),
    the later ones the steady-state path (lvopt/_fast_step.py; checked that it is the one that
    steps), each launching the same kernels every step. The kernel launches are recorded
    instead of run (fake tensors have no storage)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import lvopt
    from lvopt import _fast_step
    from lvopt.triton import _common as C
    from lvopt.triton import _plan as P
    from lvopt.triton import fused_adamh as H
    from lvopt.triton import fused_adamw as W

    launches = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append((self.name, grid))

    for mod, name in (
        (W, "adamw_kernel"),
        (W, "chunk_sums_kernel"),
        (H, "adamh_reduce_kernel"),
        (H, "adamh_finalize_kernel"),
        (H, "adamh_apply_kernel"),
        (P, "adam_setup_kernel"),
        (P, "nonfinite_scan_kernel"),
    ):
        monkeypatch.setattr(mod, name, Kernel(name))
    addresses = {}  # id -> (tensor, address): the tensors are kept alive, so ids stay unique
    next_address = [1 << 20]

    def fake_ptr(t):
        if id(t) not in addresses:
            addresses[id(t)] = (t, next_address[0])
            next_address[0] += 256 * ((t.numel() * t.element_size() + 255) // 256 + 1)
        return addresses[id(t)][1]

    monkeypatch.setattr(C, "ptr", fake_ptr)
    monkeypatch.setattr(C, "_LAUNCH_CACHE", {})  # fake addresses repeat from test to test
    monkeypatch.setattr(P, "_PLANS", {})
    # FakeTensorMode is a dispatch mode, under which a step takes the custom ops (the full
    # step); on a GPU there is none: the steady-state path runs the same host code directly.
    monkeypatch.setattr(_fast_step, "direct_ok", lambda: True)
    # Under FakeTensorMode the dispatcher would run the ops' fake kernels: call the host code of
    # the Triton ops itself (what runs on a GPU), with the launches recorded above.
    import lvopt.triton as T

    monkeypatch.setattr(T, "fused_adamw_", W.fused_adamw_._init_fn)
    monkeypatch.setattr(T, "fused_adamh_", H.fused_adamh_._init_fn)
    rec = HostTraffic()
    shapes = gpt2_shapes(layers=2, d=64, v=512, ctx=128)  # GPT-2's layout, small
    with FakeTensorMode(allow_non_fake_inputs=False):
        with rec:
            ps = [nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
            cls = getattr(lvopt, cls_name)
            opt = cls(
                [{"params": [p for p in ps if p.dim() >= 2]}, {"params": [p for p in ps if p.dim() < 2]}],
                lr=1e-3,
                backend="triton",
                nonfinite=nonfinite,
                capturable=capturable,
            )
            # A device tensor lr (the constructor reads a tensor lr once to check it; a step never).
            opt.param_groups[1]["lr"] = torch.full((), 1e-3, device="cuda")
            grads = [torch.randn(s, device="cuda") for s in shapes]
            for p, g in zip(ps, grads):
                p.grad = g
            opt.step()  # first step: states, tables and their uploads
            rec.reset()
            fast = opt._fast
            assert fast is not None
            per_step = []
            for _ in range(2):
                del launches[:]
                opt.step()  # the same gradients: nothing crosses from the host
                per_step.append(list(launches))
            assert rec.uploads == [] and rec.downloads == [], (rec.uploads, rec.downloads)
            assert per_step[0] == per_step[1] and per_step[0]  # the same launches and grids every step
            assert opt._fast is fast  # the steady-state path stepped
            for p in ps:
                p.grad = torch.randn(p.shape, device="cuda")  # re-allocated gradients
            opt.step()
            assert rec.uploads and rec.blocking_uploads == [], rec.uploads
            rec.reset()
            opt.param_groups[0]["lr"] = 2e-3  # a Python-number lr changed: the table is rewritten
            opt.step()
            assert rec.uploads and rec.blocking_uploads == [], rec.uploads
            assert opt._fast is fast
            assert all(p.device.type == "cuda" for p in ps)
            assert all(opt.state[p]["step"].device.type == "cuda" for p in ps)


@pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (Triton on CPU tensors)")
def test_bench_gpu_capture_runs_tiny_on_cpu(tmp_path, monkeypatch):
    """benchmarks/bench_gpu_capture.py (the GPU run's Triton / captured-step check) runs end to
    end at a tiny size on the CPU and writes its JSON under $OUT."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_gpu_capture

    monkeypatch.setenv("OUT", str(tmp_path))
    rows = bench_gpu_capture.run("cpu", "tiny", iters=2, file=open(os.devnull, "w"))
    labels = {(r["case"], r["label"]) for r in rows}
    assert ("64M", "lvopt triton step (eager)") in labels and ("GPT-2 small", "lvopt cpu step (eager)") in labels
    assert all(r["ms"] > 0 and r["frac"] > 0 for r in rows)
    assert json.load(open(tmp_path / "bench_gpu_capture.json"))["rows"] == json.loads(json.dumps(rows))
