"""Capturable, compilable, complete dense steps (issue 21) on the CPU and reference backends:
capturable=True accepted, tensor-valued hyperparameters read on the device (no host read per
step), the cached hyperparameter table, nonfinite="skip" decided inside the op,
torch.compile(opt.step, fullgraph=True) and a whole compiled training step equal to eager,
and amsgrad against torch.optim.AdamW(amsgrad=True). The Triton backend's versions of these run
in tests/test_triton_capturable.py (interpreter child process); the CUDA graph tests in
tests/test_cuda_capture.py (GPU only)."""

import copy

import pytest
import torch
from torch import nn

import lvopt
from _host_traffic import HostTraffic
from conftest import assert_bf16_step_close, needs_native, train_step

BACKENDS = [pytest.param("cpu", marks=needs_native), "reference"]


def _model(gen, dtype=torch.float32):
    ps = [nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in [(33, 17), (17,), (5, 4, 3), (129,)]]
    return ps


def _grads(ps, gen, bad=False):
    for i, p in enumerate(ps):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if bad and i == 2:
            p.grad.view(-1)[3] = float("nan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [lvopt.AdamW, lvopt.AdamH])
def test_capturable_accepted_same_steps(backend, cls, gen):
    ps = _model(gen)
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, weight_decay=0.0 if cls is lvopt.AdamH else 0.1, backend=backend)
    a = cls(ps, capturable=True, **kw)
    b = cls(qs, **kw)
    for _ in range(3):
        _grads(ps, gen)
        for p, q in zip(ps, qs):
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    assert a.state_dict()["state"][0]["step"].device.type == "cpu"  # CPU parameters: host step
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        cls(ps, differentiable=True, **kw)


@needs_native
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_tensor_lr_is_not_read_on_the_host(gen, nonfinite):
    """A tensor lr (and tensor betas) enters the table by device ops; the step reads nothing on
    the host. Changing the tensor between steps changes the step, as a float lr would."""
    ps = _model(gen)
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    lr = torch.tensor(1e-2, dtype=torch.float64)
    a = lvopt.AdamW(
        [{"params": ps[:2]}, {"params": ps[2:], "betas": (torch.tensor(0.8, dtype=torch.float64), 0.99)}],
        lr=lr,
        backend="cpu",
        nonfinite=nonfinite,
    )
    b = lvopt.AdamW([{"params": qs[:2]}, {"params": qs[2:], "betas": (0.8, 0.99)}], lr=1e-2, backend="cpu")
    for k in range(3):
        _grads(ps, gen)
        for p, q in zip(ps, qs):
            q.grad = p.grad.clone()
        lr.fill_(1e-2 * (k + 1))
        for g in b.param_groups:
            g["lr"] = 1e-2 * (k + 1)
        with HostTraffic() as mode:
            a.step()
        assert mode.reads == [], mode.reads
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@needs_native
def test_hyper_table_is_cached_and_rewritten_in_place(gen):
    ps = _model(gen)
    opt = lvopt.AdamW(ps, lr=1e-2, backend="cpu")
    _grads(ps, gen)
    opt.step()
    ((key, (consts, table)),) = opt._tables.items()
    opt.step()
    assert opt._tables[key][1] is table  # no new table while nothing changes
    opt.param_groups[0]["lr"] = 3e-2
    opt.step()
    assert opt._tables[key][1] is table and float(table[0, 0]) == 3e-2  # same tensor, new value


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_decided_in_the_op_counts_lazily(backend, gen):
    """nonfinite="skip" with dense gradients on one device: the op sees the flag and writes
    nothing (step counters included); skipped_steps reads the device counter when asked."""
    ps = _model(gen)
    opt = lvopt.AdamW(
        [{"params": ps[:2]}, {"params": ps[2:], "amsgrad": True}], lr=1e-2, backend=backend, nonfinite="skip"
    )
    _grads(ps, gen)
    opt.step()
    snap = copy.deepcopy(opt.state_dict()["state"])
    before = [p.detach().clone() for p in ps]
    _grads(ps, gen, bad=True)
    if backend == "cpu":
        with HostTraffic() as mode:
            opt.step()
        assert mode.reads == [], mode.reads
    else:
        opt.step()
    for p, q in zip(ps, before):
        assert torch.equal(p, q)
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, snap[i][k]), (i, k)
    assert opt.skipped_steps == 1
    opt.skipped_steps = 0
    assert opt.skipped_steps == 0
    _grads(ps, gen)
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 2.0 and opt.skipped_steps == 0


# ----- torch.compile ------------------------------------------------------------------------


def _net(gen, dtype=torch.float32):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4)).to(dtype)


def _opt(cls, params, backend, **kw):
    if cls is lvopt.AdamH:
        return cls(params, lr=1e-2, backend=backend, **kw)
    return cls(params, lr=1e-2, weight_decay=0.1, backend=backend, **kw)


