"""Pure-PyTorch reference steps: the oracle every backend is tested against, and the
``backend="reference"`` fallback (chosen explicitly, never silently).

Each function has the signature and in-place semantics of the custom op of the same name
(``torch.ops.lvopt.<name>``) and follows docs/design.md section 2 literally, one tensor at a time,
in the parameter's precision or fp32, whichever is wider (fp64 parameters give an fp64 oracle).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# The hyperparameter table's columns and the sparse ops' error codes (lvopt/_layout.py).
from ._layout import BETA1, BETA2, EPS, ERR_CLOCK, ERR_IDS, LR, MAXIMIZE, WEIGHT_DECAY


def _compute_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _advance(step: Tensor, row: Sequence[float]):
    step.add_(1)
    t = float(step)
    return 1.0 - row[BETA1] ** t, 1.0 - row[BETA2] ** t


def _moments(g: Tensor, m: Tensor, v: Tensor, row: Sequence[float]) -> None:
    m.mul_(row[BETA1]).add_(g, alpha=1.0 - row[BETA1])
    v.mul_(row[BETA2]).addcmul_(g, g, value=1.0 - row[BETA2])


def _grad(g: Tensor, row: Sequence[float], dtype: torch.dtype) -> Tensor:
    g = g.to(dtype)
    return -g if row[MAXIMIZE] else g


def nonfinite_scan_(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """Sets found_inf to 1 when an element of ``tensors`` is NaN or infinite. Any device, and no
    host synchronisation (the flag is set on the device by masked_fill_)."""
    for t in tensors:
        if t.numel():
            found_inf.masked_fill_(~torch.isfinite(t).all(), 1.0)


def stop_for_nonfinite(found_inf: Tensor | None, grads: Sequence[Tensor]) -> bool:
    """The found_inf protocol of the step ops: when found_inf is given and is already set or a
    gradient element is NaN/inf, it ends up set and the caller must write nothing. The reference
    reads the flag back (one host synchronisation on a GPU); the CPU, CUDA and Triton kernels
    decide on the flag's own device instead (docs/capturable.md)."""
    if found_inf is None:
        return False
    nonfinite_scan_(grads, found_inf)
    return bool(found_inf)


def _square_sums(before: Tensor, after: Tensor) -> tuple:
    """fp64 (sum of before^2, sum of (after - before)^2): the telemetry sums of one tensor."""
    b, a = before.double(), after.double()
    return float((b * b).sum()), float(((a - b) ** 2).sum())


def fused_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    hyper: Tensor,
    found_inf: Tensor | None = None,
    stats: Tensor | None = None,
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
) -> None:
    """AdamW, as torch.optim.AdamW (decoupled weight decay), on every tensor in place.
    ``found_inf``: see :func:`stop_for_nonfinite`; ``stats`` ([n, 2] fp64) receives per tensor
    the sums of W^2 (before the step) and of (W_after - W_before)^2, W as stored.
    ``max_exp_avg_sqs`` (AMSGrad, torch's amsgrad=True): the running maximum of exp_avg_sq,
    updated after it, divides the update instead of exp_avg_sq."""
    if stats is not None:
        stats.zero_()
    vmaxes = list(max_exp_avg_sqs) if max_exp_avg_sqs else [None] * len(params)
    if len(vmaxes) != len(params):
        raise RuntimeError(
            f"lvopt::fused_adamw_: max_exp_avg_sqs has {len(vmaxes)} tensors, params has "
            f"{len(params)} (pass one per parameter for amsgrad, or none)"
        )
    if stop_for_nonfinite(found_inf, grads):
        return
    for i, (p, g, m, v, vmax, step, row) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, vmaxes, steps, hyper.tolist())
    ):
        before = p.clone() if stats is not None else None
        bc1, bc2 = _advance(step, row)
        dt = _compute_dtype(p)
        g = _grad(g, row, m.dtype)
        w = p.to(dt)
        w.mul_(1.0 - row[LR] * row[WEIGHT_DECAY])
        _moments(g, m, v, row)
        if vmax is not None:
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        denom = (v.sqrt() / math.sqrt(bc2)).add_(row[EPS])
        w.addcdiv_(m.to(dt), denom.to(dt), value=-row[LR] / bc1)
        p.copy_(w)
        if stats is not None:
            stats[i, 0], stats[i, 1] = _square_sums(before, p)


