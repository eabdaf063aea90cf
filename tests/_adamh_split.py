"""Checks of AdamH's two passes as two ops (fused_adamh_reduce_, fused_adamh_apply_), called by
tests/test_fused_adamh.py on every backend and on the reference: ``ops`` is torch.ops.lvopt,
lvopt.triton or lvopt.reference, ``dev`` the parameters' device."""

import pytest
import torch

from conftest import clone_all, make_hyper, make_state

SHAPES = [(33, 17), (300, 257), (2, 3, 5), (1, 70000), (0, 4)]


def _radii(ps):
    return [torch.linalg.vector_norm(p.cpu(), dtype=torch.float64) for p in ps]


def _to(lists, dev):
    return [[t.to(dev) for t in lst] for lst in lists]


def split_equals_single_call(ops, dev, dtype, gen, exact: bool, shapes=SHAPES, state_dev="cpu"):
    """reduce then apply (no sums changed in between) is fused_adamh_: bit for bit where both
    run the same kernels (``exact``), else within fp32 rounding. ``state_dev``: where the step
    counters, radii and hyper table live (the host, or a GPU's device state)."""
    ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=2)
    radii = [r.to(state_dev) for r in _radii(ps)]
    hyper = make_hyper(len(shapes), wd=0.0, gen=gen).to(state_dev)
    ps, gs, ms, vs, ss = _to((ps, gs, ms, vs, ss), dev)
    ss = [s.to(state_dev) for s in ss]
    a = clone_all(ps, gs, ms, vs, ss)
    for it in range(3):
        stats = ops.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper)
        sums = ops.fused_adamh_reduce_(a[0], a[1], a[2], a[3], a[4], hyper)
        assert sums.dtype == torch.float64 and sums.shape == (len(shapes), 3) and sums.device == ps[0].device
        ops.fused_adamh_apply_(a[0], a[2], a[3], a[4], radii, hyper, sums)
        if exact or it == 0:  # pass 1 is the same computation (later, W differs by rounding)
            assert torch.equal(stats.cpu(), sums.cpu())
    for lst, other in zip((ps, ms, vs, ss), (a[0], a[2], a[3], a[4])):
        for x, y in zip(lst, other):
            if exact:
                assert torch.equal(x, y)
            elif x.numel():
                tol = 1e-6 if dtype == torch.float32 else 2.0**-7
                assert float((x.double() - y.double()).abs().max()) <= tol * max(float(y.double().abs().max()), 1e-30)


def sharded_sums_give_the_unsharded_step(ops, dev, dim: int, parts: int, gen, steps: int = 3):
    """Matrices cut into ``parts`` uneven blocks along ``dim`` (the shards of ``parts`` ranks):
    each "rank" runs pass 1 on its blocks, the sums are added over the ranks (what the all-reduce
    does), each runs pass 2 with them: the matrices are the unsharded step's within 1e-6, and
    keep their radius."""
    shapes = [(300, 257), (37, 65), (3, 130)]
    ps, gs, ms, vs, ss = make_state(shapes, torch.float32, gen, steps=1)
    radii = _radii(ps)
    hyper = make_hyper(len(shapes), wd=0.0, gen=gen)
    whole = _to((ps, gs, ms, vs), dev) + [ss]

    def cut(t):
        return [x.contiguous() for x in torch.tensor_split(t, parts, dim=dim)]

    ranks = []
    for r in range(parts):
        ranks.append([[cut(t)[r] for t in lst] for lst in whole[:4]] + [[s.clone() for s in ss]])
    for _ in range(steps):
        ops.fused_adamh_(*whole, radii, hyper)
        sums = [ops.fused_adamh_reduce_(*rk, hyper) for rk in ranks]
        total = torch.stack([s.cpu() for s in sums]).sum(0).to(sums[0].device).contiguous()
        for rk in ranks:
            ops.fused_adamh_apply_(rk[0], rk[2], rk[3], rk[4], radii, hyper, total)
    for i, (p, r) in enumerate(zip(whole[0], radii)):
        joined = torch.cat([rk[0][i] for rk in ranks], dim=dim)
        err = float((joined.double() - p.double()).abs().max() / p.double().abs().max())
        assert err < 1e-6, (i, err)
        assert abs(float(joined.double().norm()) / float(r) - 1) < 1e-6
        for k in (2, 3):
            assert torch.allclose(torch.cat([rk[k][i] for rk in ranks], dim=dim), whole[k][i], rtol=1e-6, atol=0)
    for rk in ranks:
        assert all(float(s) == float(t) for s, t in zip(rk[4], ss))


