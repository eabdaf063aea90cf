"""lvopt.AdamW and lvopt.AdamH: drop-in ``torch.optim`` optimizers over fused kernels.

A step validates every parameter of every group first (nothing is written if anything is
wrong), then builds one per-tensor hyperparameter table and calls one fused op for all
groups. State names and layout are torch.optim.AdamW's (``step``, ``exp_avg``,
``exp_avg_sq``; AdamH adds ``radius``), so checkpoints move both ways.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict, defaultdict
from itertools import chain
from typing import Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from . import _backend, _fast_step, _memory, _shards, _validate, checkpoint
from ._layout import HYPER_COLS
from ._validate import MOMENTS as _MOMENTS
from ._validate import is_dtensor as _is_dtensor
from ._validate import moment_dtype as _moment_dtype
from .sparse import ROW_KEYS, SparseRows

# Keys torch.optim.AdamW keeps in every param group. lvopt keeps them too, so that a torch
# AdamW can load an lvopt checkpoint (its __setstate__ would otherwise default
# decoupled_weight_decay to False and turn AdamW into Adam with L2).
_TORCH_GROUP_DEFAULTS = dict(
    amsgrad=False, foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True
)

_SKIP = object()


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or inf under nonfinite="raise"; nothing was written."""


class DenseEmbeddingGradWarning(UserWarning):
    """An lvopt.nn.Embedding weight received a dense gradient and is updated densely."""


