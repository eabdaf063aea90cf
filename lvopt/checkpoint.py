"""Validation of optimizer checkpoints before ``load_state_dict`` changes anything.

``lvopt.AdamW.load_state_dict`` and ``lvopt.AdamH.load_state_dict`` call :func:`validated`
first: every problem of the checkpoint is collected, and if there is one, a single
:class:`CheckpointError` names them all (group, parameter index and name, state key, what was
expected, what was found) and the optimizer is left exactly as it was. What is checked, and
why, is in docs/checkpoints.md. This module only reads: it never writes to the optimizer or to
the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Iterator

import torch
from torch import Tensor

from . import _validate

__all__ = ["CheckpointError", "problems", "validated"]

# Keys every parameter state of AdamW/AdamH must carry once it is not empty.
REQUIRED_KEYS = ("step", "exp_avg", "exp_avg_sq")
# Hyperparameters a param group must carry: the step reads them with group[key] (the others
# have defaults, filled in by __setstate__ on load).
REQUIRED_HYPER = ("lr", "betas", "eps", "weight_decay", "maximize")
# An otherwise valid group, into which one saved hyperparameter at a time is put to name every
# bad one (the optimizer's own rules, _validate.check_hyper, decide; nothing is re-implemented).
_GOOD_GROUP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False)
# Value scans go through a moment in pieces of this many elements (bounded temporaries).
_CHUNK = 1 << 22
# Most problems listed in the error message (all are in CheckpointError.problems).
_MAX_LISTED = 50


class CheckpointError(ValueError):
    """An optimizer checkpoint that ``load_state_dict`` refused; nothing was changed.
    ``problems`` lists every problem found, one string each."""

    def __init__(self, problems: list):
        self.problems = list(problems)
        listed = self.problems[:_MAX_LISTED]
        more = len(self.problems) - len(listed)
        super().__init__(
            f"lvopt: refused to load the optimizer checkpoint ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}); the optimizer's state and param_groups are "
            f"unchanged (what is checked: docs/checkpoints.md):\n  - "
            + "\n  - ".join(listed)
            + (f"\n  ... and {more} more (CheckpointError.problems)" if more > 0 else "")
        )


@contextlib.contextmanager
def validated(opt: torch.optim.Optimizer, state_dict) -> Iterator[dict]:
    """Runs ``opt``'s load_state_dict pre-hooks (as torch's load_state_dict would: validation
    sees the dict that will be loaded), raises :class:`CheckpointError` if that dict has any
    problem, and otherwise yields it with the pre-hooks held off, so that torch's
    ``load_state_dict`` inside the ``with`` block does not run them a second time."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            [f"the checkpoint must be a dict (optimizer.state_dict()), got {type(state_dict).__name__}"]
        )
    state_dict = dict(state_dict)  # shallow copy, as torch's load_state_dict makes
    hooks = opt._optimizer_load_state_dict_pre_hooks
    for hook in hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    found = problems(opt, state_dict)
    if found:
        raise CheckpointError(found)
    # The same dict object goes back afterwards: RemovableHandles refer to it.
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    try:
        yield state_dict
    finally:
        opt._optimizer_load_state_dict_pre_hooks = hooks


def problems(opt: torch.optim.Optimizer, state_dict: Mapping) -> list:
    """Every problem of ``state_dict`` as a checkpoint for ``opt`` (empty: it may be loaded)."""
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        return [
            f"the checkpoint has no {' and no '.join(repr(k) for k in missing)} (expected what "
            f"optimizer.state_dict() returns), keys: {sorted(map(str, state_dict))}"
        ]
    saved_groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)):
        return [f"'param_groups' must be a list of dicts, got {type(saved_groups).__name__}"]
    if not isinstance(state, Mapping):
        return [f"'state' must be a dict, got {type(state).__name__}"]
    if len(saved_groups) != len(opt.param_groups):
        # (torch's words, so that code matching them keeps working)
        return [
            f"loaded state dict has a different number of parameter groups: {len(saved_groups)} in the "
            f"checkpoint, {len(opt.param_groups)} in the optimizer"
        ]
    out = []
    mapped = True  # whether each saved state can be paired with its parameter (as torch pairs them)
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            out.append(f"param group {gi}: must be a dict with a list 'params', got {type(saved).__name__}")
            mapped = False
        elif len(saved["params"]) != len(group["params"]):
            out.append(
                f"loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                f"group: param group {gi} has {len(saved['params'])} parameters in the checkpoint, "
                f"{len(group['params'])} in the optimizer"
            )
            mapped = False
        else:
            out += _group_problems(saved, f"param group {gi}", opt._is_hyperball_group(saved), _validate.check_hyper)
    if not mapped:
        return out
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        names = saved.get("param_names", group.get("param_names"))
        for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            st = state.get(pid)
            if st is None or (isinstance(st, Mapping) and not st):
                continue  # no state yet: the first step creates it
            where = opt._where({"param_names": names}, gi, pi, p)
            out += [f"{where}: {msg}" for msg in _state_problems(st, p)]
    return out


