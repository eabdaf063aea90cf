"""Hypothesis fuzzing of the dense optimizer step: shapes (zero-size included), dtypes (supported
and not), strides (transposed and sliced parameters, non-contiguous gradients), mixed groups
and hyperparameter values (negative, out of range, zero, NaN, inf, tensor-valued lr).

Every case either raises a clear error -- ValueError/TypeError/RuntimeError whose message names
the hyperparameter or the parameter at fault -- with parameters and optimizer state (step
counts included) untouched and no state created, or it matches the same optimizer on
backend="reference" within fp32 rounding. Whether a case is valid is decided here, from the
rules of torch.optim.AdamW and docs/design.md (lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0,
all finite; no weight decay in hyperball groups; float32/bfloat16 parameters with gradients of
the same dtype), not by asking lvopt.

Examples are derandomized (the same on every run; a failure prints its example and a
reproduce blob) and bounded so the file runs in well under a minute on 2 cores.
"""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import lvopt
from conftest import needs_native

SUPPORTED = (torch.float32, torch.bfloat16)
FUZZ = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The message must name what is wrong (lvopt/optim.py words these; torch uses the same words).
PATTERNS = {
    "lr": r"\blr\b|learning rate",
    "betas": r"beta",
    "eps": r"\beps|epsilon",
    "weight_decay": r"weight_decay",
    "dtype": r"dtype",
}

BAD_LR = [-1e-3, -1.0, math.nan, math.inf, -math.inf]
BAD_BETA = [1.0, -0.1, 1.5, math.nan, math.inf]
BAD_EPS = [0.0, -1e-8, math.nan, math.inf]
BAD_WD = [-0.1, math.nan, math.inf]


def rare(draw, n: int) -> bool:
    """True about once in ``n`` draws. (Hypothesis favours the low end of st.integers and the
    first element of st.sampled_from, so the rare choice goes last.)"""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


@st.composite
def hyper(draw, adamh: bool):
    """One group's hyperparameters; each is out of range about 1 time in 12."""

    def pick(good, bad):
        return draw(st.sampled_from(bad)) if rare(draw, 12) else draw(good)

    h = dict(
        lr=pick(st.one_of(st.sampled_from([0.0, 1e-3, 1e-2]), st.floats(1e-5, 0.1)), BAD_LR),
        betas=(pick(st.floats(0.0, 0.99), BAD_BETA), pick(st.floats(0.0, 0.9999), BAD_BETA)),
        eps=pick(st.one_of(st.just(1e-8), st.floats(1e-10, 1e-3)), BAD_EPS),
        weight_decay=pick(st.one_of(st.sampled_from([0.0, 0.1]), st.floats(0.0, 0.5)), BAD_WD),
        maximize=draw(st.booleans()),
    )
    if rare(draw, 5):
        h["lr"] = torch.tensor(h["lr"])  # tensor-valued lr (capturable schedules) is accepted
    if adamh:
        h["hyperball"] = draw(st.booleans())
        if h["hyperball"] and not rare(draw, 4):
            h["weight_decay"] = 0.0  # mostly valid hyperball groups
    return h


@st.composite
def param_spec(draw):
    big = rare(draw, 20)
    shape = [65536 + 3] if big else draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    # unsupported dtypes (fp16, fp64) and mismatched gradient dtypes 1 time in 20 each, so that
    # about half of the cases with up to 9 parameters step
    dtype = draw(st.sampled_from([torch.float32] * 19 + [torch.bfloat16] * 19 + [torch.float16, torch.float64]))
    grad = "wrong_dtype" if rare(draw, 20) else draw(st.sampled_from(["contiguous", "strided", "strided", "none"]))
    return dict(
        shape=tuple(shape),
        dtype=dtype,
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        grad=grad,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def case(draw):
    adamh = draw(st.booleans())
    ngroups = draw(st.integers(1, 3))
    groups = [
        dict(hyper=draw(hyper(adamh)), params=draw(st.lists(param_spec(), min_size=1, max_size=3)))
        for _ in range(ngroups)
    ]
    return dict(adamh=adamh, groups=groups, warmup=draw(st.integers(0, 2)), via_constructor=draw(st.booleans()))


def _strided(shape, dtype, layout, gen):
    """A random (never zero) tensor of ``shape`` laid out as asked: contiguous, transposed
    (dense, all dimensions reversed) or sliced (every other element of its last dimension: not
    dense, so stepped through a contiguous copy)."""
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(shape[::-1], generator=gen).to(dtype).permute(*reversed(range(len(shape))))
    if layout == "sliced" and len(shape) >= 1:
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)[..., ::2]
    return torch.randn(shape, generator=gen).to(dtype)