@needs_native
@pytest.mark.parametrize("cls", [lvopt.AdamW, lvopt.AdamH])
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_compiled_step_fullgraph_equals_eager(cls, nonfinite, gen):
    torch._dynamo.reset()
    net = _net(gen)
    ref = copy.deepcopy(net)
    x = torch.randn(8, 12, generator=gen)
    opt = _opt(cls, net.parameters(), "cpu", nonfinite=nonfinite)
    eager = _opt(cls, ref.parameters(), "cpu", nonfinite=nonfinite)
    inductor = cls is lvopt.AdamW and nonfinite == "propagate"  # one inductor case; dynamo alone elsewhere
    step = torch.compile(opt.step, fullgraph=True, backend="inductor" if inductor else "eager")
    for k in range(3):
        for m in (net, ref):
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        if k == 1 and nonfinite == "skip":
            for m in (net, ref):
                m[0].weight.grad[0, 0] = float("nan")
        step()
        eager.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(net.parameters(), ref.parameters()):
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], eager.state[q][k]), k
    assert opt.skipped_steps == eager.skipped_steps == (1 if nonfinite == "skip" else 0)


@needs_native
@pytest.mark.parametrize("cls", [lvopt.AdamW, lvopt.AdamH])
def test_whole_compiled_training_step_equals_eager(cls, gen):
    torch._dynamo.reset()
    net = _net(gen)
    ref = copy.deepcopy(net)
    xs = [torch.randn(8, 12, generator=gen) for _ in range(3)]
    opt = _opt(cls, net.parameters(), "cpu")
    eager = _opt(cls, ref.parameters(), "cpu")

    # aot_eager: dynamo and AOTAutograd trace forward, backward and step as inductor would,
    # without its code generation (seconds on this CPU instead of tens).
    compiled = torch.compile(train_step, backend="aot_eager")
    for x in xs:
        a = compiled(net, opt, x)
        b = train_step(ref, eager, x)
        torch.testing.assert_close(a, b)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ----- amsgrad ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amsgrad_matches_torch(backend, dtype, gen):
    ps = _model(gen, dtype)
    qs = [nn.Parameter(p.detach().float().clone()) for p in ps]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True)
    a = lvopt.AdamW(ps, backend=backend, **kw)
    b = torch.optim.AdamW(qs, **kw)
    for k in range(6):
        _grads(ps, gen)
        for p, q in zip(ps, qs):
            # Shrinking gradients make v fall below its running maximum: the maximum matters.
            p.grad.mul_(0.5**k)
            q.grad = p.grad.float().clone()
        if dtype == torch.bfloat16:
            for p, q in zip(ps, qs):
                q.data.copy_(p.float())  # one step at a time from lvopt's bf16 state
        before = [p.detach().float().clone() for p in ps]
        a.step()
        b.step()
    for p, q, p0 in zip(ps, qs, before):
        if dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert_bf16_step_close(p.detach().float(), q.detach(), p0)
        sa, sb = a.state[p], b.state[q]
        assert set(sb) <= set(sa)
        torch.testing.assert_close(sa["max_exp_avg_sq"], sb["max_exp_avg_sq"], rtol=1e-5, atol=0)
        assert torch.equal(sa["max_exp_avg_sq"], torch.maximum(sa["max_exp_avg_sq"], sa["exp_avg_sq"]))
    # Checkpoints move both ways, max_exp_avg_sq included.
    c = torch.optim.AdamW([nn.Parameter(p.detach().float().clone()) for p in ps], **kw)
    c.load_state_dict(a.state_dict())
    d = lvopt.AdamW([nn.Parameter(p.detach().clone()) for p in ps], backend=backend, **kw)
    d.load_state_dict(b.state_dict())
    assert torch.equal(d.state_dict()["state"][0]["max_exp_avg_sq"], b.state_dict()["state"][0]["max_exp_avg_sq"])


def test_amsgrad_errors(gen):
    w = nn.Parameter(torch.randn(4, 4, generator=gen))
    with pytest.raises(ValueError, match="amsgrad=True given to a hyperball group"):
        lvopt.AdamH([w], amsgrad=True)
    lvopt.AdamH([w], amsgrad=True, hyperball=False)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = lvopt.AdamW(emb.parameters(), amsgrad=True, backend="reference")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="amsgrad=True with a row-sparse gradient"):
        opt.step()


# ----- torch's own AdamW test matrix ---------------------------------------------------------

