"""lvopt_triton::fused_adamw_ (lvopt/triton/fused_adamw.py) against the reference: the CPU
kernel's parity tests, on CUDA tensors with a GPU, else on CPU tensors under
TRITON_INTERPRET=1 in a child pytest (tests/_triton_support.py)."""
import pytest
import torch

from _triton_support import IN_CHILD, run_file_under_interpreter, triton_device
from conftest import (assert_bf16_step_close, assert_close_at_list_scale, clone_all, make_hyper, make_state,
                      rel_err, restart_reference_from)

DEV = triton_device()
needs_triton_device = pytest.mark.skipif(DEV is None, reason="no GPU: these run in the interpreter child")

# Tensors that span several 16 Ki chunks with a partial last tile, odd sizes (scalar tails),
# an empty tensor; kept small for the interpreter.
SHAPES = [(1,), (7,), (33, 17), (2 * 16384 + 1029,), (3, 4, 5), (0,)]


if not IN_CHILD:

    def test_interpreter_parity_in_child():
        run_file_under_interpreter(__file__)


def _ops():
    import lvopt.triton

    return lvopt.triton


def _to(lists, dev):
    return [[t.to(dev) for t in lst] for lst in lists]


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(gen, dtype, maximize):
    from lvopt import reference

    ps, gs, ms, vs, ss = make_state(SHAPES, dtype, gen, steps=3)
    hyper = make_hyper(len(SHAPES), maximize=maximize, gen=gen)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    initial = [p.clone() for p in ps]
    for _ in range(2):
        if dtype == torch.bfloat16:  # one step at a time from the kernel's state (see helper)
            before = restart_reference_from(rp, ps)
        _ops().fused_adamw_(ps, gs, ms, vs, ss, hyper)
        reference.fused_adamw_(rp, rg, rm, rv, rs, hyper)
    assert_close_at_list_scale(ms, rm, 1e-6, "exp_avgs")
    assert_close_at_list_scale(vs, rv, 1e-6, "exp_avg_sqs")
    if dtype == torch.float32:
        assert_close_at_list_scale(ps, rp, 1e-6, "params")
    for i, (p, p0, s, q, qs) in enumerate(zip(ps, initial, ss, rp, rs)):
        assert float(s) == float(qs) == 5.0
        if p.numel() == 0:
            continue
        p, p0 = p.cpu(), p0.cpu()
        if dtype != torch.float32:
            assert_bf16_step_close(p, q, before[i])
        if dtype == torch.float32 or p.numel() > 100:
            assert not torch.equal(p, p0)


@needs_triton_device
def test_misaligned_views_take_the_unhinted_launch(gen):
    """A view at a 4-byte offset cannot use 16-byte vectors; results are unchanged."""
    from lvopt import reference

    base = [torch.randn(16384 + 9, generator=gen) for _ in range(4)]
    p, g, m, v = (b[1:] for b in base)
    v = v.abs() + 1e-6
    ps, gs, ms, vs, ss = [p], [g], [m], [v], [torch.tensor(2.0)]
    r = clone_all(ps, gs, ms, vs, ss)
    hyper = make_hyper(1, gen=gen)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    _ops().fused_adamw_(ps, gs, ms, vs, ss, hyper)
    reference.fused_adamw_(*r, hyper)
    assert rel_err(ps[0].cpu(), r[0][0]) < 1e-6 and rel_err(vs[0].cpu(), r[3][0]) < 1e-6


@needs_triton_device
def test_launch_tables_are_reused_only_for_the_same_tensors(gen):
    """Launch tables are cached by the parameters' and moments' addresses, sizes and dtypes, not
    by the gradients' (zero_grad(set_to_none=True) re-allocates those): new gradients reuse the
    tables with their address column rewritten in place; another parameter or moment gets its
    own tables; steps through reused tables still match the reference."""
    from lvopt import reference
    from lvopt.triton import _common as C

    ps, gs, ms, vs, ss = make_state([(40, 3), (17,)], torch.float32, gen)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    first = C.first_chunks(ps)[0]
    plan = C.launches(ps, gs, ms, vs, first)
    assert C.launches(ps, gs, ms, vs, first) is plan
    other = [gs[0], gs[1].clone()]  # a gradient at another address: same tables, new column
    meta = plan[0][2]
    assert C.launches(ps, other, ms, vs, first) is plan and plan[0][2] is meta
    assert torch.equal(C._build_launches(ps, other, ms, vs, first, [None, None]).launches[0][2], meta)
    plan3 = C.launches(ps, gs, [ms[0], ms[1].clone()], vs, first)  # a moment elsewhere: new tables
    assert plan3 is not plan and not torch.equal(plan3[0][2], plan[0][2])
    r = clone_all([p.cpu() for p in ps], [g.cpu() for g in gs], [m.cpu() for m in ms], [v.cpu() for v in vs], ss)
    hyper = make_hyper(2, gen=gen)
    for k in range(3):  # the second and third steps run from the cached tables, with new gradients
        gs = [g.clone() * (k + 1) for g in gs]
        r[1] = [g.cpu() for g in gs]
        _ops().fused_adamw_(ps, gs, ms, vs, ss, hyper)
        reference.fused_adamw_(*r, hyper)
    for p, q in zip(ps, r[0]):
        assert rel_err(p.cpu(), q) < 1e-6


@needs_triton_device
def test_opcheck(gen):
    ps, gs, ms, vs, ss = make_state([(5, 7), (11,)], torch.float32, gen)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    torch.library.opcheck(torch.ops.lvopt_triton.fused_adamw_.default, (ps, gs, ms, vs, ss, make_hyper(2)))


