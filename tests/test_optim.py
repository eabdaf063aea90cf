"""lvopt.AdamW / lvopt.AdamH as torch.optim optimizers: parity with torch.optim.AdamW and the
reference, checkpoints both ways, schedulers, errors that write nothing, backend selection."""

import io
import math

import pytest
import torch
from torch import nn

import lvopt
from conftest import needs_native, rel_err


class TinyLM(nn.Module):
    def __init__(self, vocab=97, d=32, heads=4, layers=2, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.to(dtype)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))

    def groups(self, lrs=(3e-3, 1e-3, 2e-3, 5e-4), wds=(0.0, 0.1, 0.0, 0.05)):
        emb, mats, vecs = [self.emb.weight], [], []
        for n, p in self.blocks.named_parameters():
            (mats if p.dim() >= 2 else vecs).append(p)
        vecs += list(self.norm.parameters())
        return [
            dict(params=ps, lr=lr, weight_decay=wd)
            for ps, lr, wd in zip((emb, mats, vecs, [self.head.weight]), lrs, wds)
        ]


def _train_pair(a, oa, b=None, ob=None, steps=1, seed=0, sa=None, sb=None):
    """Trains ``a``; ``b``, if given, gets the same gradients, so that the two optimizers see
    identical inputs at every step and what differs is their own rounding. (Two independent
    runs of a network drift apart from any rounding difference, whatever the optimizer.)"""
    g = torch.Generator().manual_seed(seed)
    pairs = [(oa, sa, None)] + ([(ob, sb, b)] if b is not None else [])
    for _ in range(steps):
        x = torch.randint(0, 97, (4, 16), generator=g)
        loss = nn.functional.cross_entropy(a(x).flatten(0, 1).float(), torch.roll(x, -1, 1).flatten())
        for opt, _, _ in pairs:
            opt.zero_grad()
        loss.backward()
        if b is not None:
            for p, q in zip(a.parameters(), b.parameters()):
                q.grad = p.grad.clone()
        for opt, sched, _ in pairs:
            opt.step()
            if sched is not None:
                sched.step()


