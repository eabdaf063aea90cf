"""The CUDA sparse-row ops (csrc/cuda/sparse_rows.cu) against the CPU kernel and the reference,
on a GPU: the ops driven through the same random runs as tests/test_sparse_rows.py (the table,
ids, values and last_step on the device; step, hist, qpow and hyper on the host, as
lvopt.optim passes them), exact mode against dense fp64 AdamW (eps = 3e-2 sends many rows to
the fp64 loop kernel), coalescing, telemetry sums, errors, and the optimizer end to end.
Skipped (with the reason) where there is no GPU or no CUDA build."""
import pytest
import torch
from torch import nn

import lvopt
from lvopt import reference
from conftest import rel_err
from test_sparse_rows import _run_ops

DEV = "cuda"
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and lvopt.build_info()["cuda"]),
    reason="needs a CUDA device and lvopt._C built with CUDA kernels")

# Positions of the op arguments that live on the device (param, indices, values, exp_avg,
# exp_avg_sq, last_step for sparse_adamw_; param, indices, exp_avg, exp_avg_sq, last_step for
# sparse_catchup_); step, hist, qpow and hyper stay on the host.
ADAMW_DEVICE_ARGS = (0, 1, 2, 3, 4, 6)
CATCHUP_DEVICE_ARGS = (0, 1, 2, 3, 5)


def on_device(fn, positions):
    """fn run on device copies of the CPU arguments at ``positions``; mutated ones are copied back."""
    def run(*args):
        moved = [a.to(DEV) if i in positions else a for i, a in enumerate(args)]
        fn(*moved)
        for a, b in zip(args, moved):
            if b is not a:
                a.copy_(b.cpu())
    return run


CUDA_ADAMW = on_device(torch.ops.lvopt.sparse_adamw_, ADAMW_DEVICE_ARGS)
CUDA_CATCHUP = on_device(torch.ops.lvopt.sparse_catchup_, CATCHUP_DEVICE_ARGS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [True, False])
def test_ops_match_cpu_kernel_and_reference(gen, dtype, exact):
    seed = gen.initial_seed()
    for V, d in [(23, 37), (31, 64)]:  # d = 37: no 16-byte rows (the scalar path); 64: vectors
        cuda, _ = _run_ops(CUDA_ADAMW, CUDA_CATCHUP, V, d, dtype, torch.Generator().manual_seed(seed), 60, exact=exact)
        cpu, _ = _run_ops(torch.ops.lvopt.sparse_adamw_, torch.ops.lvopt.sparse_catchup_, V, d, dtype,
                          torch.Generator().manual_seed(seed), 60, exact=exact)
        ref, _ = _run_ops(reference.sparse_adamw_, reference.sparse_catchup_, V, d, dtype,
                          torch.Generator().manual_seed(seed), 60, exact=exact)
        assert float(cuda[3]) == float(cpu[3]) == 60.0
        assert torch.equal(cuda[4], cpu[4])
        if not exact:
            # Lazy: the same fp32 operations in the same order as the CPU kernel.
            for a, b in zip(cuda[:3], cpu[:3]):
                assert torch.equal(a, b)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for a, b, c in zip(cuda[:3], cpu[:3], ref[:3]):
            assert rel_err(a, b) < 1e-6 if dtype == torch.float32 else rel_err(a, b) < 1e-2
            assert rel_err(a, c) < tol


@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.9, 0.999), 3e-2)])
def test_exact_matches_dense_fp64(gen, betas, eps):
    V, d = 40, 33

    def ids_fn(t, g):
        hot = torch.randint(0, 4, (3,), generator=g)
        rare = torch.randint(4, V, (1,), generator=g) if t % 23 == 0 else torch.empty(0, dtype=torch.int64)
        return torch.cat([hot, rare, hot[:1]])

    (p, m, v, *_), (P, M, Vv) = _run_ops(CUDA_ADAMW, CUDA_CATCHUP, V, d, torch.float32, gen, 700,
                                         betas=betas, eps=eps, ids_fn=ids_fn)
    assert rel_err(p, P) < 5e-6 and rel_err(m, M) < 5e-6 and rel_err(v, Vv) < 2e-5


def test_stats_match_cpu_kernel(gen):
    from lvopt.sparse import RowClock

    V, d = 50, 40
    clock = RowClock(0.9, 0.999, 1e-8, 0)
    for t in range(1, 6):
        clock.append(t, 1e-2, 0.1)
    h, q, base, e, w = clock.op_args()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    ids = torch.randint(0, V, (80,), generator=gen)
    vals = torch.randn(80, d, generator=gen)
    p, m, v = torch.randn(V, d, generator=gen), torch.rand(V, d, generator=gen), torch.rand(V, d, generator=gen)
    last = torch.randint(0, 5, (V,), generator=gen)
    for exact in (True, False):
        outs = []
        for dev in ("cpu", DEV):
            stats = torch.zeros(2, dtype=torch.float64, device=dev)
            pp, mm, vv, ll = (x.clone().to(dev) for x in (p, m, v, last))
            torch.ops.lvopt.sparse_adamw_(pp, ids.to(dev), vals.to(dev), mm, vv, torch.tensor(5.0), ll, h, q,
                                          hyper, base, e, w, exact, stats=stats)
            outs.append(stats.cpu())
        assert rel_err(outs[1], outs[0]) < 1e-12


