"""Telemetry (issue 7): with track=True the kernels return per-tensor ||W|| and ||dW||, the
effective LR is ||dW||/||W|| (AdamH: the scheduled LR), aggregates per group and per role, and
the CSV / TensorBoard hooks."""

import csv

import pytest
import torch

import lvopt
from conftest import make_hyper, make_state, needs_native

BACKENDS = ["cpu", "reference"]


def _norms(before, after):
    b, a = before.double(), after.double()
    return float(b.norm()), float((a - b).norm())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_stats_match_reference(dtype, gen):
    shapes = [(70001,), (33, 65), (0,), (1,)]
    ps, gs, ms, vs, ss = make_state(shapes, dtype, gen, steps=2)
    rp, rm, rv, rs = ([t.clone() for t in lst] for lst in (ps, ms, vs, ss))
    hyper = make_hyper(len(shapes), gen=gen)
    before = [p.clone() for p in ps]
    stats = torch.full((len(shapes), 2), 7.0, dtype=torch.float64)
    ref_stats = torch.empty(len(shapes), 2, dtype=torch.float64)
    torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper, None, stats)
    lvopt.reference.fused_adamw_(rp, gs, rm, rv, rs, hyper, None, ref_stats)
    for i, (p, b) in enumerate(zip(ps, before)):
        w, dw = _norms(b, p)
        # fp32 partials of 16 squares per lane, then fp64: each partial within 16 * 2^-24 = 1e-6
        # (relative; the terms are positive), so the sum is too.
        assert stats[i, 0].item() == pytest.approx(w * w, rel=1e-6, abs=1e-300)
        assert stats[i, 1].item() == pytest.approx(dw * dw, rel=1e-6, abs=1e-300)
        # The reference steps the same values: its sums agree to fp32 rounding of the step.
        assert stats[i, 0].item() == pytest.approx(ref_stats[i, 0].item(), rel=1e-6, abs=1e-300)
        assert stats[i, 1].item() == pytest.approx(ref_stats[i, 1].item(), rel=1e-4, abs=1e-300)


@needs_native
def test_stats_do_not_change_the_step(gen):
    """track=True computes the same bits as track=False."""
    ps, gs, ms, vs, ss = make_state([(70001,), (33, 65)], torch.float32, gen, steps=2)
    qs = [[t.clone() for t in lst] for lst in (ps, ms, vs, ss)]
    hyper = make_hyper(2)
    torch.ops.lvopt.fused_adamw_(ps, gs, ms, vs, ss, hyper, None, torch.empty(2, 2, dtype=torch.float64))
    torch.ops.lvopt.fused_adamw_(qs[0], gs, qs[1], qs[2], qs[3], hyper)
    for a, b in zip(ps + ms + vs, qs[0] + qs[1] + qs[2]):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_telemetry_per_tensor_group_role(backend, gen):
    model = torch.nn.Sequential(
        torch.nn.Embedding(300, 32), torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 300)
    )
    opt = lvopt.AdamW.from_model(model, lr=1e-2, base_width=32, rule="lv", backend=backend, track=True)
    x = torch.randint(0, 300, (8, 5), generator=gen)
    for _ in range(2):
        opt.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        before = {p: p.detach().clone() for g in opt.param_groups for p in g["params"]}
        opt.step()
    tel = opt.telemetry
    assert tel.step == 2
    rows = tel.per_tensor()
    assert len(rows) == sum(len(g["params"]) for g in opt.param_groups)
    for r in rows:
        p = opt.param_groups[r["group"]]["params"][r["index"]]
        w, dw = _norms(before[p], p.detach())
        # The CPU sums are within 1e-6 (fp32 partials of 16 squares), their roots within 5e-7.
        assert r["w_norm"] == pytest.approx(w, rel=1e-6)
        assert r["dw_norm"] == pytest.approx(dw, rel=1e-6)
        assert r["eff_lr"] == pytest.approx(dw / w, rel=1e-6)
        assert r["role"] == opt.param_groups[r["group"]]["role"]
    for gi, agg in tel.per_group().items():
        ps = opt.param_groups[gi]["params"]
        w = sum(_norms(before[p], p.detach())[0] ** 2 for p in ps) ** 0.5
        dw = sum(_norms(before[p], p.detach())[1] ** 2 for p in ps) ** 0.5
        assert agg["w_norm"] == pytest.approx(w, rel=1e-6) and agg["dw_norm"] == pytest.approx(dw, rel=1e-6)
    assert set(tel.per_role()) == {g["role"] for g in opt.param_groups}