def fused_adamh_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    radii: Sequence[Tensor],
    hyper: Tensor,
    found_inf: Tensor | None = None,
) -> Tensor:
    """AdamH (Adam on the hyperball) on every tensor in place; returns the fp64 sums
    (||u||^2, <W,u>, ||W||^2) per tensor, W taken before the step (zeros when ``found_inf``
    stops the step, as for :func:`fused_adamw_`)."""
    stats = torch.zeros(len(params), 3, dtype=torch.float64)
    if stop_for_nonfinite(found_inf, grads):
        return stats
    for i, (p, g, m, v, step, r, row) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, steps, radii, hyper.tolist())
    ):
        if row[WEIGHT_DECAY] != 0.0:
            raise ValueError(
                f"fused_adamh_: weight_decay of tensor {i} must be 0 (hyperball steps "
                f"have no weight decay), got {row[WEIGHT_DECAY]}"
            )
        bc1, bc2 = _advance(step, row)
        dt = _compute_dtype(p)
        _moments(_grad(g, row, m.dtype), m, v, row)
        u = ((m / bc1) / ((v / bc2).sqrt() + row[EPS])).to(dt)
        w = p.to(dt)
        u64, w64 = u.double(), w.double()
        stats[i, 0] = (u64 * u64).sum()
        stats[i, 1] = (w64 * u64).sum()
        stats[i, 2] = (w64 * w64).sum()
        radius = float(r)
        unorm = math.sqrt(stats[i, 0])
        # A zero direction moves nothing (W is only brought back to radius R); a zero matrix
        # (R = 0) stays zero.
        w_new = w - (row[LR] * radius / unorm) * u if unorm > 0.0 else w
        norm = float(torch.linalg.vector_norm(w_new, dtype=torch.float64))
        if norm > 0.0:
            p.copy_(w_new * (radius / norm))
    return stats


def fused_adamh_reduce_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    hyper: Tensor,
    found_inf: Tensor | None = None,
) -> Tensor:
    """Pass 1 of :func:`fused_adamh_` alone: advances the counters, updates m and v, and returns
    the sums (||u||^2, <W,u>, ||W||^2) per tensor, on the parameters' device; writes no
    parameter. With sharded tensors the sums are all-reduced before :func:`fused_adamh_apply_`."""
    stats = torch.zeros(len(params), 3, dtype=torch.float64, device=params[0].device if params else "cpu")
    if stop_for_nonfinite(found_inf, grads):
        return stats
    rows = hyper.tolist()
    for i, row in enumerate(rows):
        if row[WEIGHT_DECAY] != 0.0:
            raise ValueError(
                f"fused_adamh_reduce_: weight_decay of tensor {i} must be 0 (hyperball steps "
                f"have no weight decay), got {row[WEIGHT_DECAY]}"
            )
    for i, (p, g, m, v, step, row) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, rows)):
        bc1, bc2 = _advance(step, row)
        dt = _compute_dtype(p)
        _moments(_grad(g, row, m.dtype), m, v, row)
        u64 = ((m / bc1) / ((v / bc2).sqrt() + row[EPS])).to(dt).double()
        w64 = p.to(dt).double()
        stats[i, 0] = (u64 * u64).sum()
        stats[i, 1] = (w64 * u64).sum()
        stats[i, 2] = (w64 * w64).sum()
    return stats