def _make_params(spec_groups):
    """The parameters of every group (same values and strides on every call)."""
    out = []
    for grp in spec_groups:
        ps = []
        for s in grp["params"]:
            gen = torch.Generator().manual_seed(s["seed"])
            ps.append(nn.Parameter(_strided(s["shape"], s["dtype"], s["layout"], gen)))
        out.append(ps)
    return out


def _grad(p, s, gen):
    kind = s["grad"]
    if kind == "none":
        return None
    dtype = torch.float64 if kind == "wrong_dtype" and p.dtype != torch.float64 else p.dtype
    if kind == "wrong_dtype" and p.dtype == torch.float64:
        dtype = torch.float32
    return _strided(tuple(p.shape), dtype, "sliced" if kind == "strided" else "contiguous", gen)


def _set_grad(p, g):
    if g is None:
        p.grad = None
    elif g.dtype != p.dtype:
        p.grad = torch.zeros_like(p)
        p.grad.data = g  # torch refuses `p.grad = g` for another dtype; lvopt must refuse it too
    else:
        p.grad = g.clone() if g.is_contiguous() else g  # keep the non-contiguous strides


def _hyper_faults(h, adamh):
    faults = []
    lr = float(h["lr"])
    if not (math.isfinite(lr) and lr >= 0):
        faults.append("lr")
    if not all(0.0 <= b < 1.0 for b in h["betas"]):
        faults.append("betas")
    if not (math.isfinite(h["eps"]) and h["eps"] > 0):
        faults.append("eps")
    wd = h["weight_decay"]
    if not (math.isfinite(wd) and wd >= 0) or (adamh and h.get("hyperball") and wd != 0.0):
        faults.append("weight_decay")
    return faults


def _build(c, params, backend=None):
    cls = lvopt.AdamH if c["adamh"] else lvopt.AdamW
    groups = []
    for grp, ps in zip(c["groups"], params):
        g = dict(params=ps)
        if c["via_constructor"]:
            g.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in grp["hyper"].items()})
        elif c["adamh"]:
            g["hyperball"] = grp["hyper"]["hyperball"]
        groups.append(g)
    return cls(groups, lr=1e-3, weight_decay=0.0, backend=backend)


def _set_hyper(opt, c):
    for group, grp in zip(opt.param_groups, c["groups"]):
        group.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in grp["hyper"].items()})


def _snapshot(opt, params):
    ps = [p.detach().clone() for grp in params for p in grp]
    strides = [p.stride() for grp in params for p in grp]
    states = {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
        for grp in params
        for p in grp
        if p in opt.state
    }
    return ps, strides, states


def _assert_unchanged(opt, params, snap):
    ps, strides, states = snap
    flat = [p for grp in params for p in grp]
    for p, before, stride in zip(flat, ps, strides):
        assert p.dtype == before.dtype and p.stride() == stride
        assert torch.equal(p.detach(), before)
    assert {id(p) for p in flat if p in opt.state and opt.state[p]} == set(states), "state was created"
    for p in flat:
        for k, v in states.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v), k


def _close(a, b, what):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if a.numel() == 0:
        return
    a64, b64 = a.double(), b.double()
    scale = float(b64.abs().max())
    tol = 1e-5 * scale + 1e-30
    if a.dtype == torch.bfloat16:
        # Same fp32 math rounded once to bf16: a few bf16 ulps (2**-8 relative) per element.
        ok = (a64 - b64).abs() <= 3 * 2.0**-7 * b64.abs() + tol
    else:
        ok = (a64 - b64).abs() <= tol
    assert bool(ok.all()), f"{what}: max difference {float((a64 - b64).abs().max()):.3e} (scale {scale:.3e})"


