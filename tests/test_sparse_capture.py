"""The capturable sparse step (param group ``capturable=True``; lvopt/sparse.py RingClock,
docs/sparse-rows.md "CUDA graphs"), proven without a GPU:

* on fake CUDA tensors (the optimizer's host path with the "cuda" and "triton" backends,
  lvopt.nn.Embedding's forward catch-up and backward, dense neighbours): after the first step
  (which makes the state and uploads the clock once) no copy from the host at all, blocking or
  not, no read of device memory, and the same host work at every step (ops and their host
  arguments), across epoch boundaries and ring wraps: nothing the host decides differs between
  steps, so a graph captured at one step replays the next ones;
* a coalesced gradient reaches the GPU ops with the flag that skips their sort, and the Triton
  op's launch list then has no sort (the CUDA op's launches: csrc/cuda/sparse_rows.cu's header);
* under the Triton interpreter (a child process): a simulated capture (every aten op and every
  Triton launch of one step, recorded with its arguments) replayed for the next steps, across
  epoch boundaries and ring wraps, equals the same optimizer stepped eagerly bit for bit, and
  the ring's results match the host-history exact mode (RowClock) to fp32 rounding.

On a GPU, tests/test_cuda_capture.py captures the exact step in a CUDA graph for real.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lvopt
from _host_traffic import HOST_READ_OPS, HostTraffic, fake_embedding_step
from _triton_support import IN_CHILD, run_file_under_interpreter
from conftest import (
    cuda_built,
    needs_cuda_build,
    needs_native,
    needs_triton_installed,
    rel_err,
    sparse_clock,
    triton_installed,
)


def _fake_capturable_training(backend, dtype, steps, period=3, betas=(0.3, 0.5)):
    """Steps a capturable exact-mode embedding (and a dense layer) on fake CUDA tensors; returns
    the recorder's (ops, lvopt calls, uploads, downloads, blocking uploads) of each step after the
    first."""

    from torch._subclasses.fake_tensor import FakeTensorMode

    per_step = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        V, d, N = 50, 16, 24
        emb = lvopt.nn.Embedding(V, d, padding_idx=3, device="cuda", dtype=dtype)
        lin = torch.nn.Linear(d, 3, device="cuda", dtype=dtype)
        opt = lvopt.AdamW(
            [
                {"params": [emb.weight], "sparse_mode": "exact", "capturable": True, "sparse_sweep_period": period},
                {"params": list(lin.parameters())},
            ],
            lr=1e-2,
            betas=betas,
            weight_decay=0.1,
            backend=backend,
        )
        rec = HostTraffic()

        def one_step():
            fake_embedding_step(emb, lin, opt, V, N)

        with rec:
            one_step()
            for _ in range(steps - 1):
                rec.reset()
                one_step()
                per_step.append(
                    (
                        list(rec.ops),
                        list(rec.lvopt_calls),
                        list(rec.uploads),
                        list(rec.downloads),
                        list(rec.blocking_uploads),
                    )
                )
        clock = opt.state[emb.weight]["row_clock"]
    return per_step, clock


in_parent = pytest.mark.skipif(IN_CHILD, reason="runs in the parent process (fake tensors)")


@in_parent
@needs_native
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_capturable_exact_step_has_the_same_host_work_every_step(backend, monkeypatch):
    if backend == "cuda" and not cuda_built():
        pytest.skip("this build has no CUDA kernels (LVOPT_NO_CUDA or no nvcc)")
    if backend == "triton":
        if not triton_installed():
            pytest.skip("triton is not installed")
        import lvopt.triton  # noqa: F401  (before TRITON_INTERPRET: see test_sync_free)

        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lvopt.sparse import RingClock

    per_step, clock = _fake_capturable_training(backend, torch.float32, steps=3 * 6 + 5)
    assert isinstance(clock, RingClock) and clock.epoch == 6 and clock.ring == 3 + 2 * 6 + 2
    # 22 steps after the first: three epochs and more than one trip round the ring.
    assert len(per_step) * 1 > clock.ring and len(per_step) > 3 * clock.epoch
    for ops, calls, uploads, downloads, blocking in per_step:
        assert uploads == [] and downloads == [] and blocking == [], (uploads, downloads, blocking)
    first = per_step[0]
    for later in per_step[1:]:
        assert later[0] == first[0]  # the same aten and lvopt ops, in the same order
        assert later[1] == first[1]  # with the same host arguments
    names = [c[0] for c in first[1]]
    # forward catch-up, the sweep's slice, the step
    assert names.count("sparse_catchup_") == 2 and names.count("sparse_adamw_") == 1, names
    for name, host in first[1]:
        if name.startswith("sparse_"):
            assert dict(host).get("flags", 0) & 2, (name, host)  # every sparse op gets the ring history
    assert not {"unique", "unique_consecutive", "nonzero", "masked_select"} & set(first[0])


@in_parent
@needs_native
@needs_cuda_build
def test_coalesced_gradient_is_flagged_for_the_gpu_op():
    """A coalesced sparse gradient (torch's flag) reaches the CUDA op with flags bit 1, which
    skips its radix sort and run-length encoding; an uncoalesced one without it; the flush's
    catch-up of every row is flagged too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        V, d = 30, 8
        w = torch.nn.Parameter(torch.zeros(V, d, device="cuda"))
        opt = lvopt.AdamW([w], lr=1e-2, backend="cuda")
        rec = HostTraffic()
        with rec:
            for coalesced in (True, False):
                ids = torch.tensor([[1, 4, 9]]).to("cuda", non_blocking=True)
                w.grad = torch.sparse_coo_tensor(ids, torch.ones(3, d, device="cuda"), (V, d), is_coalesced=coalesced)
                opt.step()
            opt.flush()
    flags = [dict(host).get("flags", 0) for _, host in rec.lvopt_calls]
    names = [n for n, _ in rec.lvopt_calls]
    assert names == ["sparse_adamw_", "sparse_adamw_", "sparse_catchup_"] and flags == [1, 0, 1]


@in_parent
@needs_native
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_host_ops_take_the_coalesced_flag_and_refuse_a_ring(impl, gen):
    """The CPU kernel and the reference accept flags bit 1 (they sort anyway: the same bits) and
    refuse a ring history (bit 2, the GPU backends' RingClock), writing nothing."""
    from lvopt import reference

    fn = torch.ops.lvopt.sparse_adamw_ if impl == "cpu" else reference.sparse_adamw_
    V, d = 12, 8
    clock, hyper = sparse_clock(3)
    hist, qpow, base, epoch, window = clock.op_args()
    history = (hist, qpow, hyper, base, epoch, window)  # the op's history arguments, in order
    ids = torch.tensor([1, 4, 7])
    vals = torch.randn(3, d, generator=gen)
    p0, last0 = torch.randn(V, d, generator=gen), torch.randint(0, 3, (V,), generator=gen)
    outs = []
    for flags in (0, 1):
        p, m, v, last, step = p0.clone(), torch.zeros(V, d), torch.zeros(V, d), last0.clone(), torch.tensor(3.0)
        fn(p, ids, vals, m, v, step, last, *history, True, flags=flags)
        outs.append((p, m, v, last, step))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    p, last, step = p0.clone(), last0.clone(), torch.tensor(3.0)
    with pytest.raises(RuntimeError, match="ring history"):
        fn(p, ids, vals, torch.zeros(V, d), torch.zeros(V, d), step, last, *history, True, flags=2)
    assert torch.equal(p, p0) and torch.equal(last, last0) and float(step) == 3.0


def _triton_plan_ops(coalesced, monkeypatch):
    """The aten ops and Triton launches of one Triton sparse_adamw_ call on fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lvopt.triton import sparse_rows as S

    calls = []
    monkeypatch.setattr(S, "launch", lambda kernel, grid, *a, **k: calls.append(kernel.fn.__name__))
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)  # a host row
    with FakeTensorMode(allow_non_fake_inputs=True):
        V, d, n = 40, 16, 12
        p = torch.zeros(V, d, device="cuda")
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        step = torch.full((), 5.0, device="cuda")
        err = torch.zeros(3, dtype=torch.int64, device="cuda")
        idx = torch.arange(n, device="cuda") * 3
        vals = torch.zeros(n, d, device="cuda")
        none_i = torch.empty(0, dtype=torch.int64, device="cuda")
        none_f = torch.empty(0, dtype=torch.float64, device="cuda")
        rec = HostTraffic()
        with rec:
            S.sparse_adamw_impl(
                p,
                idx,
                vals,
                m,
                v,
                step,
                none_i,
                none_f,
                none_f,
                hyper,
                0,
                1,
                0,
                False,
                None,
                err,
                1 if coalesced else 0,
            )
    return rec.ops, calls


@in_parent
@needs_triton_installed
def test_triton_coalesced_plan_has_no_sort(monkeypatch):
    ops, launches = _triton_plan_ops(True, monkeypatch)
    ops0, launches0 = _triton_plan_ops(False, monkeypatch)
    assert "sort" in ops0 and "_runs_kernel" in launches0 and "cumsum" in ops0  # the test can tell
    assert "sort" not in ops and "cumsum" not in ops
    assert (
        "_runs_kernel" not in launches and "_offsets_kernel" not in launches and "_piece_table_kernel" not in launches
    )
    assert "sparse_rows_kernel" in launches


# ----- a simulated capture and replay under the Triton interpreter ---------------------------------


class StepRecorder(TorchDispatchMode):
    """Records every aten op of a step (func, args, kwargs, outputs) and, through the patched
    launch of lvopt/triton/sparse_rows.py, every Triton launch with its arguments, in order:
    what a CUDA graph captures. ``replay`` runs them again on the same tensors: functional ops
    write their results into the recorded outputs (a graph's private pool), in-place ops mutate
    their recorded arguments again, views are left as they are, launches rerun with the same
    grids and host arguments. A host read of tensor data (``.item()``) cannot be replayed and
    fails the recording."""

    def __init__(self):
        super().__init__()
        self.entries = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        assert name not in HOST_READ_OPS, f"host read in a step: {name}"
        out = func(*args, **kwargs)
        self.entries.append(("op", func, args, kwargs, out))
        return out

    def launch(self, kernel, grid, *args, **kwargs):
        from torch.utils._python_dispatch import _disable_current_modes

        self.entries.append(("launch", kernel, grid, args, kwargs))
        with _disable_current_modes():
            kernel[grid](*args, **kwargs)

    def replay(self):
        for entry in self.entries:
            if entry[0] == "launch":
                _, kernel, grid, args, kwargs = entry
                kernel[grid](*args, **kwargs)
                continue
            _, func, args, kwargs, out = entry
            schema = func._schema
            if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                func(*args, **kwargs)  # in place / out=: mutates the recorded tensors again
                continue
            if any(r.alias_info is not None for r in schema.returns):
                continue  # a view of a recorded tensor
            res = func(*args, **kwargs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            news = res if isinstance(res, (tuple, list)) else (res,)
            for o, r in zip(outs, news):
                if isinstance(o, torch.Tensor):
                    o.copy_(r)


def _grads(V, d, steps, gen):
    out = []
    for t in range(steps):
        n = 6
        ids = torch.randint(0, V, (n,), generator=gen)
        ids[0] = t % V  # rows that come back after a while
        out.append((ids, torch.randn(n, d, generator=gen)))
    return out


def _capturable_opt(w, capturable=True, period=4):
    return lvopt.AdamW(
        [{"params": [w], "sparse_mode": "exact", "capturable": capturable, "sparse_sweep_period": period}],
        lr=2e-2,
        betas=(0.3, 0.5),
        eps=1e-3,
        weight_decay=0.1,
        backend="triton",
    )


@pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (test_interpreter_child)")
def test_simulated_capture_replays_the_eager_ring_steps(monkeypatch):
    from lvopt import sparse
    from lvopt.triton import sparse_rows as S
    from types import SimpleNamespace

    # The optimizer calls the Triton ops' bodies directly, so that the recorder sees their aten
    # ops (through the custom-op wrapper it would see one opaque call).
    ops = SimpleNamespace(sparse_adamw_=S.sparse_adamw_impl, sparse_catchup_=S.sparse_catchup_impl)
    monkeypatch.setattr(sparse, "_backend_ops", lambda backend: ops)
    gen = torch.Generator().manual_seed(3)
    V, d, steps = 24, 16, 22
    w0 = torch.randn(V, d, generator=gen)
    grads = _grads(V, d, steps, gen)

    def sparse_grad(ids, vals):
        return torch.sparse_coo_tensor(ids.unsqueeze(0), vals, (V, d))

    eager_w = torch.nn.Parameter(w0.clone())
    eager = _capturable_opt(eager_w)
    for ids, vals in grads:
        eager_w.grad = sparse_grad(ids, vals)
        eager.step()
    cap_w = torch.nn.Parameter(w0.clone())
    cap = _capturable_opt(cap_w)
    warm = 2
    for ids, vals in grads[:warm]:
        cap_w.grad = sparse_grad(ids, vals)
        cap.step()
    # "Capture" step `warm` with a static gradient whose indices and values the replays refill.
    static = sparse_grad(grads[warm][0].clone(), grads[warm][1].clone())  # (it shares their memory)
    cap_w.grad = static
    rec = StepRecorder()
    launch = S.launch
    monkeypatch.setattr(S, "launch", rec.launch)
    monkeypatch.setattr(cap._rows, "raise_pending", lambda: None)
    with rec:
        cap.step()
    monkeypatch.setattr(S, "launch", lambda kernel, grid, *a, **k: pytest.fail("a replay runs no host code"))
    assert sum(e[0] == "launch" for e in rec.entries) >= 8
    for ids, vals in grads[warm + 1 :]:
        static._indices()[0].copy_(ids)
        static._values().copy_(vals)
        rec.replay()
    monkeypatch.setattr(S, "launch", launch)
    st_e, st_c = eager.state[eager_w], cap.state[cap_w]
    clock = st_c["row_clock"]
    # 22 steps: 3 epochs and more, once round the ring and on
    assert clock.ring == 4 + 2 * clock.epoch + 2 == 18 and clock.epoch == 6
    assert cap._rows._errors[id(cap_w)][1].word.tolist() == [0, 0, 0]
    assert float(st_c["step"]) == float(st_e["step"]) == steps
    for key in ("exp_avg", "exp_avg_sq", "last_step"):
        assert torch.equal(st_c[key], st_e[key]), key
    assert torch.equal(cap_w.detach(), eager_w.detach())
    assert torch.equal(clock.hist, st_e["row_clock"].hist)
    # The ring's history against the host's (RowClock, capturable=False): the same exact step to
    # fp32 rounding (the history's fp64 values differ in their last bits: device libm).
    host_w = torch.nn.Parameter(w0.clone())
    host = _capturable_opt(host_w, capturable=False)
    for ids, vals in grads:
        host_w.grad = sparse_grad(ids, vals)
        host.step()
    for o in (eager, host):
        o.flush()
    assert rel_err(eager_w.detach(), host_w.detach()) < 1e-5
    assert rel_err(eager.state[eager_w]["exp_avg_sq"], host.state[host_w]["exp_avg_sq"]) < 1e-5


@pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (test_interpreter_child)")
def test_ring_refuses_a_row_the_ring_has_lost():
    """A row whose epoch start the ring has overwritten (no sweep kept it current) sets error code
    2 and the op writes nothing."""
    from lvopt.sparse import RingClock
    from lvopt.triton import sparse_rows as S

    V, d = 8, 4
    clock = RingClock(0.3, 0.5, 1e-3, 0, V, "cpu", period=2)
    hist, qpow, base, epoch, window = clock.op_args()
    p, m, v = torch.randn(V, d), torch.zeros(V, d), torch.zeros(V, d)
    step = torch.zeros(())
    last = torch.zeros(V, dtype=torch.int64)
    err = torch.zeros(3, dtype=torch.int64)
    hyper = torch.tensor([[1e-2, 0.3, 0.5, 0.1, 1e-3, 0.0]], dtype=torch.float64)
    ring = (hist, qpow, hyper, base, epoch, window)  # the ring's history arguments, in the op's order

    def step_row(row):  # the Triton op on one row, exact mode, no stats, the ring-history flag (2)
        S.sparse_adamw_impl(p, torch.tensor([row]), torch.ones(1, d), m, v, step, last, *ring, True, None, err, 2)

    for t in range(clock.ring):  # only row 0 is stepped: row 1 stays at step 0
        step_row(0)
    assert err.tolist() == [0, 0, 0] and float(step) == clock.ring
    before = [x.clone() for x in (p, m, v, last)]
    step_row(1)
    assert err.tolist()[0] == 2 and float(step) == clock.ring
    for a, b in zip(before, (p, m, v, last)):
        assert torch.equal(a, b)


if not IN_CHILD:

    @pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU tests/test_cuda_capture.py captures for real")
    def test_interpreter_child():
        run_file_under_interpreter(__file__)
