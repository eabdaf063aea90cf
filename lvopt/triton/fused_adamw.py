"""Triton fused multi-tensor AdamW: lvopt_triton::fused_adamw_, the signature and in-place
semantics of lvopt::fused_adamw_ (csrc/register.cpp).

Per element it is math.h's adamw_element, in the same order of fp32 operations, with IEEE
square root and division (tl.sqrt_rn, tl.div_rn) and no FMA contraction
(enable_fp_fusion=False), so a compiled kernel gives the CPU kernel's bits. Registered with
torch.library.custom_op + register_fake rather than triton_op (DESIGN.md section 3: the fake
trace of a triton_op fails for CPU tensors under TRITON_INTERPRET=1, and that is how it is
tested here).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _load_tensor(meta_ptr, n_tensors, P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 CHUNK: tl.constexpr):
    """The (tensor, chunk) of this program: pointers to its chunk, its length and indices."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    owner = tl.load(meta_ptr + n_tensors * 8 + pid)
    chunk = tl.load(meta_ptr + n_tensors * 8 + n_programs + pid)
    row = meta_ptr + owner * 8
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
    return p + begin, g + begin, m + begin, v + begin, n, index, first + chunk


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
    return (tl.load(c + 0), tl.load(c + 1), tl.load(c + 2), tl.load(c + 3), tl.load(c + 4),
            tl.load(c + 5), tl.load(c + 6), tl.load(c + 7), tl.load(c + 8))


@triton.jit
def _adamw_tile(p, g, m, v, offs, mask, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign,
                MASKED: tl.constexpr):
    if MASKED:
        pi = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
        gi = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
        mi = tl.load(m + offs, mask=mask, other=0.0)
        vi = tl.load(v + offs, mask=mask, other=0.0)
    else:
        pi = tl.load(p + offs).to(tl.float32)
        gi = tl.load(g + offs).to(tl.float32)
        mi = tl.load(m + offs)
        vi = tl.load(v + offs)
    gi = sign * gi
    pi = pi * decay
    mi = b1 * mi + omb1 * gi
    vi = b2 * vi + omb2 * (gi * gi)
    denom = tl.sqrt_rn(vi) * inv_bc2 + eps
    pi = pi - tl.div_rn(step_size * mi, denom)
    if MASKED:
        tl.store(m + offs, mi, mask=mask)
        tl.store(v + offs, vi, mask=mask)
    else:
        tl.store(m + offs, mi)
        tl.store(v + offs, vi)
    _store_param(p + offs, pi, mask, MASKED)


@triton.jit
def adamw_kernel(meta_ptr, coef_ptr, n_tensors, P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    p, g, m, v, n, index, _ = _load_tensor(meta_ptr, n_tensors, P_DTYPE, ALIGNED, CHUNK)
    b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign = _coef(coef_ptr, index)
    full = n // BLOCK
    for t in range(0, full):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        _adamw_tile(p, g, m, v, offs, None, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps,
                    sign, False)
    offs = full * BLOCK + tl.arange(0, BLOCK)
    _adamw_tile(p, g, m, v, offs, offs < n, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps,
                sign, True)


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


def launch_options():
    """Compile options of every launch (none under the interpreter)."""
    return {} if C.interpreting() else {"num_warps": C.NUM_WARPS, "enable_fp_fusion": False}


@torch.library.custom_op("lvopt_triton::fused_adamw_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def fused_adamw_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                 exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], hyper: torch.Tensor) -> None:
    C.check_step_args("lvopt::fused_adamw_", params, grads, exp_avgs, exp_avg_sqs, steps, hyper)
    if not params:
        return
    dev = params[0].device
    coef = C.advance_steps(steps, hyper, dev, unit_step=False)
    first, _ = C.first_chunks(params)
    for dtype, aligned, meta, n_tensors, n_programs in C.launches(params, grads, exp_avgs, exp_avg_sqs, first):
        adamw_kernel[(n_programs,)](meta, coef, n_tensors, P_DTYPE=_TL_DTYPE[dtype], ALIGNED=aligned,
                                    CHUNK=C.CHUNK, BLOCK=C.block(), **launch_options())


@fused_adamw_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, hyper):
    return None
