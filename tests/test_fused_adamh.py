"""lvopt::fused_adamh_ on every backend (the ``backend`` fixture of conftest.py: the CPU kernel
csrc/cpu/fused_adamh.cpp, the Triton kernel lvopt/triton/fused_adamh.py, the CUDA kernel)
against the reference, and the reference against an fp64 evaluation of docs/design.md's AdamH
(section 2.2)."""

import math

import pytest
import torch

from conftest import (
    IN_TRITON_CHILD,
    assert_unchanged,
    clone_all,
    make_hyper,
    make_state,
    rel_err,
    run_triton_child,
    single_threaded_on_cpu,
)
from lvopt import reference
import _adamh_split as split

# Per backend: matrices across the chunking (a 70000-element row on the CPU and CUDA, two
# 16 Ki chunks and a tail for the interpreter), a 3-d tensor and an empty one.
SHAPES = {
    "cpu": [(33, 17), (300, 257), (2, 3, 5), (1, 70000), (0, 4)],
    "triton": [(33, 17), (129, 130), (2, 3, 5), (1, 2 * 16384 + 77), (0, 4)],
    "cuda": [(33, 17), (300, 257), (2, 3, 5), (1, 70000), (0, 4)],
}
STEPS = {"cpu": 3, "triton": 2, "cuda": 1}
DETERMINISM_SHAPES = {"cpu": [(700, 301), (3, 5)], "triton": [(129, 130), (3, 5)], "cuda": [(700, 301), (3, 5)]}

if not IN_TRITON_CHILD:

    def test_triton_in_interpreter_child():
        run_triton_child(__file__)


def _radii(ps):
    return [torch.linalg.vector_norm(p.cpu(), dtype=torch.float64) for p in ps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(backend, gen, dtype, maximize):
    shapes = SHAPES[backend.name]
    ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=2)
    hyper = make_hyper(len(shapes), wd=0.0, maximize=maximize, gen=gen)
    radii = _radii(ps)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    initial = [p.clone() for p in ps]
    for _ in range(STEPS[backend.name]):
        stats = backend.ops.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
        ref_stats = reference.fused_adamh_(rp, rg, rm, rv, rs, radii, hyper)
        assert stats.dtype == torch.float64 and stats.shape == (len(shapes), 3)
        assert stats.device.type == backend.device.type
        stats = stats.cpu()
        # <W,u> may cancel: its error is measured against the Cauchy-Schwarz scale ||W||*||u||.
        scale = torch.stack([stats[:, 0], (stats[:, 0] * stats[:, 2]).sqrt(), stats[:, 2]], 1)
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert bool(((stats - ref_stats).abs() <= tol * scale).all())
    for p, p0, r, q, s in zip(ps, initial, radii, rp, ss):
        assert float(s) == 2.0 + STEPS[backend.name]
        if p.numel() == 0:
            continue
        p, p0 = p.cpu(), p0.cpu()
        # A bf16 matrix may legitimately not change: with a drawn lr near 1e-4 each step moves an
        # element by ~1e-4 of its size, below bf16's 2^-8 spacing (the fp32 moments do change).
        if dtype == torch.float32:
            assert not torch.equal(p, p0)
        tol = 1e-5 if dtype == torch.float32 else 2.0**-7
        assert rel_err(p, q) < tol
        # The norm stays at the recorded radius.
        assert abs(float(torch.linalg.vector_norm(p, dtype=torch.float64)) / float(r) - 1) < (
            1e-5 if dtype == torch.float32 else 1e-2
        )


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


def test_deterministic(backend, gen):
    """The same inputs give the same bits: twice on a device (AdamH's reductions have a fixed
    order), and on the CPU with one thread against all of them (ISA levels: test_fused_adamw)."""
    shapes = DETERMINISM_SHAPES[backend.name]
    ps, gs, ms, vs, ss = make_state(shapes, torch.float32, gen)
    hyper = make_hyper(len(shapes), wd=0.0, gen=gen)
    radii = _radii(ps)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    a = clone_all(ps, gs, ms, vs, ss)
    st1 = single_threaded_on_cpu(backend, backend.ops.fused_adamh_, *a, radii, hyper)
    st2 = backend.ops.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
    assert torch.equal(st1, st2)
    for x, y in zip(ps + ms + vs, a[0] + a[2] + a[3]):
        assert torch.equal(x, y)


def test_zero_gradient_and_zero_matrix(backend):
    """u = 0 (zero moments, zero gradient) leaves W on its sphere; R = 0 leaves W zero."""
    w = torch.randn(8, 9)
    z = torch.zeros(5, 5)
    ps = [w.clone(), z.clone()]
    gs = [torch.zeros(8, 9), torch.randn(5, 5)]
    ms, vs = [torch.zeros(8, 9), torch.zeros(5, 5)], [torch.zeros(8, 9), torch.zeros(5, 5)]
    ss = [torch.tensor(0.0), torch.tensor(0.0)]
    radii = _radii(ps)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    backend.ops.fused_adamh_(ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0))
    assert torch.allclose(ps[0].cpu(), w, rtol=1e-6) and torch.equal(ps[1].cpu(), z)
    assert not ps[0].isnan().any()