@needs_native
@pytest.mark.parametrize("backend", BACKENDS)
def test_adamh_effective_lr_is_the_scheduled_lr(backend, gen):
    mats = [
        torch.nn.Parameter(torch.randn(40, 30, generator=gen)),
        torch.nn.Parameter(torch.randn(30, 7, generator=gen)),
    ]
    vec = torch.nn.Parameter(torch.randn(30, generator=gen))
    opt = lvopt.AdamH(
        [{"params": mats}, {"params": [vec], "hyperball": False, "weight_decay": 0.1}],
        lr=0.02,
        backend=backend,
        track=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(4):
        for p in mats + [vec]:
            p.grad = torch.randn(p.shape, generator=gen)
        lr = opt.param_groups[0]["lr"]
        before = [p.detach().clone() for p in mats]
        opt.step()
        sched.step()
        rows = opt.telemetry.per_tensor()
        for r, b in zip(rows[:2], before):
            assert r["kind"] == "adamh"
            assert r["eff_lr"] == pytest.approx(lr, rel=1e-6)
            assert r["w_norm"] == pytest.approx(float(b.double().norm()), rel=1e-9)
        assert rows[2]["kind"] == "adamw"


@needs_native
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_sparse_rows_telemetry(backend, mode, gen):
    emb = torch.nn.Embedding(50, 16, sparse=True)
    opt = lvopt.AdamW([{"params": emb.parameters(), "sparse_mode": mode}], lr=1e-2, backend=backend, track=True)
    for ids in ([1, 2, 2, 9], [3, 4], [1, 40, 40, 40]):
        ids = torch.tensor(ids)
        opt.zero_grad()
        emb(ids).pow(2).sum().backward()
        rows = torch.unique(ids)
        before = emb.weight.detach()[rows].clone()
        opt.step()
        r = opt.telemetry.per_tensor()[0]
        assert r["kind"] == "sparse"
        w, dw = _norms(before, emb.weight.detach()[rows])
        assert r["w_norm"] == pytest.approx(w, rel=1e-9) and r["dw_norm"] == pytest.approx(dw, rel=1e-6)


@needs_native
def test_sparse_op_stats_opcheck(gen):
    w = torch.randn(20, 8, generator=gen)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    idx = torch.tensor([3, 1, 3])
    vals = torch.randn(3, 8, generator=gen)
    empty = torch.empty(0)
    args = (
        w,
        idx,
        vals,
        m,
        v,
        torch.tensor(0.0),
        torch.empty(0, dtype=torch.int64),
        empty,
        empty,
        make_hyper(1),
        0,
        1,
        0,
        False,
        torch.zeros(2, dtype=torch.float64),
    )
    torch.library.opcheck(torch.ops.lvopt.sparse_adamw_.default, args)


@needs_native
def test_csv_and_tensorboard_hooks(tmp_path, gen):
    p = torch.nn.Parameter(torch.randn(10, 10, generator=gen))
    opt = lvopt.AdamW([{"params": [p], "param_names": ["w"]}], lr=1e-2, track=True)
    path = tmp_path / "tel.csv"
    csv_hook = lvopt.telemetry.CSVLogger(path)
    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

    handle = opt.register_telemetry_hook(csv_hook)
    opt.register_telemetry_hook(lvopt.telemetry.TensorBoardLogger(Writer(), per_tensor=True))
    for _ in range(3):
        p.grad = torch.randn(10, 10, generator=gen)
        opt.step()
    handle.remove()
    p.grad = torch.randn(10, 10, generator=gen)
    opt.step()
    csv_hook.close()
    rows = list(csv.DictReader(open(path)))
    assert [r["step"] for r in rows if r["scope"] == "tensor"] == ["1", "2", "3"]
    assert rows[0]["key"] == "w" and float(rows[0]["eff_lr"]) > 0
    assert ("lvopt/eff_lr/tensor/w", pytest.approx(float(rows[0]["eff_lr"])), 1) in scalars
    assert max(s for _, _, s in scalars) == 4


def test_hook_needs_track():
    opt = lvopt.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="track=True"):
        opt.register_telemetry_hook(lambda o, t: None)
