"""Triton fused multi-tensor AdamW: lvopt_triton::fused_adamw_, the signature and in-place
semantics of lvopt::fused_adamw_ (csrc/register.cpp).

Per element it is math.h's adamw_element, in the same order of fp32 operations, with IEEE
square root and division (tl.sqrt_rn, tl.div_rn) and no FMA contraction
(enable_fp_fusion=False), so a compiled kernel gives the CPU kernel's bits. With ``stats``
(track=True) the TRACK instance also sums W^2 and (dW)^2 per chunk (fp64, fixed order) and
chunk_sums_kernel adds each tensor's chunks; with ``found_inf`` (nonfinite="skip"/"raise") the
gradients are scanned first into the flag on the device, the step counters advance by
1 - found_inf, and the kernels read the flag: a set flag makes every program write nothing, with
no host read. With ``max_exp_avg_sqs`` (AMSGrad) the AMS instance keeps the running maximum of
v (math.h adamw_amsgrad_element; table column 7 holds its address). Registered with
torch.library.custom_op + register_fake rather than triton_op (docs/design.md section 3: the fake
trace of a triton_op fails for CPU tensors under TRITON_INTERPRET=1, and that is how it is
tested here).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _plan as P
from ._common import load_step_tile, program_row


@triton.jit
def _load_tensor(
    meta_ptr,
    n_tensors,
    found_ptr,
    P_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_FOUND: tl.constexpr,
):
    """The (tensor, chunk) of this program: pointers to its chunk, its length and indices.
    With HAS_FOUND, a set found_inf flag (nonfinite="skip"/"raise") makes the length 0: the
    program reads and writes nothing (the decision is taken on the device)."""
    row, chunk = program_row(meta_ptr, n_tensors)
    p = tl.load(row + 0).to(tl.pointer_type(P_DTYPE), bitcast=True)
    g = tl.load(row + 1).to(tl.pointer_type(P_DTYPE), bitcast=True)
    m = tl.load(row + 2).to(tl.pointer_type(tl.float32), bitcast=True)
    v = tl.load(row + 3).to(tl.pointer_type(tl.float32), bitcast=True)
    if ALIGNED:
        p = tl.multiple_of(p, 16)
        g = tl.multiple_of(g, 16)
        m = tl.multiple_of(m, 16)
        v = tl.multiple_of(v, 16)
    numel = tl.load(row + 4)
    index = tl.load(row + 5)
    first = tl.load(row + 6)
    begin = chunk * CHUNK
    n = tl.minimum(numel - begin, CHUNK)
    if HAS_FOUND:
        n = tl.where(tl.load(found_ptr) != 0.0, 0, n)
    return p + begin, g + begin, m + begin, v + begin, n, index, first + chunk


@triton.jit
def _load_vmax(meta_ptr, n_tensors, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """AMSGrad's running-maximum pointer of this program's chunk (table column 7)."""
    row, chunk = program_row(meta_ptr, n_tensors)
    x = tl.load(row + 7).to(tl.pointer_type(tl.float32), bitcast=True)
    if ALIGNED:
        x = tl.multiple_of(x, 16)
    return x + chunk * CHUNK


@triton.jit
def _store_param(ptr, x, mask, MASKED: tl.constexpr):
    """Stores fp32 x in the parameter dtype. bf16 rounds to nearest even by math.h's
    float_to_bf16 bit recipe, written out: the interpreter's own fp32->bf16 cast truncates,
    and on the GPU this is the same rounding as cvt.rn.bf16.f32 (a few integer operations on
    a memory-bound kernel)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x
    if MASKED:
        tl.store(ptr, y, mask=mask)
    else:
        tl.store(ptr, y)


@triton.jit
def _coef(coef_ptr, index):
    c = coef_ptr + index * 9
    return (
        tl.load(c + 0),
        tl.load(c + 1),
        tl.load(c + 2),
        tl.load(c + 3),
        tl.load(c + 4),
        tl.load(c + 5),
        tl.load(c + 6),
        tl.load(c + 7),
        tl.load(c + 8),
    )


@triton.jit
def _stored(x, ptr):
    """The value a store of fp32 x into ``ptr``'s dtype keeps (bf16: rounded to nearest even)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        return (r << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def adamw_math(pi, gi, mi, vi, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign):
    """math.h adamw_element on fp32 tiles (the one copy of it in lvopt/triton): decoupled
    decay, torch's moment order, IEEE sqrt and division. Returns (p, m, v)."""
    gi = sign * gi
    pi = pi * decay
    mi = b1 * mi + omb1 * gi
    vi = b2 * vi + omb2 * (gi * gi)
    denom = tl.sqrt_rn(vi) * inv_bc2 + eps
    pi = pi - tl.div_rn(step_size * mi, denom)
    return pi, mi, vi