def fused_adamh_apply_(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    radii: Sequence[Tensor],
    hyper: Tensor,
    sums: Tensor,
    found_inf: Tensor | None = None,
) -> None:
    """Pass 2 of :func:`fused_adamh_` alone, from ``sums`` (the whole tensors' ||u||^2, <W,u>,
    ||W||^2, [n, 3]): W' = W - s u with s = lr R/||u||, and W <- R W'/||W'|| where
    ||W'||^2 = ||W||^2 - 2 s <W,u> + s^2 ||u||^2 (the norm of the whole tensor, which a shard
    cannot take itself). u is recomputed from m, v and the counters as the reduce left them.
    Nothing is written when ``found_inf`` is set."""
    if tuple(sums.shape) != (len(params), 3) or sums.dtype != torch.float64:
        raise RuntimeError(
            f"lvopt::fused_adamh_apply_: sums must be a float64 tensor of shape [{len(params)}, 3], "
            f"got {sums.dtype} {list(sums.shape)}"
        )
    if found_inf is not None and bool(found_inf):
        return
    for p, m, v, step, r, row, (uu, wu, ww) in zip(
        params, exp_avgs, exp_avg_sqs, steps, radii, hyper.tolist(), sums.tolist()
    ):
        t = float(step)
        bc1, bc2 = 1.0 - row[BETA1] ** t, 1.0 - row[BETA2] ** t
        dt = _compute_dtype(p)
        u = ((m / bc1) / ((v / bc2).sqrt() + row[EPS])).to(dt)
        radius = float(r)
        s = row[LR] * radius / math.sqrt(uu) if uu > 0.0 else 0.0
        norm2 = ww - 2.0 * s * wu + s * s * uu
        if norm2 > 0.0:
            p.copy_((p.to(dt) - s * u) * (radius / math.sqrt(norm2)))


# ----- sparse embedding rows (docs/design.md section 2.3) ----------------------------------------