def _group_problems(saved: Mapping, where: str, hyperball: bool, check) -> list:
    """The hyperparameter problems of one saved group, by the optimizer's own rules (``check``
    is lvopt/_validate.py check_hyper, which stops at the first problem: each saved hyperparameter is then
    tried alone in an otherwise valid group, so that every bad one is named)."""
    out = [f"{where}: missing hyperparameter '{k}'" for k in REQUIRED_HYPER if k not in saved]
    try:
        check({**_GOOD_GROUP, **saved}, where, hyperball)
        return out
    except (ValueError, TypeError, KeyError) as e:
        first = f"{where}: missing hyperparameter {e}" if isinstance(e, KeyError) else str(e)
    found = []
    for key in saved:
        if key in ("params", "param_names"):
            continue
        try:
            check({**_GOOD_GROUP, key: saved[key]}, where, hyperball)
        except (ValueError, TypeError, KeyError) as e:
            found.append(str(e))
    # A combination that only fails together (e.g. decoupled_weight_decay=False with decay).
    return out + (found or [first])


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}" if isinstance(t, (int, float)) else type(t).__name__


def _number(x, key: str, out: list):
    """``x`` (a number or one-element tensor) as a float, or None with a problem appended."""
    if isinstance(x, Tensor):
        if x.numel() != 1 or not x.is_floating_point():
            out.append(f"'{key}' is {_describe(x)}; expected a one-element floating-point tensor or a number")
            return None
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        out.append(f"'{key}' is {_describe(x)}; expected a number or a one-element tensor")
        return None
    return float(x)