# Error inputs of torch's OptimizerInfo for AdamW that do not apply to lvopt.AdamW, and why.
NOT_APPLICABLE = {
    "lr as Tensor doesn't work with foreach & not capturable": "lvopt ignores foreach (it always fuses) and every step takes a tensor lr (device table)",
    "betas must be either both floats or both Tensors": "lvopt writes each beta into the hyperparameter table on its own: a float and a tensor mix",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True": "lvopt ignores foreach; tensor betas are supported on every backend",
}
# Applicable error inputs whose message lvopt words its own way (same exception type; the
# message names the hyperparameter and the value): checked for the type and the name.
OWN_WORDING = {
    "Tensor lr must be 1-element": "lr must be a number or a one-element tensor",
    "beta1 should be between 0 and 1": "invalid beta parameter at index 0: 1.0",
    "weight_decay should > 0": "invalid weight_decay value -1",
}


def _adamw_info():
    pytest.importorskip("expecttest")  # torch.testing._internal needs it (requirements-dev.txt)
    from torch.testing._internal.common_optimizers import optim_db

    return next(o for o in optim_db if o.optim_cls is torch.optim.AdamW)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_adamw_matrix_configurations(backend, gen):
    """Every configuration torch tests AdamW with (OptimizerInfo.optim_inputs_func: default, lr,
    weight_decay, maximize, amsgrad), each also with capturable=True, against torch.optim.AdamW."""
    info = _adamw_info()
    inputs = info.optim_inputs_func(device="cpu", dtype=torch.float32)
    assert {oi.desc for oi in inputs} >= {"default", "amsgrad", "maximize"}
    for oi in inputs:
        for capturable in (False, True):
            kw = dict(oi.kwargs, capturable=capturable)
            ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(9, 5), (5,)]]
            qs = [nn.Parameter(p.detach().clone()) for p in ps]
            a = lvopt.AdamW(ps, backend=backend, **kw)
            b = torch.optim.AdamW(qs, **{k: v for k, v in kw.items() if k != "capturable"})
            for k in range(4):
                for p, q in zip(ps, qs):
                    p.grad = torch.randn(p.shape, generator=gen) * 0.5**k
                    q.grad = p.grad.clone()
                a.step()
                b.step()
            for p, q in zip(ps, qs):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{oi.desc}, capturable={capturable}")
            assert set(b.state_dict()["state"][0]) == set(a.state_dict()["state"][0]), oi.desc


def test_torch_adamw_matrix_error_inputs():
    """torch's bad inputs for AdamW (OptimizerInfo.optim_error_inputs_func), each raised (or
    warned) by lvopt.AdamW with the same exception type, except those in NOT_APPLICABLE."""
    import re
    import warnings

    from torch.testing._internal.common_optimizers import OptimizerErrorEnum

    info = _adamw_info()
    seen = set()
    for ei in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        inp = ei.optimizer_error_input
        seen.add(inp.desc)
        if inp.desc in NOT_APPLICABLE:
            lvopt.AdamW([nn.Parameter(torch.randn(3))], **inp.kwargs)  # accepted
            continue
        assert ei.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR, inp.desc
        params = inp.params if inp.params is not None else [nn.Parameter(torch.randn(3))]
        regex = OWN_WORDING.get(inp.desc, ei.error_regex)
        if issubclass(ei.error_type, Warning):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                lvopt.AdamW(params, **inp.kwargs)
            assert any(issubclass(x.category, ei.error_type) and re.search(regex, str(x.message)) for x in w), inp.desc
        else:
            with pytest.raises(ei.error_type, match=regex):
                lvopt.AdamW(params, **inp.kwargs)
    assert set(NOT_APPLICABLE) <= seen and set(OWN_WORDING) <= seen  # the lists name real entries


@needs_native
def test_compiled_step_with_a_sparse_group(gen):
    """A row-sparse group does not compile into one graph: dynamo cannot wrap a sparse COO
    gradient (torch.compile's limitation, docs/capturable.md), so fullgraph=True raises; without
    fullgraph the step graph-breaks there and equals eager."""
    torch._dynamo.reset()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    emb, lin = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3)
    emb2, lin2 = copy.deepcopy(emb), copy.deepcopy(lin)

    def make(e, l):
        return lvopt.AdamW([{"params": e.parameters()}, {"params": l.parameters()}], lr=1e-2, backend="cpu")

    opt, eager = make(emb, lin), make(emb2, lin2)
    ids = [torch.randint(0, 50, (6,), generator=gen) for _ in range(3)]
    for e, l in ((emb, lin), (emb2, lin2)):
        l(e(ids[0])).sum().backward()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="sparse"):
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    step = torch.compile(opt.step, backend="eager")
    for k, x in enumerate(ids):
        if k:
            for o, e, l in ((opt, emb, lin), (eager, emb2, lin2)):
                o.zero_grad(set_to_none=True)
                l(e(x)).sum().backward()
        step()
        eager.step()
    for p, q in zip(list(emb.parameters()) + list(lin.parameters()), list(emb2.parameters()) + list(lin2.parameters())):
        assert torch.equal(p, q)
