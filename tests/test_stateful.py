"""Hypothesis stateful test: lvopt.AdamW and lvopt.AdamH through random sequences of operations.

A RuleBasedStateMachine drives four copies of one small model (a dense Linear, an exact-mode
sparse embedding table -- nn.Embedding(sparse=True) or lvopt.nn.Embedding --, a lazy-mode one,
and a Linear added later with add_param_group), fp32 or bf16, each with its optimizer
(nonfinite="skip"):

- ``live``: the native (CPU) optimizer, never reloaded: the uninterrupted run;
- ``resumed``: the native optimizer that ``save_and_resume`` replaces, with its model, by fresh
  ones loaded from a torch.save / torch.load(weights_only=True) round trip of their state;
- ``ref``: the same optimizer on backend="reference" (the pure-PyTorch oracle);
- ``dense``: backend="reference" with the exact table's gradients given densely (g = 0 on the
  rows a batch does not touch): what exact mode promises to equal.

Rules: a step (dense gradients, raw or lvopt-coalesced row-sparse gradients with duplicates
and empty batches, now and then a dense gradient for the exact table, parameters without a
gradient, lr / betas changes in every group), a step with a NaN/inf gradient (skipped), lr /
betas / eps changes in one group or all, flush(), save_and_resume (the other runs call
state_dict() at the same point, as a run that checkpoints does), add_param_group. Every run
gets every operation with the same gradients. Hypothesis enables a random subset of the rules
in each sequence (swarm testing), so that many sequences repeat one rule: every operation other
than a step is therefore checked and then followed by a step, and sequences start with warm-up
steps (state exists, exact-mode rows are behind).

Invariants, after every operation:
- ``resumed`` is bit for bit ``live`` (parameters; step, exp_avg, exp_avg_sq, radius; skipped
  steps; param groups): a save/load in a fresh optimizer changes nothing;
- ``live`` matches ``ref`` within fp32 rounding (1e-5 of the tensor's largest element; in bf16,
  2e-2 for parameters, where a one-ulp difference persists, and 1e-2 for moments: the reference
  rounds a row's summed duplicate gradients to bf16, the native kernels keep the fp32 sum);
- the exact table's current rows (last_step == step) match ``dense``, same tolerances;
- a skipped step wrote nothing and counted itself (checked inside its rule, bit for bit).

Bounded for CI by the "lvopt-stateful" settings profile below: 25 derandomized examples of up
to 10 operations, no deadline, no example database, no explain phase. Measured on the shared
2-core machine: ``pytest -q tests/test_stateful.py`` 37 s wall, 25 s CPU
(LVOPT_STATEFUL_EXAMPLES=N runs N examples, e.g. 300 for a longer local search). A failure prints
the shrunk sequence of rule calls, e.g. ``setup(..., warmup=[[]])``, ``save_and_resume(seed=0,
then_ids=[])``.

Deliberate breakages tried (each applied alone, the file run as above); every one was caught:
1. load_state_dict zeroing the loaded step: "state fc.weight.step, resumed vs uninterrupted"
   after setup, save_and_resume.
2. state_dict() not flushing (``self.flush()`` removed from ``_FusedAdam.state_dict``):
   "parameter exact.weight, resumed vs uninterrupted" after setup, add_param_group,
   save_and_resume, flush.
3. the skip policy writing moments (``exp_avg`` halved in ``_skip_step``): "a skipped step wrote
   state fc.weight.exp_avg" after setup, step_nonfinite.
4. the reference's second moment off (``1.0001 - beta2`` for ``1.0 - beta2`` in
   ``reference._moments``): "parameter fc.weight vs the reference" right after setup.
5. load_state_dict resetting the optimizer's own settings (the bug fixed with this test:
   ``self.__dict__.update(kept)`` removed): "the step was not skipped" after setup,
   save_and_resume, step_nonfinite.
6. exact mode not bringing rows current when betas change (the betas/eps clause removed from
   the exact-mode sparse step's ``clock is not None and (not exact or ...)`` test): "state exact.weight.exp_avg (current rows) vs dense AdamW" after setup,
   change_hyperparameters; also "resumed vs uninterrupted" after a betas change and a resume.
Before the step-after-every-operation structure, breakages 2 and 6 went unnoticed in 30 examples.
"""