def nonfinite_writes_nothing(ops, dev, gen, state_dev="cpu"):
    """found_inf: a non-finite gradient stops pass 1 (flag set, zero sums, nothing written, no
    counter advanced); pass 2 given a set flag writes nothing."""
    ps, gs, ms, vs, ss = make_state([(5, 7), (11, 2)], torch.float32, gen, steps=1)
    radii = _radii(ps)
    hyper = make_hyper(2, wd=0.0)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), dev)
    ss = [s.to(state_dev) for s in ss]
    gs[1][3, 1] = float("nan")
    found = torch.zeros(1, device=dev)
    before = clone_all(ps, ms, vs, ss)
    sums = ops.fused_adamh_reduce_(ps, gs, ms, vs, ss, hyper, found)
    assert float(found) == 1.0 and not bool(sums.any())
    ops.fused_adamh_apply_(ps, ms, vs, ss, radii, hyper, torch.ones(2, 3, dtype=torch.float64, device=dev), found)
    for lst, old in zip((ps, ms, vs, ss), before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)


def opcheck(ops_ns, dev, gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11, 2)], torch.float32, gen)
    radii = _radii(ps)
    hyper = make_hyper(2, wd=0.0)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), dev)
    torch.library.opcheck(ops_ns.fused_adamh_reduce_.default, (ps, gs, ms, vs, ss, hyper))
    sums = ops_ns.fused_adamh_reduce_(ps, gs, ms, vs, ss, hyper)
    torch.library.opcheck(ops_ns.fused_adamh_apply_.default, (ps, ms, vs, ss, radii, hyper, sums))
    found = torch.zeros(1, device=dev)
    torch.library.opcheck(ops_ns.fused_adamh_apply_.default, (ps, ms, vs, ss, radii, hyper, sums, found))


def errors_write_nothing(ops, dev, gen):
    ps, gs, ms, vs, ss = make_state([(4, 4), (6, 2)], torch.float32, gen, steps=1)
    radii = _radii(ps)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), dev)
    ok = make_hyper(2, wd=0.0)
    f64 = dict(dtype=torch.float64, device=dev)
    cases = [
        ("weight_decay of tensor 0", ops.fused_adamh_reduce_, (ps, gs, ms, vs, ss, make_hyper(2, wd=0.1))),
        (
            "weight_decay of tensor 0",
            ops.fused_adamh_apply_,
            (ps, ms, vs, ss, radii, make_hyper(2, wd=0.1), torch.ones(2, 3, **f64)),
        ),
        ("sums must be", ops.fused_adamh_apply_, (ps, ms, vs, ss, radii, ok, torch.ones(3, 3, **f64))),
        ("sums must be", ops.fused_adamh_apply_, (ps, ms, vs, ss, radii, ok, torch.ones(2, 3, device=dev))),
        ("radii has 1 tensors", ops.fused_adamh_apply_, (ps, ms, vs, ss, radii[:1], ok, torch.ones(2, 3, **f64))),
        ("tensor lists differ", ops.fused_adamh_reduce_, (ps, gs[:1], ms, vs, ss, ok)),
    ]
    before = clone_all(ps, ms, vs, ss)
    for pattern, fn, args in cases:
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            fn(*args)
    for lst, old in zip((ps, ms, vs, ss), before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)