@pytest.mark.parametrize("mode", ["exact", "lazy"])
@pytest.mark.parametrize("module", ["torch", "lvopt"])
def test_optimizer_on_cuda_matches_cpu(gen, mode, module):
    """A sparse embedding and a dense head trained on the GPU and on the CPU: the same tables."""
    V, d = 500, 32
    ids = [torch.randint(0, V, (4, 16), generator=gen) for _ in range(8)]
    results = []
    for dev in ("cpu", DEV):
        torch.manual_seed(0)
        emb = (lvopt.nn.Embedding(V, d) if module == "lvopt" else nn.Embedding(V, d, sparse=True)).to(dev)
        head = nn.Linear(d, 3).to(dev)
        opt = lvopt.AdamW([{"params": emb.parameters(), "sparse_mode": mode, "weight_decay": 0.0 if mode == "lazy" else 0.1},
                           {"params": head.parameters()}], lr=3e-3)
        for x in ids:
            loss = head(emb(x.to(dev))).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt.flush()
        results.append([t.detach().cpu() for t in (emb.weight, head.weight)])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5


# ----- sync-free, capturable, deterministic (issue 15) --------------------------------------------

def _sparse_training(backend, mode, dtype=torch.float32, steps=6, V=3000, d=64, N=512, seed=0, sync_check=False):
    """lvopt.nn.Embedding trained alone (sparse rows only) for ``steps`` steps; with sync_check
    every step after the first runs under torch.cuda.set_sync_debug_mode("error"), forward,
    backward, step and the final flush included."""
    g = torch.Generator().manual_seed(seed)
    emb = lvopt.nn.Embedding(V, d, padding_idx=0, device=DEV, dtype=dtype)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, d, generator=g).to(dtype))
    opt = lvopt.AdamW([{"params": emb.parameters(), "sparse_mode": mode}], lr=1e-2, weight_decay=0.1,
                      backend=backend)
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


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["exact", "lazy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_step_makes_no_synchronisation(backend, mode, dtype):
    w, _ = _sparse_training(backend, mode, dtype, sync_check=True)
    assert torch.isfinite(w.float()).all()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_sparse_training_is_bit_identical_across_runs(backend, mode):
    a, _ = _sparse_training(backend, mode)
    b, _ = _sparse_training(backend, mode)
    assert torch.equal(a, b)


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


def test_lazy_step_captured_in_a_cuda_graph_equals_eager():
    """The lazy sparse step (step count and hyperparameters on the device, an error word) in a
    CUDA graph for a fixed N: replays with new ids and values, and an lr changed in the device
    hyper row between replays, equal the eager op call by call."""
    V, d, N = 2000, 64, 256
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(V, d, generator=g).to(DEV)
    batches = [(torch.randint(0, V, (N,), generator=g).to(DEV), torch.randn(N, d, generator=g).to(DEV))
               for _ in range(5)]
    lrs = [1e-2, 1e-2, 5e-3, 5e-3, 2e-3]

    def state():
        return [p0.clone(), torch.zeros(V, d, device=DEV), torch.zeros(V, d, device=DEV),
                torch.zeros((), device=DEV)]

    none_i, none_f = torch.empty(0, dtype=torch.int64, device=DEV), torch.empty(0, dtype=torch.float64, device=DEV)
    eager = state()
    err_e = torch.zeros(3, dtype=torch.int64, device=DEV)
    for (ids, vals), lr in zip(batches, lrs):
        hyper = torch.tensor([[lr, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
        torch.ops.lvopt.sparse_adamw_(eager[0], ids, vals, eager[1], eager[2], eager[3], none_i, none_f, none_f,
                                      hyper, 0, 1, 0, False, error=err_e)
    cap = state()
    err = torch.zeros(3, dtype=torch.int64, device=DEV)
    s_ids, s_vals = batches[0][0].clone(), batches[0][1].clone()
    s_hyper = torch.tensor([[lrs[0], 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, on copies
        warm = state()
        torch.ops.lvopt.sparse_adamw_(warm[0], s_ids, s_vals, warm[1], warm[2], warm[3], none_i, none_f, none_f,
                                      s_hyper, 0, 1, 0, False, error=err.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.lvopt.sparse_adamw_(cap[0], s_ids, s_vals, cap[1], cap[2], cap[3], none_i, none_f, none_f,
                                      s_hyper, 0, 1, 0, False, error=err)
    for (ids, vals), lr in zip(batches, lrs):
        s_ids.copy_(ids)
        s_vals.copy_(vals)
        s_hyper[0, 0] = lr
        graph.replay()
    torch.cuda.synchronize()
    assert err.tolist() == [0, 0, 0] and float(cap[3]) == 5.0
    for a, b in zip(cap, eager):
        assert torch.equal(a, b)