@triton.jit
def adamw_amsgrad_math(pi, gi, mi, vi, xi, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign):
    """math.h adamw_amsgrad_element on fp32 tiles: adamw_math with the running maximum xi of v
    (updated after v) in the denominator. Returns (p, m, v, vmax). (Written out rather than
    sharing helpers with adamw_math: reshaping adamw_math moved the register allocation of the
    sparse-row kernel that inlines it into spills, benchmarks/sass_report.py.)"""
    gi = sign * gi
    pi = pi * decay
    mi = b1 * mi + omb1 * gi
    vi = b2 * vi + omb2 * (gi * gi)
    xi = amsgrad_max(xi, vi)
    denom = tl.sqrt_rn(xi) * inv_bc2 + eps
    pi = pi - tl.div_rn(step_size * mi, denom)
    return pi, mi, vi, xi


@triton.jit
def amsgrad_max(xi, vi):
    """math.h amsgrad_max: max(vmax, v), a NaN in either propagating (as torch.maximum)."""
    return tl.where((xi != xi) | (xi >= vi), xi, vi)


@triton.jit
def _store_state(m, v, offs, mask, mi, vi, MASKED: tl.constexpr):
    if MASKED:
        tl.store(m + offs, mi, mask=mask)
        tl.store(v + offs, vi, mask=mask)
    else:
        tl.store(m + offs, mi)
        tl.store(v + offs, vi)


@triton.jit
def _adamw_tile(
    p,
    g,
    m,
    v,
    x,
    offs,
    mask,
    b1,
    omb1,
    b2,
    omb2,
    decay,
    step_size,
    inv_bc2,
    eps,
    sign,
    MASKED: tl.constexpr,
    AMS: tl.constexpr,
):
    """One tile of AdamW; returns W before and after (fp32; unused values cost nothing)."""
    pi, gi, mi, vi = load_step_tile(p, g, m, v, offs, mask, MASKED)
    xi = vi
    if AMS:
        if MASKED:
            xi = tl.load(x + offs, mask=mask, other=0.0)
        else:
            xi = tl.load(x + offs)
    w0 = pi
    if AMS:
        pi, mi, vi, xi = adamw_amsgrad_math(
            pi, gi, mi, vi, xi, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign
        )
    else:
        pi, mi, vi = adamw_math(pi, gi, mi, vi, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign)
    _store_state(m, v, offs, mask, mi, vi, MASKED)
    if AMS:
        if MASKED:
            tl.store(x + offs, xi, mask=mask)
        else:
            tl.store(x + offs, xi)
    _store_param(p + offs, pi, mask, MASKED)
    return w0, pi


@triton.jit
def _track_sums(w0, w1, p, mask, MASKED: tl.constexpr):
    """fp64 (sum W_before^2, sum (W_after - W_before)^2) of a tile, W_after as stored."""
    w0d = w0.to(tl.float64)
    d = _stored(w1, p).to(tl.float64) - w0d
    if MASKED:
        w0d = tl.where(mask, w0d, 0.0)
        d = tl.where(mask, d, 0.0)
    return tl.sum(w0d * w0d, axis=0), tl.sum(d * d, axis=0)


@triton.jit
def adamw_kernel(
    meta_ptr,
    coef_ptr,
    partial_ptr,
    found_ptr,
    n_tensors,
    P_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    TRACK: tl.constexpr,
    HAS_FOUND: tl.constexpr = False,
    AMS: tl.constexpr = False,
):
    p, g, m, v, n, index, chunk = _load_tensor(meta_ptr, n_tensors, found_ptr, P_DTYPE, ALIGNED, CHUNK, HAS_FOUND)
    x = m
    if AMS:
        x = _load_vmax(meta_ptr, n_tensors, ALIGNED, CHUNK)
    b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign = _coef(coef_ptr, index)
    ww = tl.sum(tl.zeros((BLOCK,), tl.float64), axis=0)  # an fp64 scalar 0
    dd = ww
    full = n // BLOCK
    for t in range(0, full):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        w0, w1 = _adamw_tile(
            p, g, m, v, x, offs, None, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign, False, AMS
        )
        if TRACK:
            a, b = _track_sums(w0, w1, p + offs, None, False)
            ww += a
            dd += b
    offs = full * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w0, w1 = _adamw_tile(p, g, m, v, x, offs, mask, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign, True, AMS)
    if TRACK:
        # Tile sums in tile order (tl.sum's fixed tree within a tile): deterministic.
        a, b = _track_sums(w0, w1, p + offs, mask, True)
        tl.store(partial_ptr + 2 * chunk + 0, ww + a)
        tl.store(partial_ptr + 2 * chunk + 1, dd + b)


