"""Triton fused multi-tensor AdamH: lvopt_triton::fused_adamh_, the signature and semantics
of lvopt::fused_adamh_. Three kernels, as the CUDA version: pass 1 updates m, v and writes
per-chunk fp64 partial sums (||u||^2, <W,u>, ||W||^2); a finalize kernel adds each tensor's
partials and computes the scales (math.h's hyperball_scales); pass 2 applies W <- a*W - b*u.
fused_adamh_reduce_ and fused_adamh_apply_ are the two passes as two ops (sharded tensors:
the sums are all-reduced in between; lvopt/optim.py).
Deterministic: every sum runs in a fixed order (tile sums by tl.sum's fixed tree, tiles and
chunks in index order); no atomics.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _plan as P
from ._common import load_step_tile
from .fused_adamw import _coef, _load_tensor, _store_param, _store_state, launch_options

# Chunk partial sums added per step of the finalize kernel's loop.
REDUCE_BLOCK = 64


@triton.jit
def _reduce_tile(p, g, m, v, offs, mask, b1, omb1, b2, omb2, step_size, inv_bc2, eps, sign, MASKED: tl.constexpr):
    wi, gi, mi, vi = load_step_tile(p, g, m, v, offs, mask, MASKED)
    gi = sign * gi
    mi = b1 * mi + omb1 * gi
    vi = b2 * vi + omb2 * (gi * gi)
    u = tl.div_rn(step_size * mi, tl.sqrt_rn(vi) * inv_bc2 + eps)
    _store_state(m, v, offs, mask, mi, vi, MASKED)
    if MASKED:
        u = tl.where(mask, u, 0.0)
    u64 = u.to(tl.float64)
    w64 = wi.to(tl.float64)
    return tl.sum(u64 * u64, axis=0), tl.sum(w64 * u64, axis=0), tl.sum(w64 * w64, axis=0)


@triton.jit
def adamh_reduce_kernel(
    meta_ptr,
    coef_ptr,
    partial_ptr,
    found_ptr,
    n_tensors,
    P_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_FOUND: tl.constexpr = False,
):
    p, g, m, v, n, index, gchunk = _load_tensor(meta_ptr, n_tensors, found_ptr, P_DTYPE, ALIGNED, CHUNK, HAS_FOUND)
    b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign = _coef(coef_ptr, index)
    uu = tl.zeros((), tl.float64)
    wu = tl.zeros((), tl.float64)
    ww = tl.zeros((), tl.float64)
    full = n // BLOCK
    for t in range(0, full):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        a, b, c = _reduce_tile(p, g, m, v, offs, None, b1, omb1, b2, omb2, step_size, inv_bc2, eps, sign, False)
        uu += a
        wu += b
        ww += c
    offs = full * BLOCK + tl.arange(0, BLOCK)
    a, b, c = _reduce_tile(p, g, m, v, offs, offs < n, b1, omb1, b2, omb2, step_size, inv_bc2, eps, sign, True)
    uu += a
    wu += b
    ww += c
    out = partial_ptr + gchunk * 3
    tl.store(out + 0, uu)
    tl.store(out + 1, wu)
    tl.store(out + 2, ww)


@triton.jit
def adamh_finalize_kernel(
    partial_ptr, chunks_ptr, hyper_ptr, radius_ptr, stats_ptr, scale_ptr, RB: tl.constexpr, RADIUS_TABLE: tl.constexpr
):
    """Adds tensor i's chunk partials and computes its scales (a, b). lr is column 0 of row i
    of the hyperparameter table; the radius is read at the address radius_ptr[i]
    (RADIUS_TABLE: the plan's table of the radii's addresses) or is radius_ptr[i] (a vector of
    the radii, when they are not on the device)."""
    i = tl.program_id(0)
    first = tl.load(chunks_ptr + 2 * i)
    count = tl.load(chunks_ptr + 2 * i + 1)
    acc_uu = tl.zeros((RB,), tl.float64)
    acc_wu = tl.zeros((RB,), tl.float64)
    acc_ww = tl.zeros((RB,), tl.float64)
    for k in range(0, count, RB):
        idx = k + tl.arange(0, RB)
        mask = idx < count
        q = partial_ptr + (first + idx) * 3
        acc_uu += tl.load(q + 0, mask=mask, other=0.0)
        acc_wu += tl.load(q + 1, mask=mask, other=0.0)
        acc_ww += tl.load(q + 2, mask=mask, other=0.0)
    uu = tl.sum(acc_uu, axis=0)
    wu = tl.sum(acc_wu, axis=0)
    ww = tl.sum(acc_ww, axis=0)
    tl.store(stats_ptr + 3 * i + 0, uu)
    tl.store(stats_ptr + 3 * i + 1, wu)
    tl.store(stats_ptr + 3 * i + 2, ww)
    _store_scales(i, uu, wu, ww, hyper_ptr, radius_ptr, scale_ptr, RADIUS_TABLE)


@triton.jit
def _store_scales(i, uu, wu, ww, hyper_ptr, radius_ptr, scale_ptr, RADIUS_TABLE: tl.constexpr):
    # hyperball_scales (csrc/include/lvopt/math.h), in fp64.
    lr = tl.load(hyper_ptr + 6 * i)
    if RADIUS_TABLE:
        radius = tl.load(tl.load(radius_ptr + i).to(tl.pointer_type(tl.float64), bitcast=True))
    else:
        radius = tl.load(radius_ptr + i)
    s = tl.where(uu > 0.0, lr * radius / tl.sqrt(tl.maximum(uu, 1e-300)), 0.0)
    norm2 = ww - 2.0 * s * wu + s * s * uu
    ok = norm2 > 0.0
    a = tl.where(ok, radius / tl.sqrt(tl.where(ok, norm2, 1.0)), 1.0)
    b = tl.where(ok, a * s, 0.0)
    tl.store(scale_ptr + 2 * i + 0, a.to(tl.float32))
    tl.store(scale_ptr + 2 * i + 1, b.to(tl.float32))


@triton.jit
def adamh_scales_kernel(sums_ptr, hyper_ptr, radius_ptr, scale_ptr, RADIUS_TABLE: tl.constexpr):
    """The scales of pass 2 from sums given to fused_adamh_apply_ (one program per tensor; lr
    and the radius read as in adamh_finalize_kernel)."""
    i = tl.program_id(0)
    _store_scales(
        i,
        tl.load(sums_ptr + 3 * i + 0),
        tl.load(sums_ptr + 3 * i + 1),
        tl.load(sums_ptr + 3 * i + 2),
        hyper_ptr,
        radius_ptr,
        scale_ptr,
        RADIUS_TABLE,
    )


@triton.jit
def _apply_tile(p, m, v, offs, mask, a, b, step_size, inv_bc2, eps, MASKED: tl.constexpr):
    if MASKED:
        wi = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
        mi = tl.load(m + offs, mask=mask, other=0.0)
        vi = tl.load(v + offs, mask=mask, other=1.0)
    else:
        wi = tl.load(p + offs).to(tl.float32)
        mi = tl.load(m + offs)
        vi = tl.load(v + offs)
    u = tl.div_rn(step_size * mi, tl.sqrt_rn(vi) * inv_bc2 + eps)
    _store_param(p + offs, a * wi - b * u, mask, MASKED)


@triton.jit
def adamh_apply_kernel(
    meta_ptr,
    coef_ptr,
    scale_ptr,
    found_ptr,
    n_tensors,
    P_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_FOUND: tl.constexpr = False,
):
    p, g, m, v, n, index, _ = _load_tensor(meta_ptr, n_tensors, found_ptr, P_DTYPE, ALIGNED, CHUNK, HAS_FOUND)
    b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign = _coef(coef_ptr, index)
    a = tl.load(scale_ptr + 2 * index)
    b = tl.load(scale_ptr + 2 * index + 1)
    full = n // BLOCK
    for t in range(0, full):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        _apply_tile(p, m, v, offs, None, a, b, step_size, inv_bc2, eps, False)
    offs = full * BLOCK + tl.arange(0, BLOCK)
    _apply_tile(p, m, v, offs, offs < n, a, b, step_size, inv_bc2, eps, True)


def _check_no_weight_decay(op, rows):
    for i, r in enumerate(rows or ()):
        if r[3] != 0.0:
            raise RuntimeError(f"{op}: weight_decay of tensor {i} must be 0 (hyperball steps have no weight decay)")


def _check_sums(op, params, sums):
    n = len(params)
    if (
        sums.dtype != torch.float64
        or tuple(sums.shape) != (n, 3)
        or not sums.is_contiguous()
        or (params and sums.device != params[0].device)
    ):
        raise RuntimeError(
            f"{op}: sums must be a contiguous float64 tensor of shape [{n}, 3] on the "
            f"parameters' device (fused_adamh_reduce_'s result), got {sums.dtype} "
            f"{list(sums.shape)} on {sums.device}"
        )


def _check_radii(op, params, radii, rows):
    n = len(params)
    if len(radii) != n:
        raise RuntimeError(f"{op}: radii has {len(radii)} tensors, params has {n}")
    dev = params[0].device if n else None
    for i, r in enumerate(radii):
        if r is None or not (r.device.type == "cpu" or r.device == dev) or r.numel() != 1 or r.dtype != torch.float64:
            raise RuntimeError(
                f"{op}: radii[{i}] must be a one-element float64 tensor on the CPU or the parameters' device"
            )
        if r.device.type == "cpu":
            x = float(r)
            if not (x == x and abs(x) != float("inf") and x >= 0.0):
                raise RuntimeError(f"{op}: radii[{i}] must be finite and >= 0, got {x}")
    _check_no_weight_decay(op, rows)


@torch.library.custom_op(
    "lvopt_triton::fused_adamh_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps", "found_inf")
)
def fused_adamh_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    radii: List[torch.Tensor],
    hyper: torch.Tensor,
    found_inf: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    op = "lvopt::fused_adamh_"
    rows = C.check_step_args(op, params, grads, exp_avgs, exp_avg_sqs, steps, hyper)
    _check_radii(op, params, radii, rows)
    C.check_found_inf(op, found_inf, params)
    if not params:
        return hyper.new_zeros((0, 3))
    plan = P.plan_for(params, grads, exp_avgs, exp_avg_sqs, steps, radii=radii)
    return run(plan, params, grads, steps, radii, hyper, found_inf)


def run(plan, params, grads, steps, radii, hyper, found_inf=None, stats=None, scanned=False) -> torch.Tensor:
    """One AdamH step through ``plan`` (lvopt/triton/_plan.py, pointed at ``grads``), the
    arguments checked; returns the per-tensor sums (into ``stats`` when given, else a new
    tensor). A fixed number of host operations and launches whatever the number of tensors:
    with found_inf the scan (decided on the device, as in fused_adamw.run: a set flag makes
    every program of the three kernels read and write nothing but zero sums; a = 1, b = 0),
    the setup kernel, the reduce launches, the finalize kernel (lr from the hyperparameter
    table, each radius read through the plan's address table), the apply launches. ``params``,
    ``steps`` and ``radii`` are used only where the plan has no device table for them."""
    opts, blk = launch_options(), C.block()
    n = plan.n
    dev = plan.device
    f64 = dict(device=dev, dtype=torch.float64)
    if hyper.device != plan.device:
        hyper = C._upload(hyper, plan.device)  # a host table given to the op (the optimizer's is on the device)
    if found_inf is not None and not scanned:  # scanned: the caller scanned every plan of its step first
        plan.scan(found_inf)
    coef = plan.advance(steps, hyper, unit_step=True, found_inf=found_inf)
    if coef is None:
        return torch.zeros(n, 3, **f64)
    if stats is None:
        stats = torch.empty(n, 3, **f64)
    scales = plan.buffer("adamh_scales", (n, 2), torch.float32)
    table = plan.radius_tab is not None
    radius = plan.radius_tab if table else C.stack_scalars(radii, dev)
    _reduce_launches(plan, params, coef, hyper, radius, table, stats, scales, found_inf, opts, blk)
    _apply_launches(plan, coef, scales, found_inf, opts, blk)
    return stats


def _reduce_launches(plan, params, coef, hyper, radius, table, stats, scales, found_inf, opts, blk):
    """Pass 1 (m, v and the chunk partials) and the finalize kernel (the sums into ``stats``,
    the scales into ``scales``)."""
    partials = plan.buffer("adamh_partials", max(plan.total, 1) * 3, torch.float64)
    has_found = found_inf is not None
    flag = found_inf if has_found else coef
    for dtype, aligned, meta, n_tensors, n_programs in plan.tables.launches:
        adamh_reduce_kernel[(n_programs,)](
            meta,
            coef,
            partials,
            flag,
            n_tensors,
            P_DTYPE=C.TL_DTYPE[dtype],
            ALIGNED=aligned,
            CHUNK=C.CHUNK,
            BLOCK=blk,
            HAS_FOUND=has_found,
            **opts,
        )
    adamh_finalize_kernel[(plan.n,)](
        partials, plan.chunks(params), hyper, radius, stats, scales, RB=REDUCE_BLOCK, RADIUS_TABLE=table, **opts
    )


def _apply_launches(plan, coef, scales, found_inf, opts, blk):
    """Pass 2: W <- a*W - b*u with the scales [n, 2]."""
    has_found = found_inf is not None
    flag = found_inf if has_found else coef
    for dtype, aligned, meta, n_tensors, n_programs in plan.tables.launches:
        adamh_apply_kernel[(n_programs,)](
            meta,
            coef,
            scales,
            flag,
            n_tensors,
            P_DTYPE=C.TL_DTYPE[dtype],
            ALIGNED=aligned,
            CHUNK=C.CHUNK,
            BLOCK=blk,
            HAS_FOUND=has_found,
            **opts,
        )


@fused_adamh_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, radii, hyper, found_inf=None):
    if params:
        return params[0].new_empty((len(params), 3), dtype=torch.float64)
    return hyper.new_empty((0, 3))


@torch.library.custom_op(
    "lvopt_triton::fused_adamh_reduce_", mutates_args=("exp_avgs", "exp_avg_sqs", "steps", "found_inf")
)
def fused_adamh_reduce_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    hyper: torch.Tensor,
    found_inf: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pass 1 of fused_adamh_ alone (lvopt::fused_adamh_reduce_): advances the counters,
    updates m and v, returns the sums [n, 3]; no parameter is written. Through the plan of
    these tensors (lvopt/triton/_plan.py): the scan, the setup kernel, the reduce launches and
    the finalize kernel (its scales, from zero radii, are not used)."""
    op = "lvopt::fused_adamh_reduce_"
    rows = C.check_step_args(op, params, grads, exp_avgs, exp_avg_sqs, steps, hyper)
    _check_no_weight_decay(op, rows)
    C.check_found_inf(op, found_inf, params)
    n = len(params)
    if n == 0:
        return hyper.new_zeros((0, 3))
    plan = P.plan_for(params, grads, exp_avgs, exp_avg_sqs, steps)
    dev = plan.device
    f64 = dict(device=dev, dtype=torch.float64)
    if hyper.device != dev:
        hyper = C._upload(hyper, dev)
    if found_inf is not None:
        plan.scan(found_inf)
    coef = plan.advance(steps, hyper, unit_step=True, found_inf=found_inf)
    if coef is None:
        return torch.zeros(n, 3, **f64)
    stats = torch.empty(n, 3, **f64)
    scales = plan.buffer("adamh_scales", (n, 2), torch.float32)
    _reduce_launches(
        plan, params, coef, hyper, torch.zeros(n, **f64), False, stats, scales, found_inf, launch_options(), C.block()
    )
    return stats


@fused_adamh_reduce_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, found_inf=None):
    if params:
        return params[0].new_empty((len(params), 3), dtype=torch.float64)
    return hyper.new_empty((0, 3))


