"""load_state_dict validates a checkpoint before it changes anything (lvopt/checkpoint.py,
docs/checkpoints.md).

Each invalid case corrupts one thing of a real checkpoint (an optimizer that has stepped a
small model with dense, exact-sparse and lazy-sparse groups) and loads it into another
optimizer that has stepped too: the load must raise lvopt.CheckpointError naming the
parameter, the key and the problem, and the target's state, param_groups and parameters must
be bit for bit what they were. Valid checkpoints (lvopt's own, AdamW and AdamH, dense and
sparse groups, through torch.save and torch.load(weights_only=True); torch.optim.AdamW's, both
ways) still load.
"""

import copy
import io
import math

import pytest
import torch
from torch import nn

import lvopt
from conftest import needs_native

pytestmark = needs_native

V, D = 40, 8


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(V, D, sparse=True)  # exact sparse group
        self.emb2 = nn.Embedding(V, D, sparse=True)  # lazy sparse group
        self.fc = nn.Linear(D, 6)
        self.out = nn.Linear(6, 3)
        self.to(dtype)

    def forward(self, ids):
        return self.out(torch.tanh(self.fc(self.emb(ids) + self.emb2(ids))))


def build(kind: str, seed: int, steps: int = 3, dtype=torch.float32):
    """A model and an optimizer of ``kind`` ("adamw" or "adamh") that has taken ``steps`` steps
    (named groups: errors name the parameters)."""
    torch.manual_seed(seed)
    m = Net(dtype)
    named = dict(m.named_parameters())
    mats = [(n, named[n]) for n in ("fc.weight", "out.weight")]
    vecs = [(n, named[n]) for n in ("fc.bias", "out.bias")]
    if kind == "adamh":
        opt = lvopt.AdamH(
            [
                dict(params=mats),
                dict(params=vecs, lr=2e-3),
                dict(params=[("emb.weight", m.emb.weight)], hyperball=False, weight_decay=0.1),
                dict(params=[("emb2.weight", m.emb2.weight)], hyperball=False, sparse_mode="lazy"),
            ],
            lr=1e-2,
        )
    else:
        opt = lvopt.AdamW(
            [
                dict(params=mats, weight_decay=0.1),
                dict(params=vecs, weight_decay=0.0),
                dict(params=[("emb.weight", m.emb.weight)]),
                dict(params=[("emb2.weight", m.emb2.weight)], sparse_mode="lazy"),
            ],
            lr=1e-2,
        )
    train(m, opt, steps, seed)
    return m, opt


def train(m, opt, steps, seed):
    """``steps`` steps on random batches of ids drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, V, (4, 5), generator=g)
        opt.zero_grad()
        m(ids).float().square().mean().backward()
        opt.step()


def checkpoint(kind="adamw", **kw):
    """A deep copy of a stepped optimizer's state_dict, free to corrupt."""
    return copy.deepcopy(build(kind, seed=0, **kw)[1].state_dict())


def pid(sd, name):
    """The checkpoint's state key of the parameter called ``name``."""
    for g in sd["param_groups"]:
        if name in g["param_names"]:
            return g["params"][g["param_names"].index(name)]
    raise KeyError(name)


def snapshot(m, opt):
    """Everything load_state_dict could change, as plain values and byte strings."""

    def val(x):
        if torch.is_tensor(x):
            return (
                x.dtype,
                tuple(x.shape),
                x.device,
                x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
            )
        return copy.deepcopy(x)

    state = {}
    for p, st in opt.state.items():
        state[id(p)] = {k: (val(v) if torch.is_tensor(v) else ("obj", id(v))) for k, v in st.items()}
    groups = [{k: ([id(p) for p in v] if k == "params" else val(v)) for k, v in g.items()} for g in opt.param_groups]
    params = {n: val(p) for n, p in m.named_parameters()}
    return state, groups, params, [id(t) for st in opt.state.values() for t in st.values()]


