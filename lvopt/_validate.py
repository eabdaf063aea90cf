"""The optimizer's validation (lvopt/optim.py calls it): hyperparameters, constructor settings,
and each parameter with its gradient and state, with errors that name the parameter and the
problem. Every check runs before a step writes anything; the ops check again what they receive
(csrc/include/lvopt/step_args.h and sparse_args.h, lvopt/triton/_common.py). lvopt/checkpoint.py
judges a checkpoint's hyperparameters by the same :func:`check_hyper`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from . import _backend
from .sparse import CHECK_IDS, SPARSE_MODES

NONFINITE_POLICIES = ("propagate", "skip", "raise")
MOMENTS = ("exp_avg", "exp_avg_sq")


def check_settings(nonfinite: str, check_ids: str, backend: str | None) -> None:
    """The optimizer's own constructor settings (``nonfinite``, ``check_ids``, ``backend``)."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if check_ids not in CHECK_IDS:
        raise ValueError(f"check_ids must be one of {CHECK_IDS}, got {check_ids!r}")
    if backend is not None:
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")
        _backend.check_available(backend)


def scalar(x: Any, name: str, where: str, read: bool = True) -> float | Tensor:
    """A hyperparameter as a float; a one-element tensor is read on the host when ``read``, else
    returned as it is (the step builds the hyperparameter table from it on its device: no host
    read, so a CUDA graph or a compiled step keeps following the tensor)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{where}: {name} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
        return float(x) if read else x
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{where}: {name} must be a number, got {type(x).__name__}")
    return float(x)


def check_hyper(group: dict, where: str, hyperball: bool = False, read: bool = True) -> tuple:
    """Validates a group's hyperparameters; returns (lr, beta1, beta2, wd, eps, maximize).
    With ``read=False`` (every step), tensor-valued hyperparameters are returned as tensors and
    their values are not checked here (that would be a host read per step): they were checked
    when the group was added, and the CPU kernel checks the table it receives; on a GPU the
    values of a tensor that changes later are the user's to keep in range, as with torch."""

    def num(x, name):
        return scalar(x, name, where, read)

    lr = num(group["lr"], "lr")
    if not isinstance(lr, Tensor) and (not math.isfinite(lr) or lr < 0.0):
        raise ValueError(f"{where}: invalid learning rate lr={lr}: must be finite and >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    b1, b2 = (num(b, f"betas[{i}]") for i, b in enumerate(betas))
    for i, b in enumerate((b1, b2)):
        if not isinstance(b, Tensor) and not (0.0 <= b < 1.0):
            raise ValueError(f"{where}: invalid beta parameter at index {i}: {b} (must be in [0, 1))")
    eps = num(group["eps"], "eps")
    if not isinstance(eps, Tensor) and (not math.isfinite(eps) or eps <= 0.0):
        raise ValueError(f"{where}: invalid epsilon value eps={eps}: must be finite and > 0")
    wd = num(group["weight_decay"], "weight_decay")
    if not isinstance(wd, Tensor) and (not math.isfinite(wd) or wd < 0.0):
        raise ValueError(f"{where}: invalid weight_decay value {wd}: must be finite and >= 0")
    if hyperball and (isinstance(wd, Tensor) or wd != 0.0):
        raise ValueError(
            f"{where}: weight_decay={wd} given to a hyperball group; AdamH keeps the "
            f"norm of hyperball matrices fixed, so they take no weight decay. Set "
            f"weight_decay=0, or hyperball=False for the group"
        )
    if hyperball and group.get("amsgrad", False):
        raise ValueError(
            f"{where}: amsgrad=True given to a hyperball group; AdamH's hyperball step has "
            f"no AMSGrad variant. Use amsgrad=False, or hyperball=False for the group "
            f"(AdamW, which supports amsgrad)"
        )
    if group.get("differentiable", False):
        raise ValueError(
            f"{where}: differentiable=True is not supported: lvopt's steps are fused kernels "
            f"that autograd does not trace"
        )
    if not group.get("decoupled_weight_decay", True) and wd != 0.0:
        raise ValueError(
            f"{where}: decoupled_weight_decay=False (Adam with L2, e.g. a torch.optim.Adam "
            f"checkpoint) is not supported; lvopt implements AdamW's decoupled decay"
        )
    mode = group.get("sparse_mode", "exact")
    if mode not in SPARSE_MODES:
        raise ValueError(f"{where}: sparse_mode must be one of {SPARSE_MODES}, got {mode!r}")
    period = group.get("sparse_sweep_period")
    if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 1):
        raise ValueError(
            f"{where}: sparse_sweep_period must be a positive int (steps between two catch-ups "
            f"of a row in a capturable exact-mode group), got {period!r}"
        )
    return lr, b1, b2, wd, eps, 1.0 if group["maximize"] else 0.0