@triton.jit
def chunk_sums_kernel(partial_ptr, chunks_ptr, out_ptr, COLS: tl.constexpr, RB: tl.constexpr):
    """out[i, :] = the sum of tensor i's chunk partials [first_i, first_i + count_i), COLS
    columns each, RB chunks per step then tl.sum's fixed tree: deterministic."""
    i = tl.program_id(0)
    first = tl.load(chunks_ptr + 2 * i)
    count = tl.load(chunks_ptr + 2 * i + 1)
    cols = tl.arange(0, COLS)
    acc = tl.zeros((RB, COLS), tl.float64)
    for k in range(0, count, RB):
        idx = k + tl.arange(0, RB)
        q = partial_ptr + (first + idx)[:, None] * COLS + cols[None, :]
        acc += tl.load(q, mask=(idx < count)[:, None], other=0.0)
    tl.store(out_ptr + COLS * i + cols, tl.sum(acc, axis=0))


_TL_DTYPE = C.TL_DTYPE


def launch_options():
    """Compile options of every launch (none under the interpreter)."""
    return {} if C.interpreting() else {"num_warps": C.NUM_WARPS, "enable_fp_fusion": False}


# Chunk partial sums added per step of chunk_sums_kernel's loop.
REDUCE_BLOCK = 64


def chunk_table(params, first) -> torch.Tensor:
    """[n, 2] int64 (first chunk, chunk count) per tensor, on the parameters' device; cached by
    the tensors' sizes (uploaded once, asynchronously: C.upload)."""
    return C.chunk_table(params, first)


# The schema of lvopt::fused_adamw_ (csrc/register.cpp), given explicitly: custom_op cannot infer
# an optional tensor list (max_exp_avg_sqs) from the annotations.
_ADAMW_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] steps, Tensor hyper, Tensor(e!)? found_inf=None, Tensor(f!)? stats=None, "
    "Tensor(g!)[]? max_exp_avg_sqs=None) -> ()"
)


@torch.library.custom_op(
    "lvopt_triton::fused_adamw_",
    schema=_ADAMW_SCHEMA,
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps", "found_inf", "stats", "max_exp_avg_sqs"),
)
def fused_adamw_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    steps: List[torch.Tensor],
    hyper: torch.Tensor,
    found_inf: Optional[torch.Tensor] = None,
    stats: Optional[torch.Tensor] = None,
    max_exp_avg_sqs: Optional[List[torch.Tensor]] = None,
) -> None:
    op = "lvopt::fused_adamw_"
    C.check_step_args(op, params, grads, exp_avgs, exp_avg_sqs, steps, hyper, max_exp_avg_sqs)
    ams = bool(max_exp_avg_sqs)
    C.check_found_inf(op, found_inf, params)
    if stats is not None:
        C.check_stats(op, stats, params, 2)
    if not params:
        if stats is not None:
            stats.zero_()
        return
    plan = P.plan_for(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs if ams else None)
    run(plan, params, grads, steps, hyper, found_inf, stats)


def run(plan, params, grads, steps, hyper, found_inf=None, stats=None, scanned=False) -> None:
    """One AdamW step through ``plan`` (lvopt/triton/_plan.py: the tables of these tensors,
    already pointed at ``grads``), the arguments checked. A fixed number of host operations and
    launches whatever the number of tensors: with found_inf the scan (the flag is set on the
    device, and the kernels read it: a set flag makes every program write nothing), the setup
    kernel (counters and coefficients), the update launches, and with stats the per-tensor sums.
    ``params`` and ``steps`` are used only where the plan has no device table for them (chunk
    sizes of a first tracked step; host step counters)."""
    opts, blk = launch_options(), C.block()
    if hyper.device != plan.device:
        hyper = C._upload(hyper, plan.device)  # a host table given to the op (the optimizer's is on the device)
    if stats is not None:
        stats.zero_()
    if found_inf is not None and not scanned:  # scanned: the caller scanned every plan of its step first
        plan.scan(found_inf)
    coef = plan.advance(steps, hyper, unit_step=False, found_inf=found_inf)
    if coef is None:
        return  # host step counters and a set flag: read on the host (C.advance_steps)
    track = stats is not None
    partials = plan.buffer("adamw_partials", max(plan.total, 1) * 2, torch.float64) if track else coef
    has_found = found_inf is not None
    flag = found_inf if has_found else coef
    for dtype, aligned, meta, n_tensors, n_programs in plan.tables.launches:
        adamw_kernel[(n_programs,)](
            meta,
            coef,
            partials,
            flag,
            n_tensors,
            P_DTYPE=C.TL_DTYPE[dtype],
            ALIGNED=aligned,
            CHUNK=C.CHUNK,
            BLOCK=blk,
            TRACK=track,
            HAS_FOUND=has_found,
            AMS=plan.ams,
            **opts,
        )
    if track:
        chunk_sums_kernel[(plan.n,)](partials, plan.chunks(params), stats, COLS=2, RB=REDUCE_BLOCK, **opts)


@fused_adamw_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, found_inf=None, stats=None, max_exp_avg_sqs=None):
    return None