def assert_refused(sd, kind="adamw", *expected):
    """Loading ``sd`` into a stepped optimizer raises CheckpointError whose message contains
    every string of ``expected``; the optimizer and the model are bit for bit as before."""
    m, opt = build(kind, seed=1)
    before = snapshot(m, opt)
    with pytest.raises(lvopt.CheckpointError) as info:
        opt.load_state_dict(sd)
    msg = str(info.value)
    for e in expected:
        assert e in msg, f"{e!r} not in:\n{msg}"
    assert snapshot(m, opt) == before
    return info.value


# -- the parameter state ------------------------------------------------------------------------
def test_negative_exp_avg_sq():
    sd = checkpoint()
    v = sd["state"][pid(sd, "fc.weight")]["exp_avg_sq"]
    v[0, :3] = torch.tensor([-1.0, -2.5, -1e-30])
    assert_refused(
        sd, "adamw", "param 0 'fc.weight' of group 0", "'exp_avg_sq' has 3 negative elements", "smallest -2.5"
    )


@pytest.mark.parametrize("step", [math.nan, math.inf, -1.0, 2.5, 1e-3])
def test_bad_step(step):
    sd = checkpoint()
    sd["state"][pid(sd, "out.bias")]["step"] = torch.tensor(step)
    assert_refused(sd, "adamw", "'out.bias' of group 1", f"'step' is {step}", "whole number >= 0")


def test_bad_step_type():
    sd = checkpoint()
    sd["state"][pid(sd, "fc.bias")]["step"] = torch.tensor(3)  # int64: the kernels take fp32/fp64
    sd["state"][pid(sd, "out.bias")]["step"] = torch.tensor([3.0, 3.0])  # not one element
    sd["state"][pid(sd, "out.weight")]["step"] = "3"
    assert_refused(
        sd,
        "adamw",
        "'fc.bias' of group 1",
        "'step' is a torch.int64 tensor",
        "'out.bias' of group 1",
        "'step' is a torch.float32 tensor of shape (2,)",
        "'out.weight' of group 0",
        "'step' is str",
    )


def test_python_number_step_still_loads():
    """Older torch checkpoints hold the step as a Python number; it becomes a tensor on load."""
    sd = checkpoint()
    sd["state"][pid(sd, "fc.bias")]["step"] = 3
    m, opt = build("adamw", seed=1)
    opt.load_state_dict(sd)
    assert float(opt.state[m.fc.bias]["step"]) == 3.0


def test_wrong_shape_exp_avg():
    sd = checkpoint()
    sd["state"][pid(sd, "fc.weight")]["exp_avg"] = torch.zeros(D, 6)  # transposed
    assert_refused(sd, "adamw", "'fc.weight'", "'exp_avg' has shape (8, 6); expected the parameter's shape (6, 8)")


def test_missing_exp_avg():
    sd = checkpoint()
    del sd["state"][pid(sd, "emb.weight")]["exp_avg"]
    assert_refused(sd, "adamw", "param 0 'emb.weight' of group 2", "state has no 'exp_avg'")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.complex64])
def test_wrong_dtype_exp_avg(dtype):
    """fp64 moments would be rounded into an fp32 parameter's fp32 moments: refused too."""
    sd = checkpoint()
    st = sd["state"][pid(sd, "out.weight")]
    st["exp_avg"] = st["exp_avg"].to(dtype)
    assert_refused(sd, "adamw", "'out.weight'", f"'exp_avg' has dtype {dtype}; expected torch.float32")


@pytest.mark.parametrize(
    "key,value", [("exp_avg", math.nan), ("exp_avg", -math.inf), ("exp_avg_sq", math.inf), ("exp_avg_sq", math.nan)]
)
def test_nonfinite_moments(key, value):
    sd = checkpoint()
    sd["state"][pid(sd, "fc.bias")][key][2] = value
    assert_refused(sd, "adamw", "'fc.bias'", f"'{key}' has 1 NaN or infinite element (of 6)")


def test_sparse_exp_avg_layout():
    sd = checkpoint()
    st = sd["state"][pid(sd, "emb2.weight")]
    st["exp_avg"] = st["exp_avg"].to_sparse()
    assert_refused(sd, "adamw", "'emb2.weight' of group 3", "'exp_avg' is a torch.sparse_coo tensor")