class _FusedAdam(torch.optim.Optimizer):
    """Shared machinery of lvopt.AdamW and lvopt.AdamH."""

    _group_extra_defaults: dict = {"sparse_mode": "exact"}

    def __init__(
        self,
        params,
        defaults: dict,
        backend: str | None,
        nonfinite: str = "propagate",
        track: bool = False,
        check_ids: str = "deferred",
    ):
        _validate.check_settings(nonfinite, check_ids, backend)
        self.nonfinite = nonfinite
        self.track = bool(track)
        self.check_ids = check_ids
        self._init_transient()
        self.skipped_steps = 0
        self.backend = backend
        _validate.check_hyper(defaults, "defaults", hyperball=self._is_hyperball_group(defaults))
        super().__init__(params, defaults)

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs):
        """An optimizer for ``model`` whose groups carry per-role learning rates scaled by a
        width rule (``"mup"``, the default; ``"lv"``, ``"sp"``, ...): see :func:`lvopt.scaling.from_model`."""
        from .scaling import from_model

        return from_model(cls, model, **kwargs)

    # -- group handling -------------------------------------------------------------------------
    @staticmethod
    def _is_hyperball_group(group: dict) -> bool:
        return False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._fast = None
        group = self.param_groups[-1]
        _validate.check_hyper(group, f"param group {len(self.param_groups) - 1}", self._is_hyperball_group(group))

    _OWN_ATTRS = {
        "backend": None,
        "nonfinite": "propagate",
        "track": False,
        "skipped_steps": 0,
        "check_ids": "deferred",
    }

    def _init_transient(self) -> None:
        """What neither pickling nor a checkpoint carries: telemetry, its hooks, the flags, the
        cached hyperparameter tables."""
        #: The last tracked step's norms (track=True), a :class:`lvopt.telemetry.Telemetry`.
        self.telemetry = None
        self._telemetry_hooks: OrderedDict = OrderedDict()  # weakref-able, for RemovableHandle
        self._found_flags: dict = {}
        self._skip_counts: dict = {}  # device -> skipped steps counted on that device (float64)
        self._skipped_host = 0
        self._tables: dict = {}  # batch key -> (the constant part of its rows, the table tensor)
        self._step_number = 0
        self._fast = None  # the steady-state Triton step (lvopt/_fast_step.py), built by a full step
        #: The row lifecycle of the row-sparse parameters (lvopt/sparse.py).
        self._rows = SparseRows(self)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/inf (nonfinite="skip"). A step that decides
        on the device (no sparse gradients, one device, no FSDP, track=False: the capturable
        path) counts the skip on the device; reading this property then reads that counter
        (one host synchronisation on a GPU, only when asked)."""
        return self._skipped_host + sum(int(c.item()) for c in self._skip_counts.values())

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_host = int(value)
        for c in self._skip_counts.values():
            c.zero_()

    def __getstate__(self) -> dict:
        # torch pickles defaults, state and param_groups only; keep lvopt's settings too.
        st = super().__getstate__()
        st.update({k: getattr(self, k) for k in self._OWN_ATTRS})
        return st

    def __setstate__(self, state: dict) -> None:
        own = {k: state.pop(k, default) for k, default in self._OWN_ATTRS.items()}
        super().__setstate__(state)
        self._init_transient()
        for k, v in own.items():
            setattr(self, k, v)
        for group in self.param_groups:
            for k, v in chain(_TORCH_GROUP_DEFAULTS.items(), self._group_extra_defaults.items()):
                group.setdefault(k, v)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=_get_scalar_dtype(), device=_step_device(p))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but moments stay fp32 (and ``radius`` fp64) whatever the parameter dtype:
        torch casts every floating state tensor to the parameter's dtype, which would round a
        bf16 model's fp32 moments to bf16. A torch bf16 checkpoint's moments are widened.
        Every state tensor is a copy: torch would share tensors (the step counts among them)
        with an in-memory ``state_dict`` of a live optimizer, and two optimizers would then
        advance one counter.

        The checkpoint is validated first (lvopt/checkpoint.py, docs/checkpoints.md): a
        :class:`lvopt.CheckpointError` names every problem and nothing is changed. Only the
        state and param_groups change: torch's load goes through ``__setstate__``, which (for
        unpickling) resets lvopt's own settings, so ``nonfinite``, ``backend``, ``track``,
        ``skipped_steps`` and the telemetry hooks are put back afterwards."""
        kept = {k: v for k, v in self.__dict__.items() if k not in ("state", "param_groups")}
        with checkpoint.validated(self, state_dict) as state_dict:
            super().load_state_dict(state_dict)
        self.__dict__.update(kept)
        self._fast = None
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            st = self.state[p]
            if "step" in saved and torch.is_tensor(st.get("step")) and st["step"] is saved["step"]:
                st["step"] = st["step"].clone()
            if torch.is_tensor(st.get("step")) and st["step"].device != _step_device(p):
                # A CUDA parameter's step lives on its device (torch's fused/capturable layout).
                st["step"] = st["step"].to(_step_device(p))
            for key in _MOMENTS + ("max_exp_avg_sq",):
                if key in saved:
                    st[key] = saved[key].to(device=p.device, dtype=_moment_dtype(p), copy=True)
            if "radius" in saved:
                st["radius"] = saved["radius"].to(
                    device="cpu" if p.device.type == "cpu" else p.device, dtype=torch.float64, copy=True
                )

    # -- the step -------------------------------------------------------------------------------
    _where = staticmethod(_validate.where)

    def _backend_for(self, device: torch.device, cache: dict | None = None) -> tuple:
        """(backend name, its dtypes) for tensors on ``device``; ``cache`` keeps one step's answers
        (a GPT-2 step has 148 tensors on one device)."""
        if cache is not None and device in cache:
            return cache[device]
        name = self.backend if self.backend is not None else _backend.default_for(device)
        _backend.check_available(name)
        out = (name, _backend.supported_dtypes(name), _backend.device_ok(name, device))
        if cache is not None:
            cache[device] = out
        return out

    def _check_param(self, p: Tensor, where, group: dict | None = None, cache: dict | None = None) -> str:
        """Checks one parameter and its gradient and state (lvopt/_validate.py check_param); ``where()``
        names the parameter in an error (built only when one is raised)."""
        hyperball = group is not None and self._is_hyperball_group(group)
        return _validate.check_param(
            p,
            where,
            hyperball,
            lambda device: self._backend_for(device, cache),
            lambda g, backend: self._rows.check_grad(p, g, backend, group, where, hyperball),
            self.state.get(p),
        )

    def _collect(self):
        """Every parameter with a gradient, validated, as (hyper row, p, backend, algorithm,
        group, group index, index in group).
        Raises before anything is written."""
        items = []
        cache: dict = {}
        for gi, group in enumerate(self.param_groups):
            hyperball = self._is_hyperball_group(group)
            row = _validate.check_hyper(group, f"param group {gi}", hyperball, read=False)
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = functools.partial(self._where, group, gi, pi, p)
                backend = self._check_param(p, where, group, cache)
                if p.grad.layout == torch.sparse_coo:
                    _validate.check_sparse_amsgrad(group, where)
                    algo = "sparse"
                else:
                    algo = "adamh" if hyperball and p.dim() >= 2 else "adamw"
                items.append((row, p, backend, algo, group, gi, pi))
        return items

    def _init_state(self, p: Tensor, algo: str, amsgrad: bool = False, sharded: bool = False) -> dict:
        st = self.state[p]
        if not st:
            # On the parameter's device for CUDA parameters (torch's fused/capturable layout:
            # the kernels advance it there), on the host otherwise.
            st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device=_step_device(p))
            dt = _moment_dtype(p)
            # torch.zeros_like, on transparent huge pages with LVOPT_CPU_HUGEPAGES=1 (lvopt/_memory.py).
            st["exp_avg"] = _memory.zeros(p, dt)
            st["exp_avg_sq"] = _memory.zeros(p, dt)
        if amsgrad and "max_exp_avg_sq" not in st:
            # torch.optim.AdamW(amsgrad=True)'s state: the running maximum of exp_avg_sq (zeros
            # at the first step, as torch; a group switched to amsgrad later starts from zeros too).
            st["max_exp_avg_sq"] = _memory.zeros(st["exp_avg_sq"], st["exp_avg_sq"].dtype)
        if algo == "adamh" and "radius" not in st:
            # R = ||W_0||_F, recorded at the matrix's first hyperball step (docs/design.md section 2.2).
            # On the parameter's device for CUDA parameters (read there by the kernels), else the host.
            # A sharded matrix: its shard's ||W_0||^2 here, made R by one all-reduce over the
            # shards of all new matrices (lvopt/_shards.py finish_radii) before the step writes.
            local = _local(p)
            st["radius"] = (
                _shards.local_radius_squared(local, _step_device(local))
                if sharded
                else torch.linalg.vector_norm(local.detach(), dtype=torch.float64).to(_step_device(p))
            )
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rows.raise_pending()
        if self._fast is not None and self._fast.run(self):
            return loss  # the steady-state Triton step (lvopt/_fast_step.py)
        self._fast = None
        items = self._collect()
        # Sharded (FSDP2) hyperball matrices: their per-tensor sums are all-reduced over one
        # process group between the two passes (lvopt/_shards.py); checked here, before writing.
        shard_group, shard_ids = _shards.hyperball_group(
            (p, functools.partial(self._where, group, gi, pi, p))
            for row, p, backend, algo, group, gi, pi in items
            if algo == "adamh" and _is_dtensor(p)
        )
        # Nothing has been written so far; from here on, every check has passed.
        batches: dict = defaultdict(lambda: defaultdict(list))
        sparse_items = []
        to_flush = []  # exact-mode tables that got a dense gradient: rows must be current first
        created = []  # parameters whose state this step creates (dropped again if it is skipped)
        sharded = False  # FSDP2 DTensors: the ranks must agree on skipping
        new_radii = []  # local ||W_0||^2 of sharded matrices stepped for the first time
        for row, p, backend, algo, group, gi, pi in items:
            sharded = sharded or _is_dtensor(p)
            if algo == "sparse":
                # The row-sparse step takes its hyperparameters as host numbers; a capturable
                # group's as given (its device tensors are copied into a device row, not read).
                sparse_items.append((row if group.get("capturable") else _host_row(row), p, backend, group, gi, pi))
                continue
            if "last_step" in self.state.get(p, {}):
                to_flush.append((p, backend))
            if getattr(p, "_lvopt_embedding", False) and not getattr(p, "_lvopt_dense_warned", False):
                p._lvopt_dense_warned = True
                warnings.warn(
                    "lvopt: the weight of an lvopt.nn.Embedding received a dense gradient (most likely "
                    "it is tied to the output layer, whose gradient covers all rows), so it is updated "
                    "densely with AdamW; the row-sparse step applies to untied input embeddings only",
                    DenseEmbeddingGradWarning,
                    stacklevel=2,
                )
            if not self.state.get(p):
                created.append(p)
            amsgrad = algo == "adamw" and bool(group.get("amsgrad", False))
            split = id(p) in shard_ids  # AdamH in two ops, the sums all-reduced in between
            if split and "radius" not in self.state.get(p, {}):
                new_radii.append(p)
            st = self._init_state(p, algo, amsgrad, sharded=split)
            if st["step"].device != _step_device(p):
                # A host counter of a CUDA parameter (an old pickle or checkpoint): onto the
                # device once, as torch.compile does for torch's optimizers.
                st["step"] = st["step"].to(_step_device(p))
            # FSDP2 shards (DTensors) step their local shard: AdamW is elementwise.
            local = _local(p)
            work = local if _dense(local) else local.detach().contiguous()
            b = batches[(backend, p.device, algo, amsgrad, split)]
            b["params"].append(work)
            b["orig"].append(local)
            b["grads"].append(_like(_local(p.grad), work))
            for key in _MOMENTS + (("max_exp_avg_sq",) if amsgrad else ()):
                if _local(st[key]).stride() != work.stride():
                    st[key] = _like(st[key], work)
                b[key].append(_local(st[key]))
            b["steps"].append(st["step"])
            b["rows"].append(row)
            b["where"].append((group, gi, pi))
            if algo == "adamh":
                b["radii"].append(st["radius"])
                b["backend"] = backend
        if new_radii:
            _shards.finish_radii([self.state[p]["radius"] for p in new_radii], shard_group)
        order = list(batches)
        fused_check = None
        found = None  # the device flag of a step that decides about non-finite values on the device
        if self.nonfinite != "propagate":
            if self._decides_on_device(order, sparse_items, to_flush, sharded):
                # Every op gets the flag and writes nothing when it is set; the batches after the
                # first are scanned into it before anything runs, the first scans its own
                # gradients inside its op. No host read (nonfinite="raise" reads it at the end).
                found = self._found_for(order[0][1])
                fused_check = max(order, key=lambda k: sum(t.numel() for t in batches[k]["params"]))
                order.remove(fused_check)
                for key in order:
                    _backend.ops(key[0]).nonfinite_scan_(batches[key]["grads"], found)
                order.insert(0, fused_check)
            else:
                fused_check = self._check_nonfinite(batches, order, sparse_items, bool(to_flush), sharded)
                if fused_check is _SKIP:
                    return self._skip_step(created, items, loss)
                if fused_check is not None:
                    # The batch that scans its gradients inside its own op runs first: if it finds a
                    # non-finite value, nothing else has been written yet.
                    order.remove(fused_check)
                    order.insert(0, fused_check)
        for p, backend in to_flush:
            self._rows.flush_param(p, backend)
            self._rows.drop(p)
        tracked: list = []
        split_batches = []  # (batch, local sums) of sharded AdamH: pass 2 after the all-reduce
        for key in order:
            backend, device, algo, amsgrad, split = key
            b = batches[key]
            fns = _backend.ops(backend)
            hyper = b["hyper"] = self._hyper_table(key, b["rows"], _table_device_for(backend, device))
            if found is not None:
                flag = found
            else:
                flag = self._found_for(device) if key == fused_check else None
            if algo == "adamh" and split:
                # Pass 1 only; a sharded step decides on non-finite values on the host (flag None).
                split_batches.append(
                    (
                        b,
                        fns.fused_adamh_reduce_(
                            b["params"], b["grads"], b["exp_avg"], b["exp_avg_sq"], b["steps"], hyper
                        ),
                    )
                )
                continue
            if algo == "adamh":
                extra = {} if flag is None else {"found_inf": flag}
                sums = fns.fused_adamh_(
                    b["params"], b["grads"], b["exp_avg"], b["exp_avg_sq"], b["steps"], b["radii"], hyper, **extra
                )
            else:
                sums = self._new_stats(len(b["params"]), device) if self.track else None
                extra = {k: v for k, v in (("found_inf", flag), ("stats", sums)) if v is not None}
                if amsgrad:
                    extra["max_exp_avg_sqs"] = b["max_exp_avg_sq"]
                fns.fused_adamw_(b["params"], b["grads"], b["exp_avg"], b["exp_avg_sq"], b["steps"], hyper, **extra)
            if found is None and flag is not None and bool(flag):
                # The fused scan found a non-finite gradient: the op wrote nothing, and nothing
                # ran before it.
                return self._skip_step(created, items, loss)
            for work, p in zip(b["params"], b["orig"]):
                if work is not p:
                    p.copy_(work)
            if self.track:
                tracked.append((algo, b, sums))
        if split_batches:
            # One all-reduce of every sharded matrix's (||u||^2, <W,u>, ||W||^2): the sums of the
            # whole matrices, with which pass 2 takes the unsharded step.
            totals = _shards.all_reduce_sums([s for b, s in split_batches], shard_group)
            for (b, _), sums in zip(split_batches, totals):
                _backend.ops(b["backend"]).fused_adamh_apply_(
                    b["params"], b["exp_avg"], b["exp_avg_sq"], b["steps"], b["radii"], b["hyper"], sums
                )
                for work, p in zip(b["params"], b["orig"]):
                    if work is not p:
                        p.copy_(work)
                if self.track:
                    tracked.append(("adamh", b, sums))
        if found is not None:
            if self.nonfinite == "raise":
                if bool(found):  # the one host read of nonfinite="raise"
                    return self._skip_step(created, items, loss)
            else:
                counts = self._skip_counts.get(found.device)
                if counts is None:
                    counts = self._skip_counts[found.device] = torch.zeros((), dtype=torch.float64, device=found.device)
                counts.add_(found.reshape(()))
        for row, p, backend, group, gi, pi in sparse_items:
            sums = self._rows.step(row, p, backend, group, self.track)
            if self.track:
                tracked.append(("sparse", {"where": [(group, gi, pi)]}, sums))
        self._step_number += 1
        if self.track:
            self._record(tracked)
        self._fast = _fast_step.build(self, batches, items, sparse_items, to_flush, sharded)
        return loss

    def _decides_on_device(self, order: list, sparse_items: list, to_flush: list, sharded: bool) -> bool:
        """Whether a nonfinite="skip"/"raise" step decides on the device, with no host read (what
        a CUDA graph or torch.compile needs): dense batches on one device, no sparse-row step or
        exact-mode flush (they read the host), no FSDP shards (the ranks' flags are all-reduced
        first) and no telemetry (a skipped tracked step records nothing). A step that decides on
        the device counts a skip on the device (:attr:`skipped_steps`) and keeps the zero state
        of parameters it stepped for the first time (torch's fused Adam does the same with
        found_inf); the other path drops it."""
        return (
            bool(order)
            and not sparse_items
            and not to_flush
            and not sharded
            and not self.track
            and len({k[1] for k in order}) == 1
        )

    def _hyper_table(self, key: tuple, rows: list, device: torch.device) -> Tensor:
        """The batch's [n, HYPER_COLS] float64 hyperparameter table on ``device``, built without a
        blocking copy and reused across steps: the table of a batch is cached with its rows'
        Python-number values and rewritten in place only when one changes (for a CUDA table,
        from pinned memory, asynchronously: a captured graph keeps reading the same tensor).
        Tensor-valued hyperparameters (a tensor lr) are written into their column on the
        table's device every step, never read on the host."""
        n = len(rows)
        has_tensor = False
        consts = []
        for r in rows:
            c = tuple(None if isinstance(x, Tensor) else x for x in r)
            has_tensor = has_tensor or None in c
            consts.append(c)
        values = [[0.0 if x is None else x for x in c] for c in consts]
        if torch.compiler.is_compiling():
            table = torch.tensor(values, dtype=torch.float64, device=device).reshape(n, HYPER_COLS)
        else:
            ent = self._tables.get(key)
            if ent is not None and ent[0] == consts and ent[1].device == device:
                table = ent[1]
            else:
                host = torch.tensor(values, dtype=torch.float64).reshape(n, HYPER_COLS)
                cuda = device.type == "cuda"
                if cuda:
                    host = host.pin_memory()
                if ent is not None and ent[1].shape == host.shape and ent[1].device == device:
                    table = ent[1]
                    table.copy_(host, non_blocking=cuda)
                else:
                    table = host.to(device, non_blocking=True) if cuda else host
                self._tables[key] = (consts, table)
        if has_tensor:
            for j in range(HYPER_COLS):
                i = 0
                while i < n:
                    x = rows[i][j]
                    if not isinstance(x, Tensor):
                        i += 1
                        continue
                    k = i + 1
                    while k < n and rows[k][j] is x:
                        k += 1
                    table[i:k, j].copy_(x.reshape(()))
                    i = k
        return table

    # -- non-finite gradients and telemetry -------------------------------------------------------
    def _found_for(self, device: torch.device) -> Tensor:
        found = self._found_flags.get(device)
        if found is None:
            found = self._found_flags[device] = torch.zeros(1, dtype=torch.float32, device=device)
        else:
            found.zero_()
        return found

    def _check_nonfinite(self, batches: dict, order: list, sparse_items: list, prescan_all: bool, sharded: bool):
        """Looks for NaN/inf gradients before anything is written. The largest dense batch is
        left to scan its gradients inside its own op (no separate pass over the bulk of the
        bytes): returns its key, or _SKIP when a pre-scan already found a non-finite value, or
        None when everything was pre-scanned clean. With sharded (FSDP2) parameters every batch
        is pre-scanned and the flag is all-reduced (MAX), so that all ranks skip together."""
        fused = None
        if order and not prescan_all and not sharded:
            fused = max(order, key=lambda k: sum(t.numel() for t in batches[k]["params"]))
        flags: dict = {}  # one flag per device, zeroed once: the scans accumulate into it

        def flag(device):
            if device not in flags:
                flags[device] = self._found_for(device)
            return flags[device]

        for key in order:
            if key != fused:
                backend, device = key[:2]
                _backend.ops(backend).nonfinite_scan_(batches[key]["grads"], flag(device))
        for row, p, backend, group, gi, pi in sparse_items:
            _backend.ops(backend).nonfinite_scan_([p.grad._values()], flag(p.device))
        if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
            for f in flags.values():
                torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MAX)
        if any(bool(f) for f in flags.values()):
            return _SKIP
        return fused

    def _skip_step(self, created: list, items: list, loss):
        """A gradient was not finite: nothing was written. Raise, or count the skipped step."""
        for p in created:
            self.state.pop(p, None)
        if self.nonfinite == "raise":
            bad = []
            for row, p, backend, algo, group, gi, pi in items:
                g = p.grad._values() if p.grad.layout == torch.sparse_coo else _local(p.grad)
                n = int((~torch.isfinite(g)).sum())
                if n:
                    bad.append(
                        f"{self._where(group, gi, pi, p)}: {n} of {g.numel()} gradient elements are NaN or infinite"
                    )
            raise NonFiniteGradientError(
                "lvopt: non-finite gradient; nonfinite='raise' stopped the step before anything was "
                "written (parameters, moments and step counts are unchanged; nonfinite='skip' would skip "
                "such steps and count them in skipped_steps):\n  " + "\n  ".join(bad)
            )
        self.skipped_steps += 1
        return loss

    @staticmethod
    def _new_stats(n: int, device: torch.device) -> Tensor:
        return torch.zeros(n, 2, dtype=torch.float64, device=device)

    def _record(self, tracked: list) -> None:
        """Builds this step's Telemetry from the kernels' sums and calls the hooks."""
        from .telemetry import Entry, Telemetry

        entries, parts = [], []
        for algo, b, sums in tracked:
            for group, gi, pi in b["where"]:
                names = group.get("param_names")
                name = names[pi] if names is not None and pi < len(names) else None
                entries.append(Entry(gi, pi, name, group.get("role"), algo))
            if algo == "adamh":
                # (||u||^2, <W,u>, ||W||^2) -> (||W||^2, (lr R)^2): the tangent step has norm lr*R.
                lr = b["hyper"][:, 0].to(device=sums.device, dtype=torch.float64)
                radius = torch.stack([r.to(sums.device, torch.float64).reshape(()) for r in b["radii"]])
                sums = torch.stack([sums[:, 2], (lr * radius) ** 2], dim=1)
            parts.append(sums.reshape(-1, 2))
        devices = {t.device for t in parts}
        if len(devices) > 1:
            parts = [t.cpu() for t in parts]
        all_sums = torch.cat(parts) if parts else torch.zeros(0, 2, dtype=torch.float64)
        self.telemetry = Telemetry(self._step_number, entries, all_sums)
        for hook in list(self._telemetry_hooks.values()):
            hook(self, self.telemetry)

    def register_telemetry_hook(self, hook) -> "torch.utils.hooks.RemovableHandle":
        """Calls ``hook(optimizer, telemetry)`` after every tracked step (``track=True``), e.g.
        :class:`lvopt.telemetry.CSVLogger`. Returns a handle whose ``remove()`` unregisters it."""
        if not self.track:
            raise ValueError(
                "register_telemetry_hook: this optimizer was built with track=False; "
                "pass track=True to compute the norms"
            )
        handle = torch.utils.hooks.RemovableHandle(self._telemetry_hooks)
        self._telemetry_hooks[handle.id] = hook
        return handle

    # -- sparse embedding rows: the row lifecycle lives in lvopt/sparse.py (SparseRows) ----------
    @torch.no_grad()
    def flush(self) -> None:
        """Brings every row of every exact-mode sparse parameter current: afterwards parameters
        and moments are exactly what dense AdamW (g = 0 on untouched rows) would hold. Raises a
        pending deferred error (bad ids of an earlier step) first."""
        self._rows.raise_pending()
        for group in self.param_groups:
            for p in group["params"]:
                self._rows.flush_param(p)

    @torch.no_grad()
    def catch_up(self, param: Tensor, ids: Tensor) -> None:
        """Brings the rows ``ids`` of ``param`` current (exact mode; a no-op otherwise). Call it
        before a forward pass reads them, for an embedding other than lvopt.nn.Embedding (which
        calls it itself). No host synchronisation on a GPU: ids are checked on the device."""
        self._rows.catch_up(param, ids)

    def state_dict(self) -> dict:
        """As torch's, after bringing every row current (flush()), and without the exact-mode
        bookkeeping: the checkpoint holds what a dense AdamW checkpoint would."""
        self.flush()
        sd = super().state_dict()
        sd["state"] = {k: {n: v for n, v in s.items() if n not in ROW_KEYS} for k, s in sd["state"].items()}
        return sd