def check_param(
    p: Tensor,
    where: Callable[[], str],
    hyperball_group: bool,
    backend_for: Callable,
    check_sparse_grad: Callable,
    state: dict | None,
) -> str:
    """Checks one parameter and its gradient and state and returns its backend's name.
    ``where()`` names the parameter in an error (built only when one is raised);
    ``hyperball_group``: whether its group is an AdamH hyperball group; ``backend_for(device)``
    gives (backend, its dtypes, whether it can step tensors on ``device``);
    ``check_sparse_grad(grad, backend)`` checks a row-sparse gradient (lvopt/sparse.py);
    ``state``: the parameter's optimizer state (None or empty before its first step)."""
    g = p.grad
    sparse = g.layout == torch.sparse_coo
    if g.layout != torch.strided and not sparse:
        raise TypeError(
            f"{where()}: got a {g.layout} gradient; lvopt takes dense gradients and "
            f"row-sparse torch.sparse_coo gradients"
        )
    if is_dtensor(p):
        if sparse:
            raise TypeError(
                f"{where()}: a row-sparse gradient of a sharded (DTensor) parameter is not "
                f"supported; keep the embedding out of fully_shard or give it dense gradients"
            )
    backend, dtypes, device_ok = backend_for(p.device)
    if not device_ok:
        raise TypeError(f"{where()}: backend {backend!r} cannot step tensors on {p.device}")
    if p.dtype not in dtypes:
        raise TypeError(
            f"{where()}: unsupported dtype {p.dtype}; backend {backend!r} supports {', '.join(str(d) for d in dtypes)}"
        )
    if g.dtype != p.dtype:
        raise TypeError(f"{where()}: gradient dtype {g.dtype} differs from the parameter's {p.dtype}")
    if g.device != p.device:
        raise TypeError(f"{where()}: gradient is on {g.device}, parameter on {p.device}")
    if g.shape != p.shape:
        raise ValueError(f"{where()}: gradient shape {tuple(g.shape)} differs from the parameter's")
    if sparse:
        check_sparse_grad(g, backend)
    st = state
    if st:
        for key in MOMENTS:
            t = st.get(key)
            if t is None or t.shape != p.shape or t.device != p.device or t.dtype != moment_dtype(p):
                raise ValueError(
                    f"{where()}: state '{key}' is missing or does not match the parameter "
                    f"({None if t is None else (tuple(t.shape), t.dtype, str(t.device))}); was the wrong "
                    f"state_dict loaded?"
                )
        t = st.get("max_exp_avg_sq")
        if t is not None and (t.shape != p.shape or t.device != p.device or t.dtype != moment_dtype(p)):
            raise ValueError(
                f"{where()}: state 'max_exp_avg_sq' does not match the parameter "
                f"({(tuple(t.shape), t.dtype, str(t.device))}); was the wrong state_dict loaded?"
            )
        if "step" not in st:
            raise ValueError(f"{where()}: state has no 'step'")
        if sparse and not (st["exp_avg"].is_contiguous() and st["exp_avg_sq"].is_contiguous()):
            raise ValueError(f"{where()}: a row-sparse step needs contiguous moments")
    return backend


def check_sparse_amsgrad(group: dict, where: Callable[[], str]) -> None:
    """A row-sparse gradient in an amsgrad group: the sparse-row step has no AMSGrad variant."""
    if group.get("amsgrad", False):
        raise TypeError(
            f"{where()}: amsgrad=True with a row-sparse gradient is not supported "
            f"(the sparse-row step has no AMSGrad variant); give this parameter "
            f"dense gradients or put it in a group with amsgrad=False"
        )


def where(group: dict, gi: int, pi: int, p: Tensor) -> str:
    """How an error names a parameter: index, name (``param_names``), group, shape, dtype, device."""
    names = group.get("param_names")
    name = f" '{names[pi]}'" if names is not None and pi < len(names) else ""
    return f"param {pi}{name} of group {gi} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def moment_dtype(p: Tensor) -> torch.dtype:
    """Moments are fp32 for fp32 and bf16 parameters (fp64 for the fp64 reference oracle)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32