@pytest.mark.parametrize("radius", [-1.0, math.nan, math.inf])
def test_bad_radius(radius):
    sd = checkpoint("adamh")
    st = sd["state"][pid(sd, "fc.weight")]
    assert float(st["radius"]) > 0  # AdamH recorded it
    st["radius"] = torch.tensor(radius, dtype=torch.float64)
    assert_refused(sd, "adamh", "param 0 'fc.weight' of group 0", f"'radius' is {radius}", "finite number >= 0")


def test_zero_hyperball_matrix_round_trips():
    """A zero matrix has R = 0 and AdamH keeps it at zero; its own checkpoint loads (R = 0 was
    refused once) and the step after the load equals the step without one."""

    def make():
        w = torch.nn.Parameter(torch.zeros(4, 6))
        return w, lvopt.AdamH([w], lr=1e-2)

    w, opt = make()
    for _ in range(2):
        w.grad = torch.ones(4, 6)
        opt.step()
    assert float(opt.state[w]["radius"]) == 0.0 and not w.detach().any()
    w2, opt2 = make()
    opt2.load_state_dict(opt.state_dict())
    for p, o in ((w, opt), (w2, opt2)):
        p.grad = torch.full((4, 6), 0.5)
        o.step()
    assert torch.equal(w, w2) and torch.equal(opt.state[w]["exp_avg"], opt2.state[w2]["exp_avg"])


def test_radius_not_a_scalar():
    sd = checkpoint("adamh")
    sd["state"][pid(sd, "out.weight")]["radius"] = torch.ones(3, dtype=torch.float64)
    assert_refused(sd, "adamh", "'out.weight'", "'radius' is a torch.float64 tensor of shape (3,)")


def test_last_step_ahead_of_step():
    """A checkpoint normally holds no per-row bookkeeping (state_dict() brings rows current and
    drops it); one that does must agree with the table's step."""
    sd = checkpoint()
    st = sd["state"][pid(sd, "emb.weight")]
    assert "last_step" not in st
    t = int(float(st["step"]))
    last = torch.full((V,), t, dtype=torch.int64)
    last[[3, 7]] = t + 1
    st["last_step"] = last
    assert_refused(sd, "adamw", "'emb.weight' of group 2", "'last_step' has 2 rows ahead of 'step' = 3 (largest 4)")


@pytest.mark.parametrize(
    "last", [torch.full((V + 1,), 1, dtype=torch.int64), torch.full((V,), 1.0), torch.full((V,), -1, dtype=torch.int64)]
)
def test_bad_last_step(last):
    sd = checkpoint()
    sd["state"][pid(sd, "emb.weight")]["last_step"] = last
    assert_refused(sd, "adamw", "'emb.weight'", "'last_step'")


def test_consistent_last_step_loads():
    sd = checkpoint()
    st = sd["state"][pid(sd, "emb.weight")]
    st["last_step"] = torch.randint(0, int(float(st["step"])) + 1, (V,))
    m, opt = build("adamw", seed=1)
    opt.load_state_dict(sd)


def test_row_clock_refused():
    m, opt = build("adamw", seed=0)
    sd = torch.optim.Optimizer.state_dict(opt)  # the raw state, bookkeeping included
    assert "row_clock" in sd["state"][pid(sd, "emb.weight")]
    assert_refused(sd, "adamw", "'emb.weight'", "'row_clock' is in-memory exact-mode bookkeeping")


# -- the param groups ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("lr", -1e-3, "invalid learning rate lr=-0.001"),
        ("lr", math.nan, "invalid learning rate lr=nan"),
        ("betas", (0.9, 1.0), "invalid beta parameter at index 1: 1.0"),
        ("betas", (0.9,), "betas must be a pair"),
        ("eps", 0.0, "invalid epsilon value eps=0.0"),
        ("weight_decay", -0.1, "invalid weight_decay value -0.1"),
        ("differentiable", True, "differentiable"),
        ("sparse_mode", "fast", "sparse_mode must be one of"),
    ],
)
def test_bad_group_hyperparameters(key, value, expected):
    sd = checkpoint()
    sd["param_groups"][2][key] = value
    assert_refused(sd, "adamw", f"param group 2: {expected}")


