"""The steady-state step of lvopt.AdamW / lvopt.AdamH on the Triton backend: what a step does
once the first one has validated every parameter, created the state and built the launch
plans (lvopt/triton/_plan.py).

:func:`build` is called at the end of a full step (lvopt/optim.py) and returns a
:class:`FastStep` when that step was a plain dense one: every parameter with a gradient on the
Triton backend, on one device, contiguous, dense gradients laid out like it, no row-sparse
gradient, no FSDP shard, no telemetry (``track=False``). Later steps call :meth:`FastStep.run`,
which does a fixed number of Python operations per parameter group and per batch, and passes
over the parameters only at C level (``map``): it re-reads every group's hyperparameters (the
same checks as a full step; an LR scheduler's new ``lr`` rewrites the batch's table with one
asynchronous copy), reads the gradients (``p.grad``; torch's setter has already checked their
dtype, device and shape), checks that each is a plain dense contiguous tensor, and runs the
batches' plans (lvopt/triton/fused_adamw.run, fused_adamh.run), bumping the parameters'
autograd version counters as the custom op's dispatch would. Anything else (a gradient that
became ``None``, sparse or strided differently, a group added, a hyperball or amsgrad flag
changed, another parameter list, a state reset) makes it return False, and the full step runs
(and builds a new FastStep). ``load_state_dict``, ``add_param_group`` and unpickling drop it.

Not while ``torch.compile`` traces the step or a TorchDispatchMode (fake tensors, a flop
counter) is active: those need the custom ops, which the full step calls.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

_GRAD = operator.attrgetter("grad")
_IS_CONTIGUOUS = Tensor.is_contiguous
_NONE = {type(None)}


def direct_ok() -> bool:
    """Whether a step may call the Triton host code directly rather than through the custom
    ops (which torch.compile and dispatch modes need to see)."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def _picker(idx):
    if len(idx) == 1:
        i = idx[0]
        return lambda s: (s[i],)
    return operator.itemgetter(*idx)


class _Batch:
    __slots__ = (
        "key",
        "algo",
        "pick",
        "params",
        "exp_avg",
        "exp_avg_sq",
        "vmax",
        "steps",
        "radii",
        "plan",
        "segments",
        "row_segment",
        "n",
    )


def build(opt, batches: dict, items: list, sparse_items: list, to_flush: list, sharded: bool):
    """A FastStep for the optimizer ``opt`` after a full step over ``batches`` (lvopt/optim.py's
    step), or None when that step was not a plain dense Triton step."""
    if opt.track or sparse_items or to_flush or sharded or not batches or not direct_ok():
        return None
    if any(k[0] != "triton" for k in batches) or len({k[1] for k in batches}) != 1:
        return None
    flat = []
    index = {}
    for _, p, _, _, _, _, _ in items:
        index[id(p)] = len(flat)
        flat.append(p)
    for b in batches.values():
        for work, orig, g, p_where in zip(b["params"], b["orig"], b["grads"], b["where"]):
            if work is not orig or not work.is_contiguous() or g is not orig.grad:
                return None
    from .triton import _plan as P

    out = []
    for key, b in batches.items():
        algo, amsgrad = key[2], key[3]
        fb = _Batch()
        fb.key, fb.algo, fb.n = key, algo, len(b["params"])
        fb.params = list(b["params"])
        fb.pick = _picker([index[id(p)] for p in fb.params])
        fb.exp_avg, fb.exp_avg_sq, fb.steps = list(b["exp_avg"]), list(b["exp_avg_sq"]), list(b["steps"])
        fb.vmax = list(b["max_exp_avg_sq"]) if amsgrad else None
        fb.radii = list(b["radii"]) if algo == "adamh" else None
        fb.plan = P.plan_for(fb.params, b["grads"], fb.exp_avg, fb.exp_avg_sq, fb.steps, fb.vmax, fb.radii)
        # Runs of rows from one group: (group index, first row, end row).
        segs = []
        for r, (_, gi, _) in enumerate(b["where"]):
            if segs and segs[-1][0] == gi and segs[-1][2] == r:
                segs[-1][2] = r + 1
            else:
                segs.append([gi, r, r + 1])
        fb.segments = [tuple(s) for s in segs]
        fb.row_segment = torch.tensor([k for k, (_, s, e) in enumerate(segs) for _ in range(s, e)], dtype=torch.long)
        out.append(fb)
    stepped = {id(p) for p in flat}
    idle = [p for g in opt.param_groups for p in g["params"] if id(p) not in stepped]
    return FastStep(opt, flat, idle, out, P)


def _consts(row) -> tuple:
    return tuple(None if isinstance(x, Tensor) else x for x in row)