def _check_indices(op: str, indices: Tensor, num_rows: int) -> None:
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise RuntimeError(f"{op}: indices must be a 1-D int64 CPU tensor, got {indices.dtype} {tuple(indices.shape)}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0:
            pos = int((indices < 0).nonzero()[0])
            raise RuntimeError(f"{op}: negative index {int(indices[pos])} at position {pos}")
        if hi >= num_rows:
            pos = int((indices >= num_rows).nonzero()[0])
            raise RuntimeError(
                f"{op}: index {int(indices[pos])} at position {pos} is out of range for a table of {num_rows} rows"
            )


def _stop_for_error(error: Tensor | None, indices: Tensor, num_rows: int) -> bool:
    """The error-word protocol: with ``error`` given, write nothing when it is already set, or
    when an id lies outside the table (recorded as [ERR_IDS, min id, max id])."""
    if error is None:
        return False
    if int(error[0]):
        return True
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_rows:
            error.copy_(torch.tensor([ERR_IDS, lo, hi], dtype=torch.int64))
            return True
    return False


def coalesce_rows(indices: Tensor, values: Tensor, num_rows: int):
    """The sorted distinct rows of ``indices`` and, per row, the sum of its ``values`` rows in
    input order, accumulated in fp32 (fp64 for fp64 values) and rounded once."""
    _check_indices("lvopt::coalesce_rows", indices, num_rows)
    rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    acc = values.new_zeros((rows.numel(), values.shape[1]), dtype=_compute_dtype(values))
    acc.index_add_(0, inverse, values.to(acc.dtype))
    return rows, acc.to(values.dtype)


def _zero_grad_steps(
    p: Tensor, m: Tensor, v: Tensor, s: int, c: int, hist: Tensor, hist_base: int, b1: float, b2: float, eps: float
) -> None:
    """Dense AdamW with g = 0 on steps s+1..c, step by step (the definition exact mode meets)."""
    for j in range(s + 1, c + 1):
        lr, d = hist[j - hist_base, 0].item(), hist[j - hist_base, 1].item()
        bc1, bc2 = 1.0 - b1**j, 1.0 - b2**j
        p.mul_(d)
        m.mul_(b1)
        v.mul_(b2)
        p.addcdiv_(m.to(p.dtype), ((v.sqrt() / math.sqrt(bc2)).add_(eps)).to(p.dtype), value=-lr / bc1)


def _check_flags(op: str, flags: int) -> None:
    if flags not in (0, 1):
        raise RuntimeError(
            f"{op}: flags {flags}: 1 (coalesced ids) is accepted, a ring history (2) is kept "
            f"by the cuda and triton backends only"
        )


def sparse_adamw_(
    param: Tensor,
    indices: Tensor,
    values: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    last_step: Tensor,
    hist: Tensor,
    qpow: Tensor,
    hyper: Tensor,
    hist_base: int,
    epoch: int,
    window: int,
    exact: bool,
    stats: Tensor | None = None,
    error: Tensor | None = None,
    flags: int = 0,
) -> None:
    """One AdamW step of the rows ``indices`` touches (duplicates summed). Lazy: untouched rows
    stay. Exact: each touched row first takes the skipped zero-gradient steps one by one
    (``qpow``, ``epoch`` and ``window`` serve the native closed form and are unused here).
    ``stats`` (two fp64): the sums over the rows written of W^2 before the call (before any
    catch-up) and of (W_after - W_before)^2. ``flags``: 1 (coalesced ids) changes nothing here;
    a ring history (2) is the cuda and triton backends' (lvopt/sparse.py RingClock)."""
    op = "lvopt::sparse_adamw_"
    _check_flags(op, flags)
    if _stop_for_error(error, indices, param.shape[0]):
        if stats is not None:
            stats.zero_()
        return
    _check_indices(op, indices, param.shape[0])
    if values.shape != (indices.numel(), param.shape[1]) or values.dtype != param.dtype:
        raise RuntimeError(
            f"{op}: values must have shape [{indices.numel()}, {param.shape[1]}] and dtype "
            f"{param.dtype}, got {tuple(values.shape)} {values.dtype}"
        )
    row = hyper.reshape(-1).tolist()
    t = int(float(step)) + 1
    rows, g = coalesce_rows(indices, values, param.shape[0])
    if exact:
        last = last_step[rows]
        if rows.numel() and (int(last.min()) < hist_base or int(last.max()) > t - 1):
            if error is not None:
                error[0] |= ERR_CLOCK
                if stats is not None:
                    stats.zero_()
                return
            raise RuntimeError(f"{op}: a row's last_step is outside [{hist_base}, {t - 1}]")
        if t - 1 - hist_base >= hist.shape[0]:
            raise RuntimeError(f"{op}: hist does not cover step {t - 1}")
    step.add_(1)
    bc1, bc2 = 1.0 - row[BETA1] ** t, 1.0 - row[BETA2] ** t
    dt = _compute_dtype(param)
    before = param[rows].clone() if stats is not None else None
    for k, r in enumerate(rows.tolist()):
        p, m, v = param[r].to(dt), exp_avg[r], exp_avg_sq[r]
        if exact:
            _zero_grad_steps(p, m, v, int(last_step[r]), t - 1, hist, hist_base, row[BETA1], row[BETA2], row[EPS])
            last_step[r] = t
        gr = _grad(g[k], row, m.dtype)
        p.mul_(1.0 - row[LR] * row[WEIGHT_DECAY])
        _moments(gr, m, v, row)
        p.addcdiv_(m.to(dt), ((v.sqrt() / math.sqrt(bc2)).add_(row[EPS])).to(dt), value=-row[LR] / bc1)
        param[r] = p.to(param.dtype)
    if stats is not None:
        stats.reshape(-1)[0], stats.reshape(-1)[1] = _square_sums(before, param[rows])


def sparse_catchup_(
    param: Tensor,
    indices: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    last_step: Tensor,
    hist: Tensor,
    qpow: Tensor,
    hyper: Tensor,
    hist_base: int,
    epoch: int,
    window: int,
    error: Tensor | None = None,
    flags: int = 0,
) -> None:
    """Brings rows ``indices`` current to ``step`` (exact mode), step by step."""
    op = "lvopt::sparse_catchup_"
    _check_flags(op, flags)
    if _stop_for_error(error, indices, param.shape[0]):
        return
    _check_indices(op, indices, param.shape[0])
    row = hyper.reshape(-1).tolist()
    c = int(float(step))
    rows = torch.unique(indices)
    last = last_step[rows]
    if rows.numel() and (int(last.min()) < hist_base or int(last.max()) > c):
        if error is not None:
            error[0] |= ERR_CLOCK
            return
        raise RuntimeError(f"{op}: a row's last_step is outside [{hist_base}, {c}]")
    dt = _compute_dtype(param)
    for r in rows.tolist():
        s = int(last_step[r])
        if s >= c:
            continue
        p = param[r].to(dt)
        _zero_grad_steps(p, exp_avg[r], exp_avg_sq[r], s, c, hist, hist_base, row[BETA1], row[BETA2], row[EPS])
        param[r] = p.to(param.dtype)
        last_step[r] = c
