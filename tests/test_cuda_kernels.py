"""lvopt's CUDA kernels (csrc/cuda) against the reference, on a GPU: the CPU kernels' parity
tests, device-resident step counters and hyper table, CUDA-graph capture, determinism of
AdamH's reductions. Skipped (with the reason) where there is no GPU or no CUDA build."""
import pytest
import torch

import lvopt
import _adamh_split as split
from lvopt import reference
from conftest import (assert_bf16_step_close, assert_close_at_list_scale, clone_all, make_hyper, make_state,
                      rel_err, restart_reference_from)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and lvopt.build_info()["cuda"]),
    reason="needs a CUDA device and lvopt._C built with CUDA kernels")

SHAPES = [(1,), (7,), (33, 17), (3 * 16384 + 5,), (3, 4, 5), (0,), (129, 257)]
MATS = [(33, 17), (300, 257), (2, 3, 5), (1, 70000), (0, 4)]


def _cuda(lists):
    return [[t.cuda() for t in lst] for lst in lists]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device_state", [False, True])
def test_adamw_matches_reference(gen, dtype, device_state):
    ps, gs, ms, vs, ss = make_state(SHAPES, dtype, gen, steps=3)
    hyper = make_hyper(len(SHAPES), maximize=True, gen=gen)
    r = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = _cuda((ps, gs, ms, vs))
    if device_state:
        ss, hyper_k = [s.cuda() for s in ss], hyper.cuda()
    else:
        hyper_k = hyper
    for _ in range(3):
        if dtype == torch.bfloat16:  # one step at a time from the kernel's state (see helper)
            before = restart_reference_from(r[0], ps)
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper_k)
        reference.fused_adamw_(*r, hyper)
    assert_close_at_list_scale(ms, r[2], 1e-6, "exp_avgs")
    assert_close_at_list_scale(vs, r[3], 1e-6, "exp_avg_sqs")
    if dtype == torch.float32:
        assert_close_at_list_scale(ps, r[0], 1e-6, "params")
    for i, (p, s, q, qs) in enumerate(zip(ps, ss, r[0], r[4])):
        assert float(s) == float(qs) == 6.0
        if p.numel() and dtype != torch.float32:
            assert_bf16_step_close(p, q, before[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamh_matches_reference_and_is_deterministic(gen, dtype):
    ps, gs, ms, vs, ss = make_state(MATS, dtype, gen, steps=2)
    hyper = make_hyper(len(MATS), wd=0.0, gen=gen)
    radii = [torch.linalg.vector_norm(p, dtype=torch.float64) for p in ps]
    r = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = _cuda((ps, gs, ms, vs))
    twin = clone_all(ps, gs, ms, vs, ss)
    stats = torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
    again = torch.ops.lvopt.fused_adamh_(*twin, radii, hyper)
    ref_stats = reference.fused_adamh_(*r, radii, hyper)
    assert stats.device.type == "cuda" and torch.equal(stats, again)
    scale = torch.stack([ref_stats[:, 0], (ref_stats[:, 0] * ref_stats[:, 2]).sqrt(), ref_stats[:, 2]], 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert bool(((stats.cpu() - ref_stats).abs() <= tol * scale).all())
    for p, q, t in zip(ps, r[0], twin[0]):
        assert torch.equal(p, t)
        if p.numel():
            assert rel_err(p.cpu(), q) < (1e-5 if dtype == torch.float32 else 2.0**-7)


def test_adamw_step_captures_in_a_cuda_graph(gen):
    """Device hyper table and step counters: no host synchronisation, so the step captures;
    a tensor lr enters by writing the hyper table's lr column on the device."""
    ps, gs, ms, vs, ss = make_state([(1000,), (33, 17)], torch.float32, gen)
    hyper = make_hyper(2, gen=gen)
    r = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = _cuda((ps, gs, ms, vs))
    ss, hyper_d = [s.cuda() for s in ss], hyper.cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph, as torch requires
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper_d)
    torch.cuda.current_stream().wait_stream(s)
    reference.fused_adamw_(*r, hyper)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper_d)
    for _ in range(3):
        graph.replay()
        reference.fused_adamw_(*r, hyper)
    torch.cuda.synchronize()
    assert float(ss[0]) == 4.0
    for p, q in zip(ps, r[0]):
        assert rel_err(p.cpu(), q) < 1e-6


def test_errors_write_nothing(gen):
    ps, gs, ms, vs, ss = make_state([(4, 4), (6,)], torch.float32, gen)
    ps, gs, ms, vs = _cuda((ps, gs, ms, vs))
    h = make_hyper(2)
    bad = h.clone()
    bad[1, 0] = -1.0
    before = clone_all(ps, ms, vs, ss)
    for pattern, args in [("grads\\[1\\] has shape", (ps, [gs[0], torch.randn(7, device="cuda")], ms, vs, ss, h)),
                          ("lr of tensor 1", (ps, gs, ms, vs, ss, bad)),
                          ("differ in length", (ps, gs[:1], ms, vs, ss, h))]:
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.lvopt.fused_adamw_(*args)
    for lst, old in zip((ps, ms, vs, ss), before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)


def test_opcheck(gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11, 2)], torch.float32, gen)
    radii = [torch.linalg.vector_norm(p, dtype=torch.float64) for p in ps]
    ps, gs, ms, vs = _cuda((ps, gs, ms, vs))
    torch.library.opcheck(torch.ops.lvopt.fused_adamw_.default, (ps, gs, ms, vs, ss, make_hyper(2)))
    torch.library.opcheck(torch.ops.lvopt.fused_adamh_.default, (ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0)))


# ----- AdamH's two passes as two ops (sharded matrices; tests/_adamh_split.py) ------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dev", ["cpu", "cuda"])
def test_adamh_split_ops_equal_the_single_call(gen, dtype, state_dev):
    split.split_equals_single_call(torch.ops.lvopt, "cuda", dtype, gen, exact=True, state_dev=state_dev)


@pytest.mark.parametrize("dim,parts", [(0, 4), (1, 2)])
def test_adamh_shards_with_summed_sums_take_the_unsharded_step(gen, dim, parts):
    split.sharded_sums_give_the_unsharded_step(torch.ops.lvopt, "cuda", dim, parts, gen)


@pytest.mark.parametrize("state_dev", ["cpu", "cuda"])
def test_adamh_split_ops_nonfinite_write_nothing(gen, state_dev):
    split.nonfinite_writes_nothing(torch.ops.lvopt, "cuda", gen, state_dev=state_dev)


def test_adamh_split_ops_opcheck(gen):
    split.opcheck(torch.ops.lvopt, "cuda", gen)


def test_adamh_split_ops_errors_write_nothing(gen):
    split.errors_write_nothing(torch.ops.lvopt, "cuda", gen)