@needs_native
@FUZZ
@given(case())
def test_step_raises_clearly_or_matches_reference(c):
    faults = [f for grp in c["groups"] for f in _hyper_faults(grp["hyper"], c["adamh"])]
    params = _make_params(c["groups"])
    if c["via_constructor"] and faults:
        # add_param_group checks every group: refused at construction, naming the hyperparameter.
        event("refused by the constructor")
        with pytest.raises(ValueError, match="|".join(PATTERNS[f] for f in faults)):
            _build(c, params)
        return
    opt = _build(c, params)
    ref_params = _make_params(c["groups"])
    ref = _build(c, ref_params, backend="reference")

    # Warm-up steps with valid hyperparameters, so that moments and step counts exist.
    gen = torch.Generator().manual_seed(c["groups"][0]["params"][0]["seed"] + 1)
    saved = [dict(g) for g in opt.param_groups]
    for o in (opt, ref):
        for g in o.param_groups:
            g.update(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(c["warmup"]):
        for p, q in zip((p for grp in params for p in grp), (q for grp in ref_params for q in grp)):
            g = torch.randn(p.shape, generator=gen).to(p.dtype) if p.dtype in SUPPORTED else None
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step(), ref.step()
    for o in (opt, ref):
        for g, s in zip(o.param_groups, saved):
            g.update({k: s[k] for k in ("lr", "betas", "eps", "weight_decay")})
    if not c["via_constructor"]:
        _set_hyper(opt, c), _set_hyper(ref, c)

    # The fuzzed step.
    param_faults = []
    for grp, ps, qs in zip(c["groups"], params, ref_params):
        for s, p, q in zip(grp["params"], ps, qs):
            g = _grad(p, s, torch.Generator().manual_seed(s["seed"] + 2))
            _set_grad(p, g)
            _set_grad(q, None if g is None else g.clone())
            if g is not None and (p.dtype not in SUPPORTED or g.dtype != p.dtype):
                param_faults.append("dtype")
    faults += param_faults
    if faults:
        event(f"refused by step: {sorted(set(faults))}")
        snap = _snapshot(opt, params)
        with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
            opt.step()
        msg = str(err.value)
        assert any(re.search(PATTERNS[f], msg) for f in faults), (faults, msg)
        assert "group" in msg, msg  # says where
        if set(faults) == {"dtype"}:
            assert re.search(r"param \d+ .*of group \d+", msg), msg
        _assert_unchanged(opt, params, snap)
        return

    event("stepped and matched the reference")
    shapes = [p.shape for grp in params for p in grp]
    event(f"zero-size parameter: {any(0 in s for s in shapes)}")
    untouched = [(p, p.detach().clone(), p in opt.state) for grp in params for p in grp if p.grad is None]
    opt.step()
    ref.step()
    for (gi, ps), qs in zip(enumerate(params), ref_params):
        for pi, (p, q) in enumerate(zip(ps, qs)):
            where = f"group {gi} param {pi} {tuple(p.shape)} {p.dtype} stride {p.stride()}"
            assert p.stride() == q.stride(), where
            _close(p, q, where)
            assert (p in opt.state) == (q in ref.state), where
            if q in ref.state:
                sa, sb = opt.state[p], ref.state[q]
                assert set(sa) == set(sb), where
                assert float(sa["step"]) == float(sb["step"]), where
                for k in ("exp_avg", "exp_avg_sq"):
                    _close(sa[k].reshape(q.shape), sb[k].reshape(q.shape), f"{where} {k}")
                if "radius" in sb:
                    assert float(sa["radius"]) == float(sb["radius"]), where
    for p, before, had_state in untouched:
        assert torch.equal(p.detach(), before)
        assert (p in opt.state and bool(opt.state[p])) == had_state