@needs_triton_device
def test_compiles_with_torch_compile(gen):
    ps, gs, ms, vs, ss = make_state([(64, 3)], torch.float32, gen)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    hyper = make_hyper(1)
    r = clone_all(ps, gs, ms, vs, ss)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps, gs, ms, vs, ss, hyper):
        _ops().fused_adamw_(ps, gs, ms, vs, ss, hyper)

    step(ps, gs, ms, vs, ss, hyper)
    _ops().fused_adamw_(*r, hyper)
    assert torch.equal(ps[0], r[0][0])


@needs_triton_device
@pytest.mark.parametrize("native", [True, False])
def test_errors_write_nothing(gen, native, monkeypatch):
    """The same errors from the native checks (lvopt._C, when built) and the Python ones."""
    from lvopt.triton import _common as C

    if not native:
        monkeypatch.setattr(C, "_native_check", lambda: None)
    elif C._native_check() is None:
        pytest.skip("lvopt._C not built")
    ps, gs, ms, vs, ss = make_state([(4, 4), (6,)], torch.float32, gen)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    h = make_hyper(2)
    bad_lr = h.clone()
    bad_lr[1, 0] = -1.0
    cases = [
        ("grads\\[1\\] has shape", (ps, [gs[0], torch.randn(7, device=DEV)], ms, vs, ss, h)),
        ("grads\\[0\\] has dtype", (ps, [gs[0].double(), gs[1]], ms, vs, ss, h)),
        ("params\\[0\\] has dtype", ([ps[0].double(), ps[1]], [gs[0].double(), gs[1]], ms, vs, ss, h)),
        ("differ in length", (ps, gs[:1], ms, vs, ss, h)),
        ("hyper must be", (ps, gs, ms, vs, ss, h.float())),
        ("lr of tensor 1", (ps, gs, ms, vs, ss, bad_lr)),
        ("strides", (ps, [gs[0].t().contiguous().t(), gs[1]], ms, vs, ss, h)),
    ]
    before = clone_all(ps, ms, vs, ss)
    for pattern, args in cases:
        with pytest.raises(RuntimeError, match=pattern):
            _ops().fused_adamw_(*args)
    for lst, old in zip((ps, ms, vs, ss), before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)


@needs_triton_device
def test_optimizer_backend_triton_matches_torch(gen):
    """lvopt.AdamW(backend="triton") end to end (on CPU tensors under the interpreter)."""
    import lvopt

    w = torch.randn(40, 30, generator=gen).to(DEV)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = lvopt.AdamW([p], lr=1e-2, weight_decay=0.1, backend="triton")
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(40, 30, generator=gen).to(DEV)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert rel_err(p.cpu(), q.cpu()) < 1e-6


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_and_found_inf(gen, dtype):
    """track=True sums and the found_inf protocol, as the CPU kernel and the reference."""
    from lvopt import reference

    ps, gs, ms, vs, ss = make_state(SHAPES, dtype, gen, steps=3)
    hyper = make_hyper(len(SHAPES), gen=gen)
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    ps, gs, ms, vs = _to((ps, gs, ms, vs), DEV)
    before = [p.clone() for p in ps]
    stats = torch.full((len(SHAPES), 2), 5.0, dtype=torch.float64, device=DEV)
    found = torch.zeros(1, device=DEV)
    _ops().fused_adamw_(ps, gs, ms, vs, ss, hyper, found, stats)
    assert float(found) == 0.0
    ref_stats = torch.empty(len(SHAPES), 2, dtype=torch.float64)
    reference.fused_adamw_(rp, rg, rm, rv, rs, hyper, None, ref_stats)
    for i, (p, b) in enumerate(zip(ps, before)):
        b64, p64 = b.cpu().double(), p.cpu().double()
        assert float(stats[i, 0]) == pytest.approx(float((b64 * b64).sum()), rel=1e-12, abs=1e-300)
        assert float(stats[i, 1]) == pytest.approx(float(((p64 - b64) ** 2).sum()), rel=1e-10, abs=1e-300)
    # A non-finite gradient: nothing written, the flag set.
    snap = clone_all(ps, ms, vs, ss)
    gs[3][100] = float("inf")
    _ops().fused_adamw_(ps, gs, ms, vs, ss, hyper, found)
    assert float(found) == 1.0
    for lst, old in zip((ps, ms, vs, ss), snap):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)
    radii = [torch.tensor(1.0, dtype=torch.float64) for _ in SHAPES]
    found.zero_()
    out = _ops().fused_adamh_(ps, gs, ms, vs, ss, radii, make_hyper(len(SHAPES), wd=0.0), found)
    assert float(found) == 1.0 and not out.any()
    for lst, old in zip((ps, ms, vs, ss), snap):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)


@needs_triton_device
def test_optimizer_track_and_skip_on_triton(gen):
    import lvopt

    p = torch.nn.Parameter(torch.randn(40, 30, generator=gen).to(DEV))
    opt = lvopt.AdamW([p], lr=1e-2, backend="triton", track=True, nonfinite="skip")
    p.grad = torch.randn(40, 30, generator=gen).to(DEV)
    before = p.detach().clone()
    opt.step()
    r = opt.telemetry.per_tensor()[0]
    assert r["dw_norm"] == pytest.approx(float((p.detach() - before).double().norm()), rel=1e-6)
    p.grad[0, 0] = float("nan")
    snap = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), snap) and opt.skipped_steps == 1