def _cosine(opt, steps, warmup=10):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def _max_rel(m1, m2):
    return max(rel_err(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@needs_native
def test_adamw_parity_with_torch_200_steps():
    torch.manual_seed(0)
    a = TinyLM()
    b = TinyLM()
    b.load_state_dict(a.state_dict())
    oa = lvopt.AdamW(a.groups())
    ob = torch.optim.AdamW(b.groups())
    _train_pair(a, oa, b, ob, steps=200, sa=_cosine(oa, 200), sb=_cosine(ob, 200))
    assert oa.param_groups[1]["lr"] == ob.param_groups[1]["lr"]
    err = _max_rel(a, b)
    print(f"max relative parameter difference after 200 steps: {err:.3e}")
    assert err <= 1e-5


@needs_native
def test_adamh_parity_with_reference_200_steps():
    torch.manual_seed(1)
    a, b = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())

    def groups(m):
        gs = m.groups(wds=(0.0, 0.0, 0.0, 0.0))
        for g, hb in zip(gs, (False, True, True, False)):
            g["hyperball"] = hb
        gs[0]["weight_decay"] = 0.1  # AdamW group (hyperball=False) keeps its decay
        return gs

    oa = lvopt.AdamH(groups(a), lr=1e-2)
    ob = lvopt.AdamH(groups(b), lr=1e-2, backend="reference")
    _train_pair(a, oa, b, ob, steps=200, sa=_cosine(oa, 200), sb=_cosine(ob, 200))
    err = _max_rel(a, b)
    print(f"AdamH vs reference after 200 steps: {err:.3e}")
    assert err <= 1e-5
    w = a.blocks[0].linear1.weight
    assert abs(float(w.detach().double().norm()) / float(oa.state[w]["radius"]) - 1) < 1e-5
    assert "radius" not in oa.state[a.emb.weight] and "radius" not in oa.state[a.blocks[0].norm1.weight]


@needs_native
def test_bf16_error_within_2x_torch_bf16():
    """Against fp64 AdamW on the same gradients: lvopt's bf16 (fp32 moments) error is at most
    2x torch's own bf16 AdamW error."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(256, 64, generator=g).bfloat16()
    p16 = nn.Parameter(w0.clone())
    t16 = nn.Parameter(w0.clone())
    p64 = nn.Parameter(w0.double())
    kw = dict(lr=1e-3, weight_decay=0.1)
    ol, ot, o64 = lvopt.AdamW([p16], **kw), torch.optim.AdamW([t16], **kw), torch.optim.AdamW([p64], **kw)
    for _ in range(100):
        grad = torch.randn(256, 64, generator=g).bfloat16()
        p16.grad, t16.grad, p64.grad = grad.clone(), grad.clone(), grad.double()
        ol.step(), ot.step(), o64.step()
    err_l = float((p16.double() - p64).norm() / p64.norm())
    err_t = float((t16.double() - p64).norm() / p64.norm())
    print(f"bf16 error vs fp64: lvopt {err_l:.3e}, torch {err_t:.3e}")
    assert err_l <= 2 * err_t
    assert ol.state[p16]["exp_avg"].dtype == torch.float32


@needs_native
@pytest.mark.parametrize("direction", ["torch_to_lvopt", "lvopt_to_torch"])
def test_checkpoints_move_both_ways(direction):
    torch.manual_seed(2)
    a, b = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())
    first, second = (
        (torch.optim.AdamW, lvopt.AdamW) if direction == "torch_to_lvopt" else (lvopt.AdamW, torch.optim.AdamW)
    )
    oa = first(a.groups())
    _train_pair(a, oa, steps=20)
    b.load_state_dict(a.state_dict())
    ob = second(b.groups())
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    ob.load_state_dict(torch.load(buf))
    assert ob.param_groups[1]["decoupled_weight_decay"] is True
    _train_pair(a, oa, b, ob, steps=20, seed=1)
    assert _max_rel(a, b) <= 1e-5
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert key in ob.state[b.head.weight]


@needs_native
def test_in_memory_state_dict_is_not_shared():
    p = nn.Parameter(torch.randn(8))
    q = nn.Parameter(p.detach().clone())
    oa, ob = lvopt.AdamW([p]), lvopt.AdamW([q])
    p.grad = torch.randn(8)
    oa.step()
    with torch.no_grad():
        q.copy_(p)
    ob.load_state_dict(oa.state_dict())
    for key, value in oa.state[p].items():
        assert ob.state[q][key].data_ptr() != value.data_ptr(), key
    q.grad = p.grad.clone()
    oa.step(), ob.step()
    assert float(oa.state[p]["step"]) == float(ob.state[q]["step"]) == 2.0
    assert torch.equal(p, q)


@needs_native
def test_bf16_checkpoint_keeps_fp32_moments():
    p = nn.Parameter(torch.randn(40, 8).bfloat16())
    opt = lvopt.AdamW([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    q = nn.Parameter(p.detach().clone())
    opt2 = lvopt.AdamW([q])
    opt2.load_state_dict(sd)
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    # and a torch bf16 checkpoint (bf16 moments) is widened
    t = nn.Parameter(p.detach().clone())
    ot = torch.optim.AdamW([t])
    t.grad = torch.randn_like(t)
    ot.step()
    opt3 = lvopt.AdamW([nn.Parameter(t.detach().clone())])
    opt3.load_state_dict(ot.state_dict())
    st = next(iter(opt3.state.values()))
    assert st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], ot.state[t]["exp_avg"].float())


@needs_native
def test_maximize_closure_and_noncontiguous_params():
    torch.manual_seed(4)
    base = torch.randn(30, 20)
    a = nn.Parameter(base.clone().t())  # dense, transposed strides
    b = nn.Parameter(base.clone().t())
    big_a, big_b = torch.randn(10, 12), None
    big_b = big_a.clone()
    sa = nn.Parameter(big_a[:, ::2])  # not dense: stepped through a contiguous copy
    sb = nn.Parameter(big_b[:, ::2])
    oa = lvopt.AdamW([a, sa], lr=1e-2, maximize=True)
    ob = torch.optim.AdamW([b, sb], lr=1e-2, maximize=True)
    for _ in range(5):
        gs = [torch.randn(20, 30), torch.randn(10, 6)]

        def closure(params, grads=gs):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            return torch.tensor(1.0)

        assert float(oa.step(lambda: closure([a, sa]))) == 1.0
        ob.step(lambda: closure([b, sb]))
    assert rel_err(a, b) < 1e-6 and rel_err(sa, sb) < 1e-6
    assert a.stride() == (1, 20)


@needs_native
def test_lr_as_tensor_and_scheduler_changes_nothing_else():
    p = nn.Parameter(torch.randn(10))
    q = nn.Parameter(p.detach().clone())
    oa = lvopt.AdamW([p], lr=torch.tensor(0.01))
    ob = torch.optim.AdamW([q], lr=torch.tensor(0.01))
    sa = torch.optim.lr_scheduler.StepLR(oa, 2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 2, gamma=0.5)
    for _ in range(6):
        g = torch.randn(10)
        p.grad, q.grad = g.clone(), g.clone()
        oa.step(), ob.step(), sa.step(), sb.step()
    assert rel_err(p, q) < 1e-6


def _bad_optimizer_cases():
    def base(dtype=torch.float32):
        p = nn.Parameter(torch.randn(6, 4, dtype=dtype))
        q = nn.Parameter(torch.randn(5, dtype=dtype))
        return p, q

    p, q = base()
    yield "gradient shape", lvopt.AdamW([p, q]), [p, q], [torch.randn(6, 4), torch.randn(4)]
    p, q = base()
    yield "gradient dtype", lvopt.AdamW([p, q]), [p, q], [torch.randn(6, 4), torch.randn(5).double()]
    p, q = base(torch.float16)
    # (no first good step is possible here: the dtype is refused from the start)
    yield (
        "unsupported dtype torch.float16",
        lvopt.AdamW([p, q]),
        [p, q],
        [torch.randn(6, 4).half(), torch.randn(5).half()],
    )
    p, q = base()
    yield "sparse", lvopt.AdamW([p, q]), [p, q], [torch.randn(6, 4), torch.randn(5).to_sparse()]
    p, q = base()
    opt = lvopt.AdamW([{"params": [p]}, {"params": [q]}])
    opt.param_groups[1]["lr"] = float("nan")
    yield "group 1: invalid learning rate", opt, [p, q], [torch.randn(6, 4), torch.randn(5)]
    p, q = base()
    opt = lvopt.AdamW([{"params": [p]}, {"params": [q]}])
    opt.param_groups[1]["betas"] = (0.9, 1.0)
    yield "beta parameter at index 1", opt, [p, q], [torch.randn(6, 4), torch.randn(5)]
    p, q = base()
    opt = lvopt.AdamH([{"params": [p]}, {"params": [q]}])
    opt.param_groups[0]["weight_decay"] = 0.1
    yield "given to a hyperball group", opt, [p, q], [torch.randn(6, 4), torch.randn(5)]


@needs_native
def test_step_errors_name_the_parameter_and_change_nothing():
    for pattern, opt, params, grads in _bad_optimizer_cases():
        # a first good step so that states and step counts exist
        for p in params:
            p.grad = torch.randn_like(p)
        if params[0].dtype != torch.float16:
            saved = [dict(g) for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"], g["betas"], g["weight_decay"] = 1e-3, (0.9, 0.999), 0.0
            opt.step()
            for g, s in zip(opt.param_groups, saved):
                g.update({k: s[k] for k in ("lr", "betas", "weight_decay")})
            assert all(len(opt.state[p]) >= 3 for p in params)
        before = [p.detach().clone() for p in params]
        states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
        for p, g in zip(params, grads):
            if g.layout == torch.strided:
                p.grad.data = g  # torch refuses `p.grad = g` for a wrong shape or dtype
            else:
                p.grad = g
        with pytest.raises((ValueError, TypeError), match=pattern):
            opt.step()
        for p, b in zip(params, before):
            assert torch.equal(p.detach(), b)
            for k, v in states[id(p)].items():
                assert torch.equal(opt.state[p][k], v), (pattern, k)


def test_constructor_errors():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="learning rate"):
        lvopt.AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        lvopt.AdamW([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="epsilon"):
        lvopt.AdamW([p], eps=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        lvopt.AdamW([p], eps=float("inf"))
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        lvopt.AdamW([p], differentiable=True)
    with pytest.raises(ValueError, match="hyperball group"):
        lvopt.AdamH([p], weight_decay=0.1)
    lvopt.AdamH([p], weight_decay=0.1, hyperball=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        lvopt.AdamW([p], backend="gpu")
    from lvopt import _backend

    if _backend.unavailable_reason("triton") is not None:  # no GPU and no TRITON_INTERPRET=1
        with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
            lvopt.AdamW([p], backend="triton")
    if not lvopt.build_info()["cuda"]:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            lvopt.AdamW([p], backend="cuda")


def test_reference_backend_matches_torch():
    p = nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    q = nn.Parameter(p.detach().clone())
    oa = lvopt.AdamW([p], lr=1e-2, backend="reference")
    ob = torch.optim.AdamW([q], lr=1e-2)
    for _ in range(10):
        g = torch.randn(7, 5, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        oa.step(), ob.step()
    assert rel_err(p, q) < 1e-12


@needs_native
def test_adamh_vectors_and_plain_groups_take_adamw():
    torch.manual_seed(5)
    w, b, e = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(20, 6))
    b2, e2 = nn.Parameter(b.detach().clone()), nn.Parameter(e.detach().clone())
    oh = lvopt.AdamH([{"params": [w, b]}, {"params": [e], "hyperball": False, "weight_decay": 0.1}], lr=1e-2)
    ow = lvopt.AdamW([{"params": [b2], "weight_decay": 0.0}, {"params": [e2], "weight_decay": 0.1}], lr=1e-2)
    r0 = float(w.detach().double().norm())
    for _ in range(5):
        for p, q in ((b, b2), (e, e2)):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        w.grad = torch.randn_like(w)
        prev = w.detach().clone()
        oh.step(), ow.step()
        # effective LR: ||dW||/||W|| = lr to first order
        # ||dW||/||W|| = lr * |sin| of the angle between u and W, up to O(lr^2): within 10%
        assert abs(float((w.detach() - prev).norm() / prev.norm()) - 1e-2) < 1e-3
    assert torch.equal(b, b2) and torch.equal(e, e2)
    assert abs(float(oh.state[w]["radius"]) - r0) < 1e-9


def test_build_info_reports_backends():
    info = lvopt.build_info()
    assert set(info["backends"]) == set(lvopt.BACKENDS)
    assert info["backends"]["reference"] == "available"
    if info["native"]:
        assert info["cpu_isa_active"] in info["cpu_isa_compiled"]
