"""lvopt::fused_adamh_ (csrc/cpu/fused_adamh.cpp) against the reference, and the reference
against an fp64 evaluation of docs/design.md's AdamH (section 2.2)."""
import math

import pytest
import torch

from lvopt import reference
import _adamh_split as split
from conftest import clone_all, make_hyper, make_state, needs_native, rel_err

SHAPES = [(33, 17), (300, 257), (2, 3, 5), (1, 70000), (0, 4)]


def _radii(ps):
    return [torch.linalg.vector_norm(p, dtype=torch.float64) for p in ps]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(gen, dtype, maximize):
    ps, gs, ms, vs, ss = make_state(SHAPES, dtype, gen, steps=2)
    hyper = make_hyper(len(SHAPES), wd=0.0, maximize=maximize, gen=gen)
    radii = _radii(ps)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    initial = [p.clone() for p in ps]
    for _ in range(3):
        stats = torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
        ref_stats = reference.fused_adamh_(rp, rg, rm, rv, rs, radii, hyper)
        assert stats.dtype == torch.float64 and stats.shape == (len(SHAPES), 3)
        # <W,u> may cancel: its error is measured against the Cauchy-Schwarz scale ||W||*||u||.
        scale = torch.stack([stats[:, 0], (stats[:, 0] * stats[:, 2]).sqrt(), stats[:, 2]], 1)
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert bool(((stats - ref_stats).abs() <= tol * scale).all())
    for p, p0, r, q in zip(ps, initial, radii, rp):
        if p.numel() == 0:
            continue
        # A bf16 matrix may legitimately not change: with a drawn lr near 1e-4 each step moves an
        # element by ~1e-4 of its size, below bf16's 2^-8 spacing (the fp32 moments do change).
        if dtype == torch.float32:
            assert not torch.equal(p, p0)
        tol = 1e-5 if dtype == torch.float32 else 2.0**-7
        assert rel_err(p, q) < tol
        # The norm stays at the recorded radius.
        assert abs(float(torch.linalg.vector_norm(p, dtype=torch.float64)) / float(r) - 1) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_reference_matches_fp64_formula(gen):
    shape = (64, 48)
    w = torch.randn(shape, generator=gen)
    radius = torch.linalg.vector_norm(w, dtype=torch.float64)
    W, M, V = w.double(), torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    m, v, s = torch.zeros(shape), torch.zeros(shape), torch.tensor(0.0)
    lr, b1, b2, eps = 0.02, 0.9, 0.95, 1e-8
    hyper = make_hyper(1, lr=lr, betas=(b1, b2), wd=0.0, eps=eps)
    for t in range(1, 8):
        g = torch.randn(shape, generator=gen)
        reference.fused_adamh_([w], [g], [m], [v], [s], [radius], hyper)
        G = g.double()
        M = b1 * M + (1 - b1) * G
        V = b2 * V + (1 - b2) * G * G
        U = (M / (1 - b1**t)) / ((V / (1 - b2**t)).sqrt() + eps)
        Wp = W - lr * float(radius) * U / U.norm()
        W_prev = W
        W = float(radius) * Wp / Wp.norm()
        # The step before the retraction is lr in normalised weight space, exactly; after it,
        # ||dW||/||W|| is lr times the sine of the angle between u and W, up to O(lr^2).
        assert abs(float((Wp - W_prev).norm() / W_prev.norm()) - lr) < 1e-12
        assert abs(float((W - W_prev).norm() / W_prev.norm()) - lr) < 0.1 * lr
    assert rel_err(w, W) < 1e-5


@needs_native
def test_thread_count_and_isa_do_not_change_bits(gen):
    ps, gs, ms, vs, ss = make_state([(700, 301), (3, 5)], torch.float32, gen)
    hyper = make_hyper(2, wd=0.0, gen=gen)
    radii = _radii(ps)
    a = clone_all(ps, gs, ms, vs, ss)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        st1 = torch.ops.lvopt.fused_adamh_(*a, radii, hyper)
    finally:
        torch.set_num_threads(n)
    st2 = torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
    assert torch.equal(st1, st2)
    for x, y in zip(ps + ms + vs, a[0] + a[2] + a[3]):
        assert torch.equal(x, y)


@needs_native
def test_zero_gradient_and_zero_matrix():
    """u = 0 (zero moments, zero gradient) leaves W on its sphere; R = 0 leaves W zero."""
    w = torch.randn(8, 9)
    z = torch.zeros(5, 5)
    ps = [w.clone(), z.clone()]
    gs = [torch.zeros(8, 9), torch.randn(5, 5)]
    ms, vs = [torch.zeros(8, 9), torch.zeros(5, 5)], [torch.zeros(8, 9), torch.zeros(5, 5)]
    ss = [torch.tensor(0.0), torch.tensor(0.0)]
    radii = _radii(ps)
    torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0))
    assert torch.allclose(ps[0], w, rtol=1e-6) and torch.equal(ps[1], z)
    assert not ps[0].isnan().any()


@needs_native
def test_opcheck(gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11, 2)], torch.float32, gen)
    torch.library.opcheck(torch.ops.lvopt.fused_adamh_.default,
                          (ps, gs, ms, vs, ss, _radii(ps), make_hyper(2, wd=0.0)))


@needs_native
def test_errors_write_nothing(gen):
    ps, gs, ms, vs, ss = make_state([(4, 4), (6, 2)], torch.float32, gen)
    radii = _radii(ps)
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
            torch.ops.lvopt.fused_adamh_(*args)
    for lst, old in zip((ps, ms, vs, ss), before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)


# ----- the two passes as two ops (sharded matrices: the sums are all-reduced in between) --------

def _split_ops(name):
    return torch.ops.lvopt if name == "cpu" else reference


@pytest.mark.parametrize("name", [pytest.param("cpu", marks=needs_native), "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_ops_equal_the_single_call(gen, name, dtype):
    split.split_equals_single_call(_split_ops(name), "cpu", dtype, gen, exact=name == "cpu")


@pytest.mark.parametrize("name", [pytest.param("cpu", marks=needs_native), "reference"])
@pytest.mark.parametrize("dim,parts", [(0, 2), (0, 4), (1, 2), (1, 4)])
def test_shards_with_summed_sums_take_the_unsharded_step(gen, name, dim, parts):
    split.sharded_sums_give_the_unsharded_step(_split_ops(name), "cpu", dim, parts, gen)


@pytest.mark.parametrize("name", [pytest.param("cpu", marks=needs_native), "reference"])
def test_split_ops_nonfinite_write_nothing(gen, name):
    split.nonfinite_writes_nothing(_split_ops(name), "cpu", gen)


@needs_native
def test_split_ops_opcheck(gen):
    split.opcheck(torch.ops.lvopt, "cpu", gen)


@needs_native
def test_split_ops_errors_write_nothing(gen):
    split.errors_write_nothing(torch.ops.lvopt, "cpu", gen)