def test_opcheck(backend, gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11, 2)], torch.float32, gen)
    radii = _radii(ps)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    torch.library.opcheck(backend.op("fused_adamh_"), (ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.0)))


def test_compiles_with_torch_compile(backend, gen):
    """fused_adamh_ in a fullgraph torch.compile (its fake kernel returns the [n, 3] stats):
    the same bits as the op called eagerly."""
    ps, gs, ms, vs, ss = make_state([(64, 3), (5, 7)], torch.float32, gen)
    radii = _radii(ps)
    hyper = make_hyper(2, wd=0.0)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    r = clone_all(ps, gs, ms, vs, ss)
    op = backend.ops.fused_adamh_

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps, gs, ms, vs, ss, radii, hyper):
        return op(ps, gs, ms, vs, ss, radii, hyper)

    stats = step(ps, gs, ms, vs, ss, radii, hyper)
    ref_stats = op(*r, radii, hyper)
    assert torch.equal(stats, ref_stats)
    for x, y in zip(ps + ms + vs + ss, r[0] + r[2] + r[3] + r[4]):
        assert torch.equal(x, y)


def test_errors_write_nothing(backend, gen):
    ps, gs, ms, vs, ss = make_state([(4, 4), (6, 2)], torch.float32, gen)
    radii = _radii(ps)
    ps, gs, ms, vs = backend.to((ps, gs, ms, vs))
    cases = [
        ("weight_decay of tensor 0", (ps, gs, ms, vs, ss, radii, make_hyper(2, wd=0.1))),
        ("radii has 1 tensors", (ps, gs, ms, vs, ss, radii[:1], make_hyper(2, wd=0.0))),
        (
            "radii\\[1\\] must be finite",
            (ps, gs, ms, vs, ss, [radii[0], torch.tensor(math.nan, dtype=torch.float64)], make_hyper(2, wd=0.0)),
        ),
        (
            "radii\\[0\\] must be a one-element float64",
            (ps, gs, ms, vs, ss, [radii[0].float(), radii[1]], make_hyper(2, wd=0.0)),
        ),
    ]
    before = clone_all(ps, ms, vs, ss)
    for pattern, args in cases:
        with pytest.raises(RuntimeError, match=pattern):
            backend.ops.fused_adamh_(*args)
    assert_unchanged((ps, ms, vs, ss), before)


# ----- the two passes as two ops (sharded matrices: the sums are all-reduced in between) --------


# On every backend, and on the reference (no ``backend`` fixture: it is the oracle).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_ops_equal_the_single_call(backend, gen, dtype):
    split.split_equals_single_call(backend.ops, backend.device, dtype, gen, exact=True, shapes=SHAPES[backend.name])
    if backend.name == "cuda":  # the device-resident step counters, radii and hyper table too
        split.split_equals_single_call(backend.ops, backend.device, dtype, gen, exact=True, state_dev="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_split_ops_equal_the_single_call(gen, dtype):
    split.split_equals_single_call(reference, "cpu", dtype, gen, exact=False)


@pytest.mark.parametrize("dim,parts", [(0, 4), (1, 2)])
def test_shards_with_summed_sums_take_the_unsharded_step(backend, gen, dim, parts):
    split.sharded_sums_give_the_unsharded_step(backend.ops, backend.device, dim, parts, gen, steps=STEPS[backend.name])


@pytest.mark.parametrize("dim,parts", [(0, 4), (1, 2)])
def test_reference_shards_with_summed_sums_take_the_unsharded_step(gen, dim, parts):
    split.sharded_sums_give_the_unsharded_step(reference, "cpu", dim, parts, gen, steps=2)


def test_split_ops_nonfinite_write_nothing(backend, gen):
    split.nonfinite_writes_nothing(backend.ops, backend.device, gen)
    if backend.name == "cuda":
        split.nonfinite_writes_nothing(backend.ops, backend.device, gen, state_dev="cuda")


def test_reference_split_ops_nonfinite_write_nothing(gen):
    split.nonfinite_writes_nothing(reference, "cpu", gen)


def test_split_ops_opcheck(backend, gen):
    namespace = torch.ops.lvopt_triton if backend.name == "triton" else torch.ops.lvopt
    backend.op("fused_adamh_reduce_")  # imports lvopt.triton for its namespace
    split.opcheck(namespace, backend.device, gen)


def test_split_ops_errors_write_nothing(backend, gen):
    split.errors_write_nothing(backend.ops, backend.device, gen)