def test_weight_decay_in_hyperball_group():
    sd = checkpoint("adamh")
    sd["param_groups"][0]["weight_decay"] = 0.1
    assert_refused(sd, "adamh", "param group 0: weight_decay=0.1 given to a hyperball group")


def test_missing_hyperparameter():
    sd = checkpoint()
    del sd["param_groups"][1]["lr"]
    del sd["param_groups"][1]["maximize"]
    assert_refused(
        sd, "adamw", "param group 1: missing hyperparameter 'lr'", "param group 1: missing hyperparameter 'maximize'"
    )


def test_groups_that_do_not_match():
    """The structural checks torch makes, in torch's words, before any state is paired."""
    sd = checkpoint()
    sd["param_groups"] = sd["param_groups"][:3]
    assert_refused(sd, "adamw", "different number of parameter groups: 3 in the checkpoint, 4 in the optimizer")
    sd = checkpoint()
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:1]
    assert_refused(
        sd,
        "adamw",
        "doesn't match the size of optimizer's group: param group 1 has 1 parameters in "
        "the checkpoint, 2 in the optimizer",
    )
    assert_refused({"state": {}}, "adamw", "the checkpoint has no 'param_groups'")


def test_every_problem_named_in_one_error():
    sd = checkpoint("adamh")
    sd["param_groups"][1]["lr"] = -1.0
    sd["param_groups"][1]["eps"] = math.inf
    sd["state"][pid(sd, "fc.weight")]["step"] = torch.tensor(-2.0)
    sd["state"][pid(sd, "fc.weight")]["radius"] = torch.tensor(math.nan, dtype=torch.float64)
    sd["state"][pid(sd, "out.bias")]["exp_avg_sq"][0] = -1.0
    del sd["state"][pid(sd, "emb.weight")]["exp_avg"]
    sd["state"][pid(sd, "emb2.weight")]["exp_avg_sq"] = torch.zeros(V, D + 1)
    err = assert_refused(
        sd,
        "adamh",
        "(7 problems)",
        "param group 1: invalid learning rate lr=-1.0",
        "param group 1: invalid epsilon value eps=inf",
        "param 0 'fc.weight' of group 0 (shape (6, 8), torch.float32, cpu): 'step' is -2.0",
        "param 0 'fc.weight' of group 0 (shape (6, 8), torch.float32, cpu): 'radius' is nan",
        "param 1 'out.bias' of group 1",
        "'exp_avg_sq' has 1 negative element",
        "param 0 'emb.weight' of group 2",
        "state has no 'exp_avg'",
        "param 0 'emb2.weight' of group 3",
        "'exp_avg_sq' has shape (40, 9)",
    )
    assert len(err.problems) == 7