def _accepted_moment_dtypes(p: Tensor) -> tuple:
    """Moment dtypes that convert exactly to the moments lvopt keeps (fp32; fp64 for an fp64
    parameter): a torch bf16 checkpoint's bf16 moments are widened on load."""
    if p.dtype == torch.float64:
        return (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    return (torch.float32, torch.bfloat16, torch.float16)


def _counts(t: Tensor, negative: bool) -> tuple:
    """(NaN/inf elements, negative elements when ``negative``, smallest value) of ``t``. One
    aminmax pass (NaN propagates through it; no temporaries) and one host synchronisation
    decide; only a tensor with a problem is scanned again, in pieces, to count."""
    from .optim import _local

    flat = _local(t).detach().reshape(-1)
    if flat.numel() == 0:  # an empty tensor, or a rank's empty shard of an FSDP2 DTensor
        return 0, 0, 0.0
    lo, hi = torch.stack(torch.aminmax(flat)).tolist()
    if math.isfinite(lo) and math.isfinite(hi) and not (negative and lo < 0):
        return 0, 0, lo
    nonfinite = torch.zeros((), dtype=torch.int64, device=flat.device)
    neg = torch.zeros((), dtype=torch.int64, device=flat.device)
    for c in flat.split(_CHUNK):
        nonfinite += (~torch.isfinite(c)).sum()
        if negative:
            neg += (c < 0).sum()
    nf, ng = torch.stack([nonfinite, neg]).tolist()
    low = float(flat.float().nan_to_num(nan=0.0).min()) if ng else 0.0
    return nf, ng, low


def _state_problems(st, p: Tensor) -> list:
    """The problems of one parameter's saved state ``st`` (non-empty) against the parameter."""
    if not isinstance(st, Mapping):
        return [f"the state must be a dict, got {type(st).__name__}"]
    out = [
        f"state has no '{k}' (a state that is not empty needs {', '.join(REQUIRED_KEYS)})"
        for k in REQUIRED_KEYS
        if k not in st
    ]
    step = None
    if "step" in st:
        s = st["step"]
        step = _number(s, "step", out)
        if step is not None and isinstance(s, Tensor) and s.dtype not in (torch.float32, torch.float64):
            out.append(f"'step' is a {s.dtype} tensor; expected float32 or float64 (as torch.optim writes it)")
            step = None
        elif step is not None and not (math.isfinite(step) and step >= 0 and step == math.floor(step)):
            out.append(f"'step' is {step}; expected a whole number >= 0 (the count of steps taken)")
            step = None
    for key in ("exp_avg", "exp_avg_sq"):
        t = st.get(key)
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            out.append(
                f"'{key}' is {_describe(t) if not isinstance(t, Tensor) else f'a {t.layout} tensor'}; "
                f"expected a dense tensor shaped like the parameter"
            )
            continue
        bad_shape = t.shape != p.shape
        if bad_shape:
            out.append(f"'{key}' has shape {tuple(t.shape)}; expected the parameter's shape {tuple(p.shape)}")
        accepted = _accepted_moment_dtypes(p)
        if t.dtype not in accepted:
            out.append(
                f"'{key}' has dtype {t.dtype}; expected {accepted[0]} for a {p.dtype} parameter "
                f"(also accepted, converted exactly on load: "
                f"{', '.join(str(d) for d in accepted[1:])})"
            )
        elif t.numel():
            nonfinite, negative, low = _counts(t, negative=key == "exp_avg_sq")
            if nonfinite:
                out.append(
                    f"'{key}' has {nonfinite} NaN or infinite element{'s' if nonfinite > 1 else ''} "
                    f"(of {t.numel()}); expected finite moments"
                )
            if negative:
                out.append(
                    f"'{key}' has {negative} negative element{'s' if negative > 1 else ''} "
                    f"(of {t.numel()}, smallest {low:.6g}); a second moment is >= 0"
                )
    if "radius" in st:
        r = _number(st["radius"], "radius", out)
        # R = 0 is a zero matrix, which AdamH keeps at zero (docs/design.md section 2.2).
        if r is not None and not (math.isfinite(r) and r >= 0):
            out.append(
                f"'radius' is {r}; expected a finite number >= 0 (the matrix's Frobenius norm "
                f"at its first hyperball step)"
            )
    if "last_step" in st:
        out += _last_step_problems(st["last_step"], p, step)
    if "row_clock" in st:
        out.append(
            "'row_clock' is in-memory exact-mode bookkeeping and not part of a checkpoint; save "
            "with optimizer.state_dict() (which brings every row current and leaves it out)"
        )
    return out


def _last_step_problems(last, p: Tensor, step) -> list:
    """Sparse-row bookkeeping, should a checkpoint carry it (optimizer.state_dict() leaves it
    out): one int64 step per row of a 2-D table, each in [0, step]."""
    if p.dim() != 2:
        return [
            f"'last_step' (per-row sparse bookkeeping) given for a {p.dim()}-D parameter; only a 2-D "
            f"embedding table has rows"
        ]
    if not isinstance(last, Tensor) or last.dtype != torch.int64 or tuple(last.shape) != (p.shape[0],):
        return [
            f"'last_step' is {_describe(last)}; expected an int64 tensor of shape ({p.shape[0]},), one step per row"
        ]
    if last.numel() == 0 or step is None:
        return []
    lo, hi = (int(v) for v in torch.stack([last.min(), last.max()]).tolist())
    out = []
    if lo < 0:
        out.append(
            f"'last_step' has {int((last < 0).sum())} negative rows (smallest {lo}); expected 0 <= last_step <= step"
        )
    if hi > step:
        out.append(
            f"'last_step' has {int((last > step).sum())} rows ahead of 'step' = {step:g} (largest {hi}); "
            f"a row's last step is at most the parameter's step"
        )
    return out
