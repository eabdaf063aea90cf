"""lvopt_triton::fused_adamh_ (lvopt/triton/fused_adamh.py) against the reference: the CPU
kernel's parity tests, on CUDA tensors with a GPU, else on CPU tensors under
TRITON_INTERPRET=1 in a child pytest (tests/_triton_support.py)."""
import math

import pytest
import torch

from _triton_support import IN_CHILD, run_file_under_interpreter, triton_device
import _adamh_split as split
from conftest import clone_all, make_hyper, make_state, rel_err

DEV = triton_device()
needs_triton_device = pytest.mark.skipif(DEV is None, reason="no GPU: these run in the interpreter child")

SHAPES = [(33, 17), (129, 130), (2, 3, 5), (1, 2 * 16384 + 77), (0, 4)]


if not IN_CHILD:

    def test_interpreter_parity_in_child():
        run_file_under_interpreter(__file__)


def _ops():
    import lvopt.triton

    return lvopt.triton


def _radii(ps):
    return [torch.linalg.vector_norm(p.cpu(), dtype=torch.float64) for p in ps]


def _to(lists, dev):
    return [[t.to(dev) for t in lst] for lst in lists]


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(gen, dtype, maximize):
    from lvopt import reference

    ps, gs, ms, vs, ss = make_state(SHAPES, dtype, gen, steps=2)
    hyper = make_hyper(len(SHAPES), wd=0.0, maximize=maximize, gen=gen)
    radii = _radii(ps)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    initial = [p.clone() for p in ps]
    for _ in range(2):
        stats = _ops().fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
        ref_stats = reference.fused_adamh_(rp, rg, rm, rv, rs, radii, hyper)
        assert stats.dtype == torch.float64 and stats.shape == (len(SHAPES), 3) and stats.device.type == DEV.type
        stats = stats.cpu()
        scale = torch.stack([stats[:, 0], (stats[:, 0] * stats[:, 2]).sqrt(), stats[:, 2]], 1)
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert bool(((stats - ref_stats).abs() <= tol * scale).all())
    for p, p0, r, q, s in zip(ps, initial, radii, rp, ss):
        assert float(s) == 4.0
        if p.numel() == 0:
            continue
        p, p0 = p.cpu(), p0.cpu()
        # bf16 may legitimately not change at a drawn lr near 1e-4 (below bf16 spacing).
        if dtype == torch.float32:
            assert not torch.equal(p, p0)
        tol = 1e-5 if dtype == torch.float32 else 2.0**-7
        assert rel_err(p, q) < tol
        assert abs(float(torch.linalg.vector_norm(p, dtype=torch.float64)) / float(r) - 1) < (
            1e-5 if dtype == torch.float32 else 1e-2)


@needs_triton_device
def test_deterministic(gen):
    ps, gs, ms, vs, ss = make_state([(129, 130), (3, 5)], torch.float32, gen)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    hyper = make_hyper(2, wd=0.0, gen=gen)
    radii = _radii(ps)
    a = clone_all(ps, gs, ms, vs, ss)
    st1 = _ops().fused_adamh_(*a, radii, hyper)
    st2 = _ops().fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
    assert torch.equal(st1, st2)
    for x, y in zip(ps + ms + vs, a[0] + a[2] + a[3]):
        assert torch.equal(x, y)


@needs_triton_device
def test_zero_gradient_and_zero_matrix():
    w = torch.randn(8, 9)
    z = torch.zeros(5, 5)
    ps = [w.clone().to(DEV), z.clone().to(DEV)]
    gs = [torch.zeros(8, 9, device=DEV), torch.randn(5, 5, device=DEV)]
    ms = [torch.zeros(8, 9, device=DEV), torch.zeros(5, 5, device=DEV)]
    vs = [torch.zeros(8, 9, device=DEV), torch.zeros(5, 5, device=DEV)]
    ss = [torch.tensor(0.0), torch.tensor(0.0)]
    radii = _radii(ps)
    _ops().fused_adamh_(ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0))
    assert torch.allclose(ps[0].cpu(), w, rtol=1e-6) and torch.equal(ps[1].cpu(), z)
    assert not ps[0].isnan().any()


@needs_triton_device
def test_opcheck(gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11, 2)], torch.float32, gen)
    radii = _radii(ps)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    torch.library.opcheck(torch.ops.lvopt_triton.fused_adamh_.default,
                          (ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0)))


@needs_triton_device
def test_errors_write_nothing(gen):
    ps, gs, ms, vs, ss = make_state([(4, 4), (6, 2)], torch.float32, gen)
    radii = _radii(ps)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    cases = [
        ("weight_decay of tensor 0", (ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.1))),
        ("radii has 1 tensors", (ps, gs, ms, vs, ss, radii[:1], make_hyper(2, wd=0.0))),
        ("radii\\[1\\] must be finite", (ps, gs, ms, vs, ss, [radii[0], torch.tensor(math.nan, dtype=torch.float64)],
                                         make_hyper(2, wd=0.0))),
        ("radii\\[0\\] must be a one-element float64", (ps, gs, ms, vs, ss, [radii[0].float(), radii[1]],
                                                        make_hyper(2, wd=0.0))),
    ]
    before = clone_all(ps, ms, vs, ss)
    for pattern, args in cases:
        with pytest.raises(RuntimeError, match=pattern):
            _ops().fused_adamh_(*args)
    for lst, old in zip((ps, ms, vs, ss), before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)


# ----- the two passes as two ops (sharded matrices: the sums are all-reduced in between) --------

@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_ops_equal_the_single_call(gen, dtype):
    split.split_equals_single_call(_ops(), DEV, dtype, gen, exact=True, shapes=SHAPES)


@needs_triton_device
@pytest.mark.parametrize("dim,parts", [(0, 4), (1, 2)])
def test_shards_with_summed_sums_take_the_unsharded_step(gen, dim, parts):
    split.sharded_sums_give_the_unsharded_step(_ops(), DEV, dim, parts, gen, steps=2)


@needs_triton_device
def test_split_ops_nonfinite_write_nothing(gen):
    split.nonfinite_writes_nothing(_ops(), DEV, gen)


@needs_triton_device
def test_split_ops_opcheck(gen):
    split.opcheck(torch.ops.lvopt_triton, DEV, gen)


@needs_triton_device
def test_split_ops_errors_write_nothing(gen):
    split.errors_write_nothing(_ops(), DEV, gen)