class FastStep:
    def __init__(self, opt, flat, idle, batches, plan_module):
        from ._validate import check_hyper as _check_hyper

        self._check_hyper = _check_hyper
        self.P = plan_module
        self.flat = flat
        self.idle = idle
        self.batches = batches
        self.device = flat[0].device
        self.groups = opt.param_groups
        self.state = opt.state
        self.n_state = len(opt.state)
        self.group_info = []
        for gi, g in enumerate(opt.param_groups):
            hb = opt._is_hyperball_group(g)
            row = _check_hyper(g, f"param group {gi}", hb, read=False)
            self.group_info.append((g, g["params"], len(g["params"]), hb, bool(g.get("amsgrad", False)), _consts(row)))
        self.n_groups = len(opt.param_groups)
        from .triton import fused_adamh, fused_adamw

        self.run_adamw, self.run_adamh = fused_adamw.run, fused_adamh.run

    def run(self, opt) -> bool:
        """One step, or False (nothing written) when the full step must run instead."""
        if (
            not direct_ok()
            or opt.track
            or opt.param_groups is not self.groups
            or len(self.groups) != self.n_groups
            or opt.state is not self.state
            or len(self.state) != self.n_state
        ):
            return False
        rows = []
        changed = []
        for gi, (g, plist, n, hb, ams, consts) in enumerate(self.group_info):
            if g["params"] is not plist or len(plist) != n or bool(g.get("amsgrad", False)) != ams:
                return False
            if opt._is_hyperball_group(g) != hb:
                return False
            row = self._check_hyper(g, f"param group {gi}", hb, read=False)
            c = _consts(row)
            rows.append(row)
            changed.append(c != consts)
        grads = list(map(_GRAD, self.flat))
        try:
            if not all(map(_IS_CONTIGUOUS, grads)):  # (a sparse tensor is not contiguous)
                return False  # a sparse or strided gradient: the full step decides
        except TypeError:
            return False  # a missing gradient (None): the full step decides
        if self.idle and set(map(type, map(_GRAD, self.idle))) != _NONE:
            return False  # a parameter without a gradient at the last full step has one now
        for gi, c in enumerate(changed):
            if c:
                info = self.group_info[gi]
                self.group_info[gi] = info[:5] + (_consts(rows[gi]),)
        tables = [self._table(opt, b, rows, changed) for b in self.batches]
        found = opt._found_for(self.device) if opt.nonfinite != "propagate" else None
        picked = []
        for b in self.batches:
            gb = b.pick(grads)
            if not b.plan.set_grads(gb):  # a gradient lost its 16-byte alignment: new tables
                b.plan = self.P.plan_for(b.params, gb, b.exp_avg, b.exp_avg_sq, b.steps, b.vmax, b.radii)
            picked.append(gb)
        if found is not None:
            for b in self.batches:
                b.plan.scan(found)
        for b, gb, table in zip(self.batches, picked, tables):
            if b.algo == "adamh":
                sums = b.plan.buffer("adamh_stats", (b.n, 3), torch.float64)  # not read: track=False
                self.run_adamh(b.plan, b.params, gb, b.steps, b.radii, table, found, sums, scanned=True)
            else:
                self.run_adamw(b.plan, b.params, gb, b.steps, table, found, scanned=True)
        torch._C._increment_version(self.flat)
        if found is not None:
            if opt.nonfinite == "raise":
                if bool(found):  # the one host read of nonfinite="raise"
                    opt._skip_step([], opt._collect(), None)
            else:
                counts = opt._skip_counts.get(found.device)
                if counts is None:
                    counts = opt._skip_counts[found.device] = torch.zeros((), dtype=torch.float64, device=found.device)
                counts.add_(found.reshape(()))
        opt._step_number += 1
        return True

    def _table(self, opt, b, rows, changed) -> Tensor:
        """The batch's hyperparameter table (optim._FusedAdam._hyper_table's tensor): rewritten
        from the groups' rows with one asynchronous copy when a group's numbers changed, and
        its tensor-valued entries copied on the device, one copy per group and column."""
        ent = opt._tables.get(b.key)
        if ent is None:
            return opt._hyper_table(b.key, [rows[gi] for gi, s, e in b.segments for _ in range(s, e)], self.device)
        table = ent[1]
        if any(changed[gi] for gi, _, _ in b.segments):
            vals = torch.tensor(
                [[0.0 if isinstance(x, Tensor) else x for x in rows[gi]] for gi, _, _ in b.segments],
                dtype=torch.float64,
            )
            host = vals.index_select(0, b.row_segment)
            if self.device.type == "cuda":
                host = host.pin_memory()
            table.copy_(host, non_blocking=self.device.type == "cuda")
            opt._tables[b.key] = (None, table)  # a full step rewrites it from its rows
        for gi, s, e in b.segments:
            for j, x in enumerate(rows[gi]):
                if isinstance(x, Tensor):
                    table[s:e, j].copy_(x.reshape(()))
        return table