import copy
import io
import math
import os
import warnings

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import lvopt
from conftest import needs_native

V, D, H = 16, 6, 5  # table rows, width, hidden width

settings.register_profile(
    "lvopt-stateful",
    max_examples=int(os.environ.get("LVOPT_STATEFUL_EXAMPLES", 25)),
    stateful_step_count=10,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no explain phase: shrinks sooner
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAMES = ("fc.weight", "fc.bias", "exact.weight", "lazy.weight")
LATE = ("late.weight", "late.bias")
# All with beta1**2 < beta2 (exact mode's rule); the constructors' default last (Hypothesis
# favours the first: a change should usually change something).
BETAS = [(0.8, 0.99), (0.5, 0.9), (0.9, 0.999)]
IDS = st.lists(st.integers(0, V - 1), max_size=12)  # one batch's token ids: duplicates, often empty
SEED = st.integers(0, 2**16)  # the gradient values


class Model(nn.Module):
    def __init__(self, dtype, emb_kind, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.exact = lvopt.nn.Embedding(V, D) if emb_kind == "lvopt" else nn.Embedding(V, D, sparse=True)
        self.lazy = nn.Embedding(V, D, sparse=True)
        self.fc = nn.Linear(D, H)
        self.late = nn.Linear(H, 3)
        self.to(dtype)


def make_optimizer(model, algo, backend, late: bool):
    p = dict(model.named_parameters())
    if algo == "adamh":
        groups = [
            dict(params=[p["fc.weight"], p["fc.bias"]]),  # hyperball: the matrix; the vector takes AdamW
            dict(params=[p["exact.weight"]], hyperball=False, weight_decay=0.05),
            dict(params=[p["lazy.weight"]], hyperball=False, sparse_mode="lazy"),
        ]
        opt = lvopt.AdamH(groups, lr=1e-2, backend=backend, nonfinite="skip")
        late_group = dict(params=[p["late.weight"], p["late.bias"]], lr=5e-3)
    else:
        groups = [
            dict(params=[p["fc.weight"], p["fc.bias"]], weight_decay=0.1),
            dict(params=[p["exact.weight"]], weight_decay=0.05),
            dict(params=[p["lazy.weight"]], weight_decay=0.0, sparse_mode="lazy"),
        ]
        opt = lvopt.AdamW(groups, lr=1e-2, backend=backend, nonfinite="skip")
        late_group = dict(params=[p["late.weight"], p["late.bias"]], lr=5e-3, weight_decay=0.1)
    if late:
        opt.add_param_group(copy.copy(late_group))
    return opt, late_group


def raw(t):
    """A tensor's bytes, for bit-for-bit comparison (NaN == NaN, -0.0 != 0.0)."""
    return (t.dtype, tuple(t.shape), t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def same(a, b, what):
    """Bit for bit, with a short message (how many elements differ, by how much) if not."""
    if raw(a) != raw(b):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        x, y = a.detach().double(), b.detach().double()
        n = int((x != y).sum())
        raise AssertionError(f"{what}: {n} of {a.numel()} elements differ, by up to {float((x - y).abs().max()):.3g}")


def close(a, b, tol, what):
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    assert err <= tol * scale + 1e-30, f"{what}: max difference {err:.3g} > {tol:g} x {scale:.3g}"


class Run:
    """One model and its optimizer."""

    def __init__(self, machine, backend, seed=0, densify=False):
        self.backend = backend
        self.densify = densify  # the exact table's sparse gradients are given densely
        self.model = Model(machine.dtype, machine.emb_kind, seed)
        self.opt, self.late_group = make_optimizer(self.model, machine.algo, backend, machine.late)

    def param(self, name):
        return dict(self.model.named_parameters())[name]

    def state(self):
        """{name: {key: tensor}} of the step-relevant state (not the exact-mode bookkeeping)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {
            names[id(p)]: {k: v for k, v in s.items() if k in ("step", "exp_avg", "exp_avg_sq", "radius")}
            for p, s in self.opt.state.items()
            if s
        }


class OptimizerMachine(RuleBasedStateMachine):
    @initialize(
        algo=st.sampled_from(["adamw", "adamh"]),
        dtype=st.sampled_from([torch.float32, torch.bfloat16]),
        emb_kind=st.sampled_from(["torch", "lvopt"]),
        warmup=st.lists(IDS, min_size=1, max_size=3),
    )
    def setup(self, algo, dtype, emb_kind, warmup):
        """The runs, and a few steps (``warmup``: their batches) so that every sequence starts
        with state and with exact-mode rows left behind."""
        self.algo, self.dtype, self.emb_kind, self.late = algo, dtype, emb_kind, False
        self.runs = {
            name: Run(self, backend) for name, backend in (("live", None), ("resumed", None), ("ref", "reference"))
        }
        self.runs["dense"] = Run(self, "reference", densify=True)
        for i, ids in enumerate(warmup):
            self._step(i, ids)

    def _step(self, seed, ids, no_grad=frozenset(), dense_table=False):
        self._gradients(seed, ids, set(NAMES + LATE) - set(no_grad), dense_table)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DenseEmbeddingGradWarning, sparse-invariant notes
            for run in self.runs.values():
                run.opt.step()

    def _check_then_step(self, seed, then_ids):
        """Hypothesis draws a random subset of the rules for each sequence (swarm testing), and
        many sequences are one rule repeated: so every operation is checked, then followed by a
        step (batch ``then_ids``) that shows its effect on training."""
        self.resumed_is_bit_identical_to_uninterrupted()
        self.live_matches_reference()
        self.exact_rows_match_dense_adamw()
        self._step(seed, then_ids)

    def names(self):
        return NAMES + (LATE if self.late else ())

    def _gradients(self, seed, ids, with_grad, dense_table, bad=None):
        """Gives every run the same gradients: dense ones drawn from ``seed``; row-sparse ones
        from a backward pass through each model's own embedding (the same ids and upstream
        gradient, so the same gradient; lvopt.nn.Embedding also brings the rows current first)."""
        g = torch.Generator().manual_seed(seed)
        upstream = torch.randn(len(ids), D, generator=g)
        dense = {n: torch.randn(self.runs["live"].param(n).shape, generator=g) for n in self.names()}
        for run in self.runs.values():
            run.opt.zero_grad()
            for n in self.names():
                if n not in with_grad:
                    continue
                p = run.param(n)
                if n in ("exact.weight", "lazy.weight") and not (dense_table and n == "exact.weight"):
                    emb = run.model.exact if n == "exact.weight" else run.model.lazy
                    out = emb(torch.tensor(ids, dtype=torch.int64).reshape(-1))
                    up = upstream.to(p.dtype)
                    if bad is not None and bad[0] == n and len(ids):
                        up = up.clone()
                        up[0, 0] = bad[1]
                    out.backward(up)
                    if run.densify and n == "exact.weight":
                        p.grad = p.grad.to_dense()
                else:
                    grad = dense[n].to(p.dtype)
                    if bad is not None and bad[0] == n:
                        grad[(0,) * grad.dim()] = bad[1]
                    p.grad = grad

    @rule(
        seed=SEED,
        ids=IDS,
        no_grad=st.sets(st.sampled_from(NAMES + LATE)),
        dense_table=st.booleans(),
        betas=st.sampled_from([None] + BETAS),
        lr=st.sampled_from([None, 3e-3, 2e-2, 0.0]),
    )
    def step(self, seed, ids, no_grad, dense_table, betas, lr):
        """A step; the ``no_grad`` parameters have no gradient and are not stepped (a small set:
        most steps step most parameters); ``dense_table``: the exact table gets a dense gradient
        (as a tied weight would); ``betas``, ``lr``: first set in every group (a schedule), so
        that changes fall between steps of rows left behind."""
        self._set_hyper("all", lr, betas, None)
        self._step(seed, ids, no_grad, dense_table)

    @rule(
        seed=SEED,
        ids=st.lists(st.integers(0, V - 1), min_size=1, max_size=12),
        where=st.sampled_from(NAMES),
        value=st.sampled_from([math.nan, math.inf, -math.inf]),
    )
    def step_nonfinite(self, seed, ids, where, value):
        """A NaN/inf in one gradient: every optimizer skips the step and writes nothing."""
        self._gradients(seed, ids, set(NAMES) | set(LATE), False, bad=(where, value))
        for run in self.runs.values():
            before = self._everything(run)
            skipped = run.opt.skipped_steps
            run.opt.step()
            assert run.opt.skipped_steps == skipped + 1, f"{run.backend or 'native'}: the step was not skipped"
            after = self._everything(run)
            assert after.keys() == before.keys()
            for k in before:
                same(after[k], before[k], f"{run.backend or 'native'}: a skipped step wrote {k}")

    def _everything(self, run):
        """Clones of every tensor a step may write: parameters, state, exact-mode last_step."""
        out = {f"parameter {n}": p.detach().clone() for n, p in run.model.named_parameters()}
        for n in self.names():
            for k, v in run.opt.state.get(run.param(n), {}).items():
                if torch.is_tensor(v):
                    out[f"state {n}.{k}"] = v.clone()
        return out

    @rule(
        group=st.sampled_from(["all", 0, 1, 2, 3]),
        lr=st.sampled_from([3e-3, 2e-2, 0.0, 1e-3]),
        betas=st.sampled_from(BETAS),
        eps=st.sampled_from([1e-6, 1e-8]),
        seed=SEED,
        then_ids=IDS,
    )
    def change_hyperparameters(self, group, lr, betas, eps, seed, then_ids):
        """As an LR scheduler (every group) or a hand edit (one group) would; a betas/eps change
        makes an exact group bring its rows current under the old ones at its next sparse step."""
        self._set_hyper(group, lr, betas, eps)
        self._check_then_step(seed, then_ids)

    def _set_hyper(self, group, lr, betas, eps):
        for run in self.runs.values():
            groups = run.opt.param_groups
            for g in groups if group == "all" else [groups[min(group, len(groups) - 1)]]:
                for k, v in (("lr", lr), ("betas", betas), ("eps", eps)):
                    if v is not None:
                        g[k] = v

    @rule(seed=SEED, then_ids=IDS)
    def flush(self, seed, then_ids):
        for run in self.runs.values():
            run.opt.flush()
        self._check_then_step(seed, then_ids)

    @rule(seed=SEED, then_ids=IDS)
    def save_and_resume(self, seed, then_ids):
        """``resumed`` goes through a checkpoint file into a fresh model and optimizer; ``live``
        and ``ref`` call state_dict() at the same point, as a run that checkpoints does."""
        for name in ("live", "ref", "dense"):
            self.runs[name].opt.state_dict()
        old = self.runs["resumed"]
        buf = io.BytesIO()
        torch.save({"model": old.model.state_dict(), "opt": old.opt.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        new = Run(self, None, seed=12345)  # other initial values: the checkpoint must overwrite them
        new.model.load_state_dict(ck["model"])
        new.opt.load_state_dict(ck["opt"])
        new.opt.skipped_steps = old.opt.skipped_steps  # not part of a torch checkpoint
        self.runs["resumed"] = new
        self._check_then_step(seed, then_ids)

    @precondition(lambda self: not self.late)
    @rule(seed=SEED, then_ids=IDS)
    def add_param_group(self, seed, then_ids):
        self.late = True
        for run in self.runs.values():
            run.opt.add_param_group(copy.copy(run.late_group))
        self._check_then_step(seed, then_ids)

    @invariant()
    def resumed_is_bit_identical_to_uninterrupted(self):
        live, res = self.runs["live"], self.runs["resumed"]
        assert res.opt.skipped_steps == live.opt.skipped_steps
        for n, p in live.model.named_parameters():
            same(res.param(n), p, f"parameter {n}, resumed vs uninterrupted")
        ls, rs = live.state(), res.state()
        assert set(ls) == set(rs), f"state for {sorted(ls)} vs {sorted(rs)}"
        for n in ls:
            assert set(ls[n]) == set(rs[n]), (n, sorted(ls[n]), sorted(rs[n]))
            for k in ls[n]:
                same(rs[n][k], ls[n][k], f"state {n}.{k}, resumed vs uninterrupted")
        for a, b in zip(live.opt.param_groups, res.opt.param_groups):
            assert {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}

    @invariant()
    def live_matches_reference(self):
        live, ref = self.runs["live"], self.runs["ref"]
        assert ref.opt.skipped_steps == live.opt.skipped_steps
        ptol, mtol = self._tolerances()
        for n, p in live.model.named_parameters():
            close(p, ref.param(n), ptol, f"parameter {n} vs the reference")
        ls, rs = live.state(), ref.state()
        assert set(ls) == set(rs)
        for n in ls:
            assert set(ls[n]) == set(rs[n]), (n, sorted(ls[n]), sorted(rs[n]))
            assert float(ls[n]["step"]) == float(rs[n]["step"]), f"{n}.step"
            for k in ("exp_avg", "exp_avg_sq"):
                close(ls[n][k], rs[n][k], mtol, f"state {n}.{k} vs the reference")
            if "radius" in ls[n]:
                # recorded from the same untouched matrix at its first step
                same(ls[n]["radius"], rs[n]["radius"], f"state {n}.radius vs the reference")

    @invariant()
    def exact_rows_match_dense_adamw(self):
        """Exact mode's promise: every row brought current (last_step == step) holds what dense
        AdamW with g = 0 on untouched rows holds (the ``dense`` run, stepped step by step)."""
        live, dense = self.runs["live"], self.runs["dense"]
        p, q = live.param("exact.weight"), dense.param("exact.weight")
        st, sq = live.opt.state.get(p, {}), dense.opt.state.get(q, {})
        assert bool(st) == bool(sq)
        rows = torch.arange(V)
        if st:
            assert float(st["step"]) == float(sq["step"])
            if "last_step" in st:
                rows = (st["last_step"] == int(float(st["step"]))).nonzero().reshape(-1)
            ptol, mtol = self._tolerances()
            for k in ("exp_avg", "exp_avg_sq"):
                close(st[k][rows], sq[k][rows], mtol, f"state exact.weight.{k} (current rows) vs dense AdamW")
        close(p[rows], q[rows], self._tolerances()[0], "exact.weight (current rows) vs dense AdamW")

    def _tolerances(self):
        """(parameters, moments) relative to the tensor's largest element."""
        ptol = 1e-5 if self.dtype == torch.float32 else 2e-2
        # bf16: the reference rounds a row's summed duplicate gradients to bf16 (coalesce_rows),
        # the native kernels use the fp32 sum: the moments differ by that rounding (2**-8 of m,
        # 2**-7 of v).
        mtol = 1e-5 if self.dtype == torch.float32 else 1e-2
        return ptol, mtol


TestOptimizerMachine = needs_native(OptimizerMachine.TestCase)
TestOptimizerMachine.settings = settings.get_profile("lvopt-stateful")