def test_unnamed_parameters_are_named_by_index():
    p = nn.Parameter(torch.randn(5, 3))
    opt = lvopt.AdamW([p])
    p.grad = torch.randn(5, 3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(0.5)
    q = nn.Parameter(torch.randn(5, 3))
    with pytest.raises(
        lvopt.CheckpointError,
        match=r"param 0 of group 0 \(shape \(5, 3\), torch.float32, cpu\): "
        r"'step' is 0.5",
    ):
        lvopt.AdamW([q]).load_state_dict(sd)


# -- what still loads ---------------------------------------------------------------------------
def _continue(m, opt, steps=2, seed=7):
    train(m, opt, steps, seed)
    opt.flush()
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("kind", ["adamw", "adamh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_valid_checkpoint_loads_weights_only(kind, dtype):
    """lvopt checkpoints (dense, exact and lazy sparse groups) load through
    torch.load(weights_only=True) into a fresh optimizer, which then continues bit for bit."""
    m1, o1 = build(kind, seed=0, dtype=dtype)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2, o2 = build(kind, seed=1, steps=0, dtype=dtype)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    for a, b in zip(_continue(m1, o1), _continue(m2, o2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_checkpoints_load_both_ways(dtype):
    """torch.optim.AdamW's checkpoint (bf16 moments for a bf16 model: widened) loads into
    lvopt.AdamW, and lvopt's into torch.optim.AdamW."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3)).to(dtype)
    ta = torch.optim.AdamW(a.parameters(), lr=1e-2)
    a(torch.randn(4, 8, dtype=dtype)).float().sum().backward()
    ta.step()
    sd = ta.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == dtype
    la = lvopt.AdamW(a.parameters(), lr=1e-2)
    la.load_state_dict(sd)
    assert la.state[a[0].weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(la.state[a[0].weight]["exp_avg_sq"], sd["state"][0]["exp_avg_sq"].float())
    tb = torch.optim.AdamW(a.parameters(), lr=1e-2)
    tb.load_state_dict(la.state_dict())
    assert float(tb.state[a[0].weight]["step"]) == 1.0


def test_pre_hook_runs_once_before_validation():
    """A load_state_dict pre-hook (e.g. one that upgrades an old format) runs once, and the
    validation sees what it returns: a hook that repairs a checkpoint makes it loadable."""
    sd = checkpoint()
    key = pid(sd, "fc.weight")
    sd["state"][key]["step"] = torch.tensor(-1.0)
    m, opt = build("adamw", seed=1)
    calls = []

    def repair(optimizer, state_dict):
        calls.append(1)
        state_dict = copy.copy(state_dict)
        state_dict["state"] = {**state_dict["state"], key: {**state_dict["state"][key], "step": torch.tensor(3.0)}}
        return state_dict

    handle = opt.register_load_state_dict_pre_hook(repair)
    opt.load_state_dict(sd)
    assert calls == [1] and float(opt.state[m.fc.weight]["step"]) == 3.0
    handle.remove()
    assert not opt._optimizer_load_state_dict_pre_hooks
    assert_refused(sd, "adamw", "'step' is -1.0")


def test_load_keeps_the_optimizers_own_settings():
    """load_state_dict changes the state and the param groups only. (It used to reset
    nonfinite, backend, track, skipped_steps and the telemetry hooks to the constructor's
    defaults: torch's load goes through __setstate__, which lvopt uses for unpickling; found by
    tests/test_stateful.py, where a resumed nonfinite="skip" optimizer stepped a NaN gradient.)"""
    p = nn.Parameter(torch.randn(4, 3))
    src = lvopt.AdamW([p])
    p.grad = torch.randn(4, 3)
    src.step()
    q = nn.Parameter(torch.randn(4, 3))
    opt = lvopt.AdamW([q], nonfinite="skip", backend="reference", track=True)
    seen = []
    opt.register_telemetry_hook(lambda o, tel: seen.append(tel))
    q.grad = torch.full((4, 3), math.nan)
    opt.step()
    assert opt.skipped_steps == 1
    opt.load_state_dict(src.state_dict())
    assert (opt.nonfinite, opt.backend, opt.track, opt.skipped_steps) == ("skip", "reference", True, 1)
    opt.step()  # the NaN gradient: skipped, not written
    assert opt.skipped_steps == 2 and bool(torch.isfinite(q).all())
    q.grad = torch.randn(4, 3)
    opt.step()
    assert len(seen) == 1 and float(opt.state[q]["step"]) == 2.0


def test_an_empty_local_shard_has_no_problems():
    """A rank's empty shard of an FSDP2 DTensor (the state of a 6-row matrix on 4 ranks: 2, 2, 2,
    0 rows) has elements globally but none locally: nothing to find NaN or a negative value in
    (aminmax of nothing raised). The end-to-end case: tests/test_fsdp_adamh.py resumes from a
    state_dict on 4 ranks."""
    from lvopt.checkpoint import _counts

    assert _counts(torch.zeros(0, 28), negative=True) == (0, 0, 0.0)