@torch.library.custom_op("lvopt_triton::fused_adamh_apply_", mutates_args=("params",))
def fused_adamh_apply_(
    params: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    radii: List[torch.Tensor],
    hyper: torch.Tensor,
    sums: torch.Tensor,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """Pass 2 of fused_adamh_ alone (lvopt::fused_adamh_apply_): W <- a*W - b*u, the scales from
    ``sums`` (the whole tensors' ||u||^2, <W,u>, ||W||^2) and the radii, u from m, v and the
    counters as fused_adamh_reduce_ left them: the plan's setup kernel reads them without
    advancing them (increment=False). A set found_inf (read only) writes nothing."""
    op = "lvopt::fused_adamh_apply_"
    # Pass 2 reads no gradient: the parameters stand in for them in the shared checks and the
    # plan's gradient column.
    rows = C.check_step_args(op, params, params, exp_avgs, exp_avg_sqs, steps, hyper)
    _check_radii(op, params, radii, rows)
    _check_sums(op, params, sums)
    C.check_found_inf(op, found_inf, params)
    n = len(params)
    if n == 0:
        return
    plan = P.plan_for(params, params, exp_avgs, exp_avg_sqs, steps, radii=radii)
    dev = plan.device
    if hyper.device != dev:
        hyper = C._upload(hyper, dev)
    coef = plan.advance(steps, hyper, unit_step=True, found_inf=found_inf, increment=False)
    if coef is None:
        return
    table = plan.radius_tab is not None
    radius = plan.radius_tab if table else C.stack_scalars(radii, dev)
    opts = launch_options()
    scales = plan.buffer("adamh_scales", (n, 2), torch.float32)
    adamh_scales_kernel[(n,)](sums, hyper, radius, scales, RADIUS_TABLE=table, **opts)
    _apply_launches(plan, coef, scales, found_inf, opts, C.block())


@fused_adamh_apply_.register_fake
def _(params, exp_avgs, exp_avg_sqs, steps, radii, hyper, sums, found_inf=None):
    return None