def _step_device(p: Tensor) -> torch.device:
    """Where a parameter's step counter lives: its CUDA device (the kernels advance it there,
    with no host read: capturable), or the host."""
    return p.device if p.device.type == "cuda" else torch.device("cpu")


def _table_device_for(backend: str, device: torch.device) -> torch.device:
    """Where a dense batch's hyperparameter table goes: the parameters' device for the CUDA and
    Triton kernels (they read it there), the host for the CPU kernels and the reference."""
    return device if backend in ("cuda", "triton") else torch.device("cpu")


def _host_row(row: tuple) -> tuple:
    """A hyperparameter row as host numbers (tensor values read: the row-sparse step's form)."""
    return tuple(float(x) for x in row)


def _local(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory exactly once (any dimension order), so that a kernel
    may treat it as a flat array of numel elements."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with ``ref``'s strides (a copy only when they differ)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


class AdamW(_FusedAdam):
    r"""AdamW with fused kernels; a drop-in for ``torch.optim.AdamW``.

    Same constructor arguments, param groups, LR schedulers, ``zero_grad``, ``maximize``,
    ``amsgrad`` (state ``max_exp_avg_sq``, fused like the rest; not for row-sparse gradients)
    and ``state_dict`` as torch.optim.AdamW (``foreach`` and ``fused`` are accepted and ignored:
    lvopt always fuses; ``differentiable`` is refused). Parameters may be float32 or bfloat16;
    moments are float32.

    ``capturable`` is accepted and changes nothing, because every step is capturable already
    (torch.compile sets it on the groups): a CUDA parameter's ``step`` lives on its device and
    the CUDA and Triton kernels advance it there and compute the bias corrections there; the
    per-tensor hyperparameter table is a device tensor rewritten (asynchronously, from pinned
    memory) only when a value changes; ``lr`` (or any hyperparameter) may be a one-element
    tensor, written into the table on the device every step and never read on the host (its
    value is checked once, when the group is added). So ``opt.step()`` can be captured in a CUDA
    graph and replayed, and ``torch.compile(opt.step, fullgraph=True)`` traces it.

    ``backend``: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``; default: the native
    kernels for the parameters' device. See :func:`lvopt.build_info`.

    Row-sparse gradients (``nn.Embedding(sparse=True)``, :class:`lvopt.nn.Embedding`) step only
    the rows they touch. ``sparse_mode`` (a param-group key): ``"exact"`` (default) gives what
    dense AdamW with g = 0 on untouched rows gives, within fp32 rounding (rows catch up when
    touched, read through lvopt.nn.Embedding or :meth:`catch_up`, :meth:`flush`ed or
    checkpointed); ``"lazy"`` leaves untouched rows alone (SparseAdam with decoupled decay).
    With ``capturable=True`` (a group key) on the cuda and triton backends the sparse step keeps
    its hyperparameters and exact mode's history on the device and is capturable in a CUDA graph
    (docs/sparse-rows.md, "CUDA graphs"); ``sparse_sweep_period`` (a group key, default 1999 for
    the default betas) bounds how many steps a row may lag there.

    ``nonfinite``: what a step does when a gradient holds NaN or inf. ``"propagate"`` (default,
    as torch.optim): nothing special, the values flow into the parameters. ``"skip"``: the step
    writes nothing (parameters, moments, step counts and sparse-row bookkeeping stay bit for bit
    as they were) and :attr:`skipped_steps` counts it. ``"raise"``: nothing is written and
    :class:`NonFiniteGradientError` names every parameter with a non-finite gradient. The check
    is one read of the gradients inside the step op (about +14% of an fp32 AdamW step's bytes).
    For dense gradients on one device (without ``track``), "skip" is decided on the device, as
    torch's fused Adam does with found_inf: the kernels see the flag, write nothing and leave the
    step counters as they were, and the skip is counted on the device; :attr:`skipped_steps`
    reads that counter when asked (one host synchronisation then, none per step). The state a
    skipped first step created stays (zeros, step 0: the same next step). "raise" reads the
    flag once per step on the host, by nature. Steps with row-sparse gradients, FSDP2 shards,
    several devices or ``track=True`` read the flag on the host before writing, as before.

    ``track``: with ``True`` the kernels also return per-tensor ||W|| and ||dW|| (effective
    LR ||dW||/||W||) from the pass they already make: :attr:`telemetry` after each step, and
    :meth:`register_telemetry_hook` (:mod:`lvopt.telemetry`: CSV, TensorBoard).

    ``check_ids``: when the row indices of a sparse gradient are range-checked on a GPU
    (backends ``"cuda"`` and ``"triton"``). ``"deferred"`` (default): on the device, with no
    host synchronisation; a step given an index outside the table writes nothing to that table
    (rows, moments, step count) and the error, naming the parameter and the indices' range, is
    raised by the next :meth:`step`, :meth:`flush` or :meth:`state_dict` (the deferred-error
    model of torch's GradScaler found_inf and FBGEMM's bounds-check "warning" mode; parameters
    of other groups of the failing step have been stepped). ``"sync"``: checked on the host
    before anything is written, at the cost of one synchronisation per sparse parameter and
    step. On the CPU ids are always checked before anything is written.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        sparse_mode: str = "exact",
        nonfinite: str = "propagate",
        track: bool = False,
        check_ids: str = "deferred",
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            sparse_mode=sparse_mode,
        )
        super().__init__(params, defaults, backend, nonfinite, track, check_ids)


class AdamH(_FusedAdam):
    r"""AdamH: Adam on the hyperball (Wen et al. 2026), fused.

    In a param group with ``hyperball=True`` (the default), every parameter with two or more
    dimensions keeps its Frobenius norm R = ||W_0|| (recorded at its first step, state
    ``radius``) and moves by exactly ``lr`` in normalised weight space each step::

        u = (m/bc1) / (sqrt(v/bc2) + eps);  W' = W - lr*R*u/||u||;  W <- R*W'/||W'||

    Hyperball groups take no weight decay (``weight_decay`` must be 0). Parameters with fewer
    than two dimensions, and groups with ``hyperball=False`` (put embeddings and the output
    layer there), take AdamW with the group's ``weight_decay``.

    ``nonfinite`` and ``track`` as for :class:`AdamW` (the effective LR of a hyperball matrix is
    its scheduled lr by construction: the telemetry reports ||dW|| = lr*R for the tangent step).
    """

    _group_extra_defaults = {"hyperball": True, "sparse_mode": "exact"}

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        hyperball: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        sparse_mode: str = "exact",
        nonfinite: str = "propagate",
        track: bool = False,
        check_ids: str = "deferred",
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            hyperball=hyperball,
            sparse_mode=sparse_mode,
        )
        super().__init__(params, defaults, backend, nonfinite, track, check_ids)

    @staticmethod
    def _is_hyperball_group(group: dict) -> bool:
        return bool(group.get("hyperball", True))
