"""Pure-PyTorch reference steps: the oracle every backend is tested against, and the
``backend="reference"`` fallback (chosen explicitly, never silently).

Each function has the signature and in-place semantics of the custom op of the same name
(``torch.ops.lvopt.<name>``) and follows DESIGN.md section 2 literally, one tensor at a time,
in the parameter's precision or fp32, whichever is wider (fp64 parameters give an fp64 oracle).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# Columns of the per-tensor hyperparameter table (csrc/include/lvopt/math.h, HyperCol).
LR, BETA1, BETA2, WEIGHT_DECAY, EPS, MAXIMIZE = range(6)
HYPER_COLS = 6


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


def fused_adamw_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], hyper: Tensor) -> None:
    """AdamW, as torch.optim.AdamW (decoupled weight decay), on every tensor in place."""
    for p, g, m, v, step, row in zip(params, grads, exp_avgs, exp_avg_sqs, steps, hyper.tolist()):
        bc1, bc2 = _advance(step, row)
        dt = _compute_dtype(p)
        g = _grad(g, row, m.dtype)
        w = p.to(dt)
        w.mul_(1.0 - row[LR] * row[WEIGHT_DECAY])
        _moments(g, m, v, row)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(row[EPS])
        w.addcdiv_(m.to(dt), denom.to(dt), value=-row[LR] / bc1)
        p.copy_(w)


def fused_adamh_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], radii: Sequence[Tensor],
                 hyper: Tensor) -> Tensor:
    """AdamH (Adam on the hyperball) on every tensor in place; returns the fp64 sums
    (||u||^2, <W,u>, ||W||^2) per tensor, W taken before the step."""
    stats = torch.zeros(len(params), 3, dtype=torch.float64)
    for i, (p, g, m, v, step, r, row) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, steps, radii, hyper.tolist())
    ):
        if row[WEIGHT_DECAY] != 0.0:
            raise ValueError(f"fused_adamh_: weight_decay of tensor {i} must be 0 (hyperball steps "
                             f"have no weight decay), got {row[WEIGHT_DECAY]}")
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
