"""Triton sparse embedding rows (docs/design.md section 2.3, docs/sparse-rows.md):
lvopt_triton::coalesce_rows, lvopt_triton::sparse_adamw_ and lvopt_triton::sparse_catchup_, the
signatures and in-place semantics of the lvopt ops of csrc/cpu/sparse_rows.cpp
(csrc/register.cpp), and the plan of the CUDA op (csrc/cuda/sparse_rows.cu).

Host side of a step with an error word (the optimizer's call): no host read of device memory
and launches whose grids depend on N (the number of ids) only, never on the data:

  torch.aminmax          the ids' range, on the device
  _setup_kernel          1 program: the error word (ids out of range, the history's
                         coverage), the step count read on the device, the step's fp32
                         coefficients (make_adam_coef of math.h: fp64, integer powers by
                         squaring), the target step
  torch.sort (stable)    ids sorted, perm = input positions in that order
  _runs_kernel           N programs: run starts (sorted[i] != sorted[i-1]) as 0/1
  torch.cumsum           run number of each sorted position; the run count U is its last
                         entry, on the device
  _offsets_kernel        N programs: rows[run] and offsets[run] of each run's first position
  _piece_table_kernel,   N programs, N/16 + 1 programs: rows given more than 32 times,
  _partial_sums_kernel   summed in pieces of 32 rows
  _scalars_kernel        N programs (exact): each row's last step, the clock check, and its
                         catch-up scalars (sparse_clock.h Clock::row, fp64)
  sparse_rows_kernel     N programs, one per distinct row; programs past U return
  _stats_kernel          1 program (track): the rows' telemetry sums in row order
  _finish_kernel         1 program: step count += 1 unless the error word is set

flags (the CUDA op's): SPARSE_COALESCED (the ids are sorted and distinct) makes the plan two
aranges and a fill (no sort, _runs_kernel, cumsum, _offsets_kernel or pieces); SPARSE_RING (a
RingClock's device ring, lvopt/sparse.py) makes _setup_kernel append the step's history row and
the kernels index the history modulo its rows. A hyper row on the param's device is read by
_setup_kernel (HYPER_DEV), so that nothing a replayed launch takes by value changes between
steps.

Without an error word (a direct call) the op raises for bad ids or a stale clock, with the CPU
op's messages, which needs host reads (_raise_for_indices, _raise_for_clock).

Kernels: one program per distinct row, looping over width tiles; a row's gradient is the sum of
its value rows in input order in fp32 (fused into the update kernel, as the CPU op does: the
summed gradient is not rounded to bf16 before the update). Per element the math is math.h's,
in the same order of fp32 operations, with IEEE square root and division (tl.sqrt_rn /
tl.div_rn) and no FMA contraction (enable_fp_fusion=False): adamw_element, and in exact mode
catchup_element_fast, and for the elements whose v lies between rev_v and fwd_v
catchup_element_loop's fp64 sum over the window, its terms computed in the kernel from the
history (Clock::term). The catch-up scalars are computed on the device in fp64 (exp, and
integer powers by squaring where Clock::row calls pow): they may differ from the CPU op's libm
values in the last fp64 bit, which changes an fp32-rounded scalar only rarely (tests allow 4
fp32 ulps against the CPU op in exact mode). A row given more than RUN = 32 times (the head of a
Zipf batch) is summed in pieces of 32 rows by programs of their own (_piece_table_kernel numbers
them from a device counter, _partial_sums_kernel sums them), then the pieces in order: the
grouping of the CUDA kernel, so rows given at most 32 times match the CPU op's sums bit for bit
and longer runs match the CUDA op's.
"""

from __future__ import annotations

import math
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from .._layout import (
    BETA1,
    BETA2,
    EPS,
    HIST_COLS,
    HIST_SERIES,
    HYPER_COLS,
    LR,
    MAXIMIZE,
    SPARSE_COALESCED,
    SPARSE_RING,
    WEIGHT_DECAY,
)
from . import _common as C
from .fused_adamw import _coef, _store_param, _store_state, _track_sums, adamw_math, launch_options

# The kernels spell the history table's layout as literals (a row is 13 columns: log Pi at 2,
# sqrt(bc2) at 4, the series from 5) and the series limit as 100.0: lvopt/_layout.py's HIST_COLS,
# H_LOGPI, H_U, H_SQRTBC2, H_SERIES and SERIES_LIMIT (math.h HistCol, sparse_clock.h kSeriesLimit).
# Columns of the per-row catch-up table (CatchupRow): P, b1k, b2k, M0..M3, N1..N4, fwd_v, rev_v.
CR_COLS = 13
# The error word's codes (lvopt/_layout.py ERR_IDS = 1, ERR_CLOCK = 2) are literals in the kernels.
# The ops' flags bits: lvopt/_layout.py SPARSE_COALESCED, SPARSE_RING.
# Whether the row kernel runs catchup_element_loop for the elements between the series (a test
# turns it off to show that those elements need it).
WINDOW_LOOP = True


def _width_block(d: int, exact: bool = False) -> int:
    """Width tile: the largest power of two <= d, 64 .. 1024 (512 for the exact-mode kernels,
    whose catch-up and fp64 window loop would otherwise need more than 128 registers and spill:
    benchmarks/sass_report.py), so that most of a row is full (unmasked) tiles; under the
    interpreter 32, so that the small test widths have full tiles and a masked tail (the same
    code paths)."""
    if C.interpreting():
        return 32
    return max(64, min(512 if exact else 1024, 1 << (max(d, 1).bit_length() - 1)))


def _addr(t: torch.Tensor) -> int:
    """A tensor's address for the alignment test. A fake tensor (the tests' traces of the host
    path) has no storage: its byte offset stands in, the value its deprecated data_ptr() gives."""
    if isinstance(t, FakeTensor):
        return t.storage_offset() * t.element_size()
    return t.data_ptr()


def _aligned(d: int, dtype: torch.dtype, *ts) -> bool:
    """Every row of every tensor starts 16-byte aligned (rows of 16-byte multiples)."""
    return (d * (2 if dtype == torch.bfloat16 else 4)) % 16 == 0 and d % 4 == 0 and all(_addr(t) % 16 == 0 for t in ts)


def _bits(x: float) -> int:
    """The fp64 bit pattern of x as an int64, for a kernel to bitcast back (Triton passes
    Python floats as fp32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _f32(x: float) -> float:
    """x rounded to fp32 (as static_cast<float>)."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def launch(kernel, grid, *args, **kwargs):
    """Every launch of this module goes through here (a test records them on fake tensors)."""
    kernel[grid](*args, **kwargs)


# ----- kernels ---------------------------------------------------------------------------------


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0)
    return tl.load(ptr)


@triton.jit
def _value_row(vals_ptr, perm_ptr, i, d, ALIGNED: tl.constexpr):
    src = tl.load(perm_ptr + i)
    q = vals_ptr + src * d
    if ALIGNED:
        q = tl.multiple_of(q, 16)
    return q


@triton.jit
def _grad_tile(vals_ptr, perm_ptr, g_lo, g_hi, d, offs, mask, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Sum of the value rows perm[g_lo .. g_hi) at columns offs, in that order, in fp32 (the
    first row is taken as it is: 0 + x would turn -0.0 into +0.0)."""
    acc = _load(_value_row(vals_ptr, perm_ptr, g_lo, d, ALIGNED) + offs, mask, MASKED).to(tl.float32)
    for i in range(g_lo + 1, g_hi):
        acc = acc + _load(_value_row(vals_ptr, perm_ptr, i, d, ALIGNED) + offs, mask, MASKED).to(tl.float32)
    return acc


@triton.jit
def _row_grad_tile(
    vals_ptr,
    perm_ptr,
    part_ptr,
    part_first,
    g_lo,
    g_hi,
    d,
    offs,
    mask,
    ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
    RUN: tl.constexpr,
):
    """A row's gradient at columns offs: a row given at most RUN times sums its value rows in
    input order (as _grad_tile); a longer run adds the sums of its pieces of RUN rows (computed
    by _partial_sums_kernel, rows part_first, part_first + 1, ... of part_ptr) in order, as the
    CUDA kernel does: a fixed grouping, so the bits stay deterministic. Written without an
    if/else on the run's length (one accumulator, two loops of which one is empty): the merge of
    two branches' tiles made the bf16 kernel spill."""
    long = g_hi - g_lo > RUN
    n_parts = tl.where(long, (g_hi - g_lo + RUN - 1) // RUN, 0)
    direct_hi = tl.where(long, g_lo, g_hi)
    first_mask = mask & long if MASKED else long
    from_part = tl.load(part_ptr + part_first * d + offs, mask=first_mask, other=0.0)
    from_vals = tl.load(
        _value_row(vals_ptr, perm_ptr, g_lo, d, ALIGNED) + offs, mask=(mask & (~long)) if MASKED else ~long, other=0.0
    ).to(tl.float32)
    acc = tl.where(long, from_part, from_vals)
    for c in range(1, n_parts):
        acc = acc + _load(part_ptr + (part_first + c) * d + offs, mask, MASKED)
    for i in range(g_lo + 1, direct_hi):
        acc = acc + _load(_value_row(vals_ptr, perm_ptr, i, d, ALIGNED) + offs, mask, MASKED).to(tl.float32)
    return acc


@triton.jit
def _piece_table_kernel(offsets_ptr, num_runs_ptr, part_start_ptr, owner_ptr, count_ptr, RUN: tl.constexpr):
    """One program per run k (programs past U return): a row given more than RUN times gets
    ceil(count / RUN) consecutive piece numbers from one device counter (which row gets which
    numbers is the schedule's; no result depends on it)."""
    k = tl.program_id(0)
    if k < tl.load(num_runs_ptr):
        c = tl.load(offsets_ptr + k + 1) - tl.load(offsets_ptr + k)
        if c > RUN:
            n = (c + RUN - 1) // RUN
            first = tl.atomic_add(count_ptr, n)
            tl.store(part_start_ptr + k, first)
            for j in range(0, n):
                tl.store(owner_ptr + first + j, k)


@triton.jit
def _partial_sums_kernel(
    vals_ptr,
    perm_ptr,
    offsets_ptr,
    owner_ptr,
    part_start_ptr,
    count_ptr,
    part_ptr,
    d,
    ALIGNED: tl.constexpr,
    RUN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per piece q (programs past the counter return): the fp32 sum of its (at most
    RUN) value rows in input order, into part[q]."""
    q = tl.program_id(0)
    if q < tl.load(count_ptr):
        k = tl.load(owner_ptr + q)
        lo = tl.load(offsets_ptr + k) + (q - tl.load(part_start_ptr + k)) * RUN
        hi = tl.minimum(lo + RUN, tl.load(offsets_ptr + k + 1))
        out = part_ptr + q.to(tl.int64) * d
        full = d // BLOCK_D
        for t in range(0, full):
            offs = t * BLOCK_D + tl.arange(0, BLOCK_D)
            tl.store(out + offs, _grad_tile(vals_ptr, perm_ptr, lo, hi, d, offs, None, ALIGNED, False))
        offs = full * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < d
        tl.store(out + offs, _grad_tile(vals_ptr, perm_ptr, lo, hi, d, offs, mask, ALIGNED, True), mask=mask)


@triton.jit
def coalesce_kernel(vals_ptr, perm_ptr, offsets_ptr, out_ptr, d, ALIGNED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row k of out = the sum of its value rows; full tiles unmasked (16-byte vectors when
    ALIGNED: every row starts 16-byte aligned), then a masked tail."""
    k = tl.program_id(0)
    g_lo = tl.load(offsets_ptr + k)
    g_hi = tl.load(offsets_ptr + k + 1)
    row = out_ptr + k.to(tl.int64) * d
    if ALIGNED:
        row = tl.multiple_of(row, 16)
    full = d // BLOCK_D
    for t in range(0, full):
        offs = t * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = _grad_tile(vals_ptr, perm_ptr, g_lo, g_hi, d, offs, None, ALIGNED, False)
        _store_param(row + offs, acc, None, False)
    offs = full * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < d
    acc = _grad_tile(vals_ptr, perm_ptr, g_lo, g_hi, d, offs, mask, ALIGNED, True)
    _store_param(row + offs, acc, mask, True)


@triton.jit
def _f64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _powi(b, n):
    """b**n for fp64 b and an integer n >= 0, by squaring (a few fp64 ulps from libm's pow)."""
    r = b * 0.0 + 1.0
    x = b
    e = n
    while e > 0:
        if e % 2 == 1:
            r = r * x
        x = x * x
        e = e // 2
    return r


@triton.jit
def _setup_kernel(
    step_ptr,
    lo_ptr,
    hi_ptr,
    err_ptr,
    info_ptr,
    coef_ptr,
    clk_ptr,
    hyper_ptr,
    hist_ptr,
    qpow_ptr,
    n_ids,
    num_rows,
    hist_base,
    hist_rows,
    ring,
    epoch,
    qcols,
    lr_b,
    b1_b,
    b2_b,
    wd_b,
    eps_b,
    sign,
    STEP_OP: tl.constexpr,
    EXACT: tl.constexpr,
    HYPER_DEV: tl.constexpr,
    RING: tl.constexpr,
):
    """One program: the error word for the ids' range, the step count, info = (target step,
    new last step), the step's coefficients [9] (fused_adamw._coef's layout), and in exact
    mode clk = (beta1, beta2, eps as fp32) for the scalars kernel and, with a ring history
    (RING), the step's history row (RowClock.append's formula, fp64; appended here so that a
    captured step appends at each replay). HYPER_DEV: the hyper row is read at hyper_ptr (a
    device row), else the *_b arguments carry its values."""
    if n_ids > 0:
        lo = tl.load(lo_ptr)
        hi = tl.load(hi_ptr)
        if tl.load(err_ptr) == 0:
            if (lo < 0) | (hi >= num_rows):
                tl.store(err_ptr, 1)
                tl.store(err_ptr + 1, lo)
                tl.store(err_ptr + 2, hi)
    s = tl.load(step_ptr).to(tl.float64)
    if STEP_OP:
        t = s + 1.0
        target = (t - 1.0).to(tl.int64)
    else:
        t = s
        target = t.to(tl.int64)
    tl.store(info_ptr, target)
    tl.store(info_ptr + 1, t.to(tl.int64))
    if HYPER_DEV:
        lr = tl.load(hyper_ptr + 0)
        b1 = tl.load(hyper_ptr + 1)
        b2 = tl.load(hyper_ptr + 2)
        wd = tl.load(hyper_ptr + 3)
        eps = tl.load(hyper_ptr + 4)
        sgn = tl.where(tl.load(hyper_ptr + 5) != 0.0, -1.0, 1.0).to(tl.float32)
    else:
        lr = _f64(lr_b)
        b1 = _f64(b1_b)
        b2 = _f64(b2_b)
        wd = _f64(wd_b)
        eps = _f64(eps_b)
        sgn = sign
    if EXACT:
        tl.store(clk_ptr, b1)
        tl.store(clk_ptr + 1, b2)
        tl.store(clk_ptr + 2, eps.to(tl.float32).to(tl.float64))
        if RING:
            if target < hist_base:
                tl.atomic_or(err_ptr, 2)
        else:
            if (target < hist_base) | (target - hist_base >= hist_rows):
                tl.atomic_or(err_ptr, 2)
        if RING:
            if STEP_OP:
                if tl.load(err_ptr) == 0:
                    _append_history(hist_ptr, qpow_ptr, target + 1, hist_base, ring, epoch, qcols, lr, wd, b1, b2)
    if STEP_OP:
        ti = t.to(tl.int64)
        bc1 = 1.0 - _powi(b1, ti)
        bc2 = 1.0 - _powi(b2, ti)
        tl.store(coef_ptr + 0, b1.to(tl.float32))
        tl.store(coef_ptr + 1, (1.0 - b1).to(tl.float32))
        tl.store(coef_ptr + 2, b2.to(tl.float32))
        tl.store(coef_ptr + 3, (1.0 - b2).to(tl.float32))
        tl.store(coef_ptr + 4, (1.0 - lr * wd).to(tl.float32))
        tl.store(coef_ptr + 5, (lr / bc1).to(tl.float32))
        tl.store(coef_ptr + 6, (1.0 / tl.sqrt(bc2)).to(tl.float32))
        tl.store(coef_ptr + 7, eps.to(tl.float32))
        tl.store(coef_ptr + 8, sgn)
    else:
        tl.store(coef_ptr + 7, eps.to(tl.float32))


@triton.jit
def _append_history(hist_ptr, qpow_ptr, t, base, ring, epoch, qcols, lr, wd, b1, b2):
    """Ring history: the row of step t (csrc/cuda/sparse_rows.cu append_history)."""
    prev = hist_ptr + ((t - 1 - base) % ring) * 13
    out = hist_ptr + ((t - base) % ring) * 13
    b = base + epoch * ((t - 1 - base) // epoch)
    k = t - b
    d = 1.0 - lr * wd
    log_pi = tl.load(prev + 2) + tl.log(d)
    bc1 = 1.0 - _powi(b1, t)
    bc2 = 1.0 - _powi(b2, t)
    sb = tl.sqrt(bc2)
    scale = tl.exp(tl.load(hist_ptr + ((b - base) % ring) * 13 + 2) - log_pi)
    lb = lr / bc1
    i8 = tl.arange(0, 8)
    # bc2^(h/2) for M_0..M_3 (h = 1..4) and N_1..N_4 (h = 0, -1, -2, -3).
    pw = tl.where(
        i8 == 0,
        sb,
        tl.where(
            i8 == 1,
            bc2,
            tl.where(
                i8 == 2,
                bc2 * sb,
                tl.where(
                    i8 == 3,
                    bc2 * bc2,
                    tl.where(i8 == 4, 1.0, tl.where(i8 == 5, 1.0 / sb, tl.where(i8 == 6, 1.0 / bc2, 1.0 / (bc2 * sb)))),
                ),
            ),
        ),
    )
    qk = tl.load(qpow_ptr + i8 * qcols + k + epoch)
    prev_s = tl.where(t - 1 > b, tl.load(prev + 5 + i8), 0.0)
    series = prev_s + lb * pw * qk * scale
    tl.store(out + 0, lr)
    tl.store(out + 1, d)
    tl.store(out + 2, log_pi)
    tl.store(out + 3, lb * sb)
    tl.store(out + 4, sb)
    tl.store(out + 5 + i8, series)


@triton.jit
def _finish_kernel(step_ptr, err_ptr):
    """One program: the step count advances unless the call wrote nothing."""
    if tl.load(err_ptr) == 0:
        tl.store(step_ptr, tl.load(step_ptr) + 1)


@triton.jit
def _runs_kernel(sorted_ptr, starts_ptr, n, BLOCK: tl.constexpr):
    """starts[i] = 1 where sorted position i begins a run of equal ids."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    x = tl.load(sorted_ptr + i, mask=inside, other=0)
    prev = tl.load(sorted_ptr + i - 1, mask=inside & (i > 0), other=0)
    new = (i == 0) | (x != prev)
    tl.store(starts_ptr + i, new.to(tl.int64), mask=inside)


@triton.jit
def _offsets_kernel(sorted_ptr, starts_ptr, run_ptr, rows_ptr, offsets_ptr, num_runs_ptr, n, BLOCK: tl.constexpr):
    """For each run's first position i: rows[run] = sorted[i], offsets[run] = i; offsets[U] = n
    (run = the inclusive count of run starts up to i, minus one)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    new = tl.load(starts_ptr + i, mask=inside, other=0) != 0
    run = tl.load(run_ptr + i, mask=inside, other=1) - 1
    x = tl.load(sorted_ptr + i, mask=inside, other=0)
    tl.store(rows_ptr + run, x, mask=inside & new)
    tl.store(offsets_ptr + run, i.to(tl.int64), mask=inside & new)
    last = i == n - 1
    tl.store(offsets_ptr + run + 1, (i + 1).to(tl.int64), mask=inside & last)
    tl.store(num_runs_ptr + i * 0, run + 1, mask=inside & last)


@triton.jit
def _scalars_kernel(
    rows_ptr,
    num_runs_ptr,
    last_ptr,
    info_ptr,
    err_ptr,
    hist_ptr,
    qpow_ptr,
    row_last_ptr,
    cr_ptr,
    clk_ptr,
    base,
    epoch,
    window,
    qcols,
    ring,
):
    """Exact mode, one program per distinct row k (programs past U return): its last step s,
    the clock check (s in [base, target], else ERR_CLOCK), and when it is behind its catch-up
    scalars (sparse_clock.h Clock::row, fp64) into cr[k]."""
    k = tl.program_id(0)
    if k < tl.load(num_runs_ptr):
        if tl.load(err_ptr) == 0:
            c = tl.load(info_ptr)
            s = tl.load(last_ptr + tl.load(rows_ptr + k))
            tl.store(row_last_ptr + k, s)
            # A ring history must still hold the row's epoch start (and not have reused its slot
            # for the step this call appended); ring = 2**62 without one.
            lost = c + 1 - (base + epoch * ((s - base) // epoch)) >= ring
            if (s < base) | (s > c) | lost:
                tl.atomic_or(err_ptr, 2)
            elif s < c:
                b1 = tl.load(clk_ptr)
                b2 = tl.load(clk_ptr + 1)
                eps = tl.load(clk_ptr + 2)
                log_pi_c = tl.load(hist_ptr + ((c - base) % ring) * 13 + 2)
                P = tl.exp(log_pi_c - tl.load(hist_ptr + ((s - base) % ring) * 13 + 2))
                b1k = _powi(b1, c - s)
                b2k = _powi(b2, c - s)
                i8 = tl.arange(0, 8)
                S = tl.zeros((8,), tl.float64)
                yend = tl.minimum(c, s + window)
                fwd_v = tl.full([], float("inf"), tl.float32)
                rev_v = tl.full([], float("inf"), tl.float32)
                if yend > s:
                    b = base + epoch * ((s - base) // epoch)
                    x = s
                    while x < yend:
                        ye = tl.minimum(b + epoch, yend)
                        scale = tl.exp(log_pi_c - tl.load(hist_ptr + ((b - base) % ring) * 13 + 2))
                        hy = tl.load(hist_ptr + ((ye - base) % ring) * 13 + 5 + i8)
                        hx = tl.load(hist_ptr + ((x - base) % ring) * 13 + 5 + i8)
                        if x <= b:
                            hx = hx * 0.0
                        q = tl.load(qpow_ptr + i8 * qcols + (b - s) + epoch)
                        S = S + scale * q * (hy - hx)
                        x = ye
                        b = b + epoch
                    a_min = tl.load(hist_ptr + ((s + 1 - base) % ring) * 13 + 4) / tl.sqrt(b2)
                    a_max = tl.load(hist_ptr + ((yend - base) % ring) * 13 + 4) / tl.sqrt(_powi(b2, yend - s))
                    fwd = 100.0 * eps * a_max
                    rev = eps * a_min / 100.0
                    fwd_v = (fwd * fwd).to(tl.float32)
                    rev_v = (rev * rev).to(tl.float32)
                out = cr_ptr + k * 13
                tl.store(out + 0, P.to(tl.float32))
                tl.store(out + 1, b1k.to(tl.float32))
                tl.store(out + 2, b2k.to(tl.float32))
                tl.store(out + 3 + i8, S.to(tl.float32))
                tl.store(out + 11, fwd_v)
                tl.store(out + 12, rev_v)


@triton.jit
def _hrow(j, base, ring, RING: tl.constexpr):
    """The history row of step j: j - base, modulo the ring's rows with a ring history (a
    constexpr, so that the kernels without one compile as they did)."""
    if RING:
        return (j - base) % ring
    return j - base


@triton.jit
def _catchup_tile(
    pi,
    mi,
    vi,
    mask,
    cr_ptr,
    ceps,
    s,
    c,
    hist_ptr,
    qpow_ptr,
    base,
    epoch,
    window,
    qcols,
    ring,
    LOOP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RING: tl.constexpr,
):
    """math.h catchup_element_fast, and catchup_element_loop (terms from Clock::term, fp64) for
    the tile's elements with v between rev_v and fwd_v."""
    P = tl.load(cr_ptr + 0)
    b1k = tl.load(cr_ptr + 1)
    b2k = tl.load(cr_ptr + 2)
    M0 = tl.load(cr_ptr + 3)
    M1 = tl.load(cr_ptr + 4)
    M2 = tl.load(cr_ptr + 5)
    M3 = tl.load(cr_ptr + 6)
    N1 = tl.load(cr_ptr + 7)
    N2 = tl.load(cr_ptr + 8)
    N3 = tl.load(cr_ptr + 9)
    N4 = tl.load(cr_ptr + 10)
    fwd_v = tl.load(cr_ptr + 11)
    rev_v = tl.load(cr_ptr + 12)
    one = tl.full((BLOCK_D,), 1.0, tl.float32)
    epsv = tl.full((BLOCK_D,), 0.0, tl.float32) + ceps
    r = tl.sqrt_rn(vi)
    inv_r = tl.div_rn(one, r)
    inv_eps = tl.div_rn(one, epsv)
    e = ceps * inv_r
    fwd = (mi * inv_r) * (M0 - e * (M1 - e * (M2 - e * M3)))
    x = r * inv_eps
    rev = (mi * inv_eps) * (N1 - x * (N2 - x * (N3 - x * N4)))
    upd = tl.where(vi >= fwd_v, fwd, rev)
    p_new = pi * P - upd
    if LOOP:
        mid = (~(vi >= fwd_v)) & (~(vi <= rev_v)) & mask  # NaN v counts as mid, as in the CPU kernel's passes
        if tl.sum(mid.to(tl.int32), axis=0) > 0:
            # fp64 sqrt and / are IEEE (sqrt.rn.f64, div.rn.f64). catchup_element_loop's r = 0
            # branch is never taken here: v = 0 satisfies v <= rev_v (>= 0), so a mid element
            # has r > 0 (or is NaN, NaN either way); other lanes' values are discarded below.
            rd = tl.sqrt(vi.to(tl.float64))
            e64 = ceps.to(tl.float64) / rd
            acc = tl.zeros((BLOCK_D,), tl.float64)
            log_pi_c = tl.load(hist_ptr + _hrow(c, base, ring, RING) * 13 + 2)
            yend = tl.minimum(c, s + window)
            for j in range(s + 1, yend + 1):
                h = hist_ptr + _hrow(j, base, ring, RING) * 13
                q0 = tl.load(qpow_ptr + (j - s) + epoch)
                wj = tl.exp(log_pi_c - tl.load(h + 2)) * tl.load(h + 3) * q0
                aj = tl.load(h + 4) * tl.load(qpow_ptr + qcols + (j - s) + epoch) / q0
                acc = acc + wj / (1.0 + e64 * aj)
            acc = acc * (mi.to(tl.float64) / rd)
            p_new = tl.where(mid, pi * P - acc.to(tl.float32), p_new)
    return p_new, mi * b1k, vi * b2k


@triton.jit
def _row_tile(
    p,
    m,
    v,
    vals_ptr,
    perm_ptr,
    part_ptr,
    part_first,
    g_lo,
    g_hi,
    d,
    offs,
    mask,
    coef_ptr,
    cr_ptr,
    ceps,
    behind,
    s,
    c,
    hist_ptr,
    qpow_ptr,
    base,
    epoch,
    window,
    qcols,
    ring,
    HAS_GRAD: tl.constexpr,
    EXACT: tl.constexpr,
    ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
    LOOP: tl.constexpr,
    SPLIT: tl.constexpr,
    RUN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RING: tl.constexpr,
):
    """One tile of a row: [exact: catch-up if behind], [AdamW step], stores; returns the tile's
    fp64 (sum W^2, sum dW^2) (unused values cost nothing)."""
    pi = _load(p + offs, mask, MASKED).to(tl.float32)
    mi = _load(m + offs, mask, MASKED)
    vi = _load(v + offs, mask, MASKED)
    w0 = pi
    if EXACT:
        if behind:
            pi, mi, vi = _catchup_tile(
                pi,
                mi,
                vi,
                mask,
                cr_ptr,
                ceps,
                s,
                c,
                hist_ptr,
                qpow_ptr,
                base,
                epoch,
                window,
                qcols,
                ring,
                LOOP,
                BLOCK_D,
                RING,
            )
    if HAS_GRAD:
        b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign = _coef(coef_ptr, 0)
        if SPLIT:
            gi = _row_grad_tile(
                vals_ptr, perm_ptr, part_ptr, part_first, g_lo, g_hi, d, offs, mask, ALIGNED, MASKED, RUN
            )
        else:
            gi = _grad_tile(vals_ptr, perm_ptr, g_lo, g_hi, d, offs, mask, ALIGNED, MASKED)
        pi, mi, vi = adamw_math(pi, gi, mi, vi, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign)
    _store_state(m, v, offs, mask, mi, vi, MASKED)
    _store_param(p + offs, pi, mask, MASKED)
    return _track_sums(w0, pi, p, mask, MASKED)


@triton.jit
def _row_has_mid(v, d, cr_ptr, BLOCK_D: tl.constexpr):
    """Whether an element of a behind row's v lies between rev_v and fwd_v (NaN included), so
    that it needs catchup_element_loop: one read of the row's v (the update's read of it then
    hits the cache)."""
    fwd_v = tl.load(cr_ptr + 11)
    rev_v = tl.load(cr_ptr + 12)
    n = 0
    for t in range(0, tl.cdiv(d, BLOCK_D)):
        offs = t * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < d
        vi = tl.load(v + offs, mask=mask, other=0.0)
        mid = (~(vi >= fwd_v)) & (~(vi <= rev_v)) & mask
        n += tl.sum(mid.to(tl.int32), axis=0)
    return n > 0


@triton.jit
def sparse_rows_kernel(
    p_ptr,
    m_ptr,
    v_ptr,
    vals_ptr,
    rows_ptr,
    perm_ptr,
    offsets_ptr,
    num_runs_ptr,
    err_ptr,
    info_ptr,
    coef_ptr,
    row_last_ptr,
    last_ptr,
    cr_ptr,
    hist_ptr,
    qpow_ptr,
    partial_ptr,
    part_ptr,
    part_start_ptr,
    loop_ptr,
    d,
    base,
    epoch,
    window,
    qcols,
    ring,
    HAS_GRAD: tl.constexpr,
    EXACT: tl.constexpr,
    TRACK: tl.constexpr,
    ALIGNED: tl.constexpr,
    DEFER: tl.constexpr,
    LOOP_LIST: tl.constexpr,
    SPLIT: tl.constexpr,
    RUN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RING: tl.constexpr = False,
):
    """One distinct row per program (programs past U, or all of them when the error word is
    set, return): [exact: catch-up if behind] then [HAS_GRAD: AdamW step with the row's summed
    gradient]; TRACK: the row's fp64 (sum W^2, sum dW^2), tiles added in order. Full tiles
    unmasked (16-byte vectors when ALIGNED), then a masked tail. Exact mode: the row's last
    step becomes the step's.

    DEFER: a behind row with an element for the exact windowed loop is left untouched and
    appended to the loop list (loop_ptr: count, then row numbers; its order is the schedule's,
    and each listed row is then done whole by one program, so no bits depend on it).
    LOOP_LIST: this launch does the listed rows, with catchup_element_loop for those elements
    (the fp64 loop lives only in this variant, which keeps the streaming variant at ~96
    registers and spill-free)."""
    q = tl.program_id(0)
    if LOOP_LIST:
        active = q < tl.load(loop_ptr)
        k = tl.load(loop_ptr + 1 + q, mask=active, other=0)
    else:
        active = q < tl.load(num_runs_ptr)
        k = q.to(tl.int64)
    if active:
        if tl.load(err_ptr) == 0:
            r = tl.load(rows_ptr + k)
            base_off = r * d
            p = p_ptr + base_off
            m = m_ptr + base_off
            v = v_ptr + base_off
            if ALIGNED:
                p = tl.multiple_of(p, 16)
                m = tl.multiple_of(m, 16)
                v = tl.multiple_of(v, 16)
            g_lo = 0
            g_hi = 0
            part_first = tl.full([], 0, tl.int64)
            if HAS_GRAD:
                g_lo = tl.load(offsets_ptr + k)
                g_hi = tl.load(offsets_ptr + k + 1)
                if SPLIT:
                    if g_hi - g_lo > RUN:
                        part_first = tl.load(part_start_ptr + k)
            ceps = tl.load(coef_ptr + 7)
            c = tl.load(info_ptr)
            s = c
            if EXACT:
                s = tl.load(row_last_ptr + k)
            behind = s < c
            cr = cr_ptr + k * 13
            # A catch-up of a row already current has nothing to do.
            go = (behind.to(tl.int32) + HAS_GRAD) > 0
            if DEFER:
                if behind:
                    if _row_has_mid(v, d, cr, BLOCK_D):
                        slot = tl.atomic_add(loop_ptr, 1)
                        tl.store(loop_ptr + 1 + slot, k)
                        go = s != s
            if go:
                ww = tl.sum(tl.zeros((BLOCK_D,), tl.float64), axis=0)
                dd = ww
                full = d // BLOCK_D
                for t in range(0, full):
                    offs = t * BLOCK_D + tl.arange(0, BLOCK_D)
                    a, b = _row_tile(
                        p,
                        m,
                        v,
                        vals_ptr,
                        perm_ptr,
                        part_ptr,
                        part_first,
                        g_lo,
                        g_hi,
                        d,
                        offs,
                        offs < d,
                        coef_ptr,
                        cr,
                        ceps,
                        behind,
                        s,
                        c,
                        hist_ptr,
                        qpow_ptr,
                        base,
                        epoch,
                        window,
                        qcols,
                        ring,
                        HAS_GRAD,
                        EXACT,
                        ALIGNED,
                        False,
                        LOOP_LIST,
                        SPLIT,
                        RUN,
                        BLOCK_D,
                        RING,
                    )
                    if TRACK:
                        ww += a
                        dd += b
                offs = full * BLOCK_D + tl.arange(0, BLOCK_D)
                a, b = _row_tile(
                    p,
                    m,
                    v,
                    vals_ptr,
                    perm_ptr,
                    part_ptr,
                    part_first,
                    g_lo,
                    g_hi,
                    d,
                    offs,
                    offs < d,
                    coef_ptr,
                    cr,
                    ceps,
                    behind,
                    s,
                    c,
                    hist_ptr,
                    qpow_ptr,
                    base,
                    epoch,
                    window,
                    qcols,
                    ring,
                    HAS_GRAD,
                    EXACT,
                    ALIGNED,
                    True,
                    LOOP_LIST,
                    SPLIT,
                    RUN,
                    BLOCK_D,
                    RING,
                )
                if TRACK:
                    tl.store(partial_ptr + 2 * k + 0, ww + a)
                    tl.store(partial_ptr + 2 * k + 1, dd + b)
                if EXACT:
                    # The row kernel reads each row's last step from the snapshot (row_last), so
                    # this write races with no read.
                    tl.store(last_ptr + r, tl.load(info_ptr + 1))


@triton.jit
def _stats_kernel(partial_ptr, num_runs_ptr, err_ptr, stats_ptr, n, BLOCK: tl.constexpr):
    """One program: stats = the rows' sums in row order, BLOCK rows at a time (a fixed order:
    deterministic); zeros when the call wrote nothing."""
    u = tl.load(num_runs_ptr)
    u = tl.where(tl.load(err_ptr) == 0, u, 0)
    acc0 = tl.zeros((BLOCK,), tl.float64)
    acc1 = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)
        inside = k < u
        acc0 += tl.load(partial_ptr + 2 * k, mask=inside, other=0.0)
        acc1 += tl.load(partial_ptr + 2 * k + 1, mask=inside, other=0.0)
    tl.store(stats_ptr, tl.sum(acc0, axis=0))
    tl.store(stats_ptr + 1, tl.sum(acc1, axis=0))


# ----- host side: checks (csrc/cpu/sparse_rows.cpp's, same messages) ----------------------------


def _fail(msg: str):
    raise RuntimeError(msg)


def _param_device_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (t.device.type == "cpu" and C.interpreting())


def _check_index_layout(op: str, indices: torch.Tensor, dev) -> None:
    if not (
        isinstance(indices, torch.Tensor)
        and indices.dtype == torch.int64
        and indices.dim() == 1
        and (indices.device.type == "cpu" or indices.device == dev)
    ):
        _fail(
            f"{op}: indices must be a 1-D int64 tensor on the CPU or the param's device, got "
            f"{getattr(indices, 'dtype', None)} {list(getattr(indices, 'shape', []))}"
        )


def _raise_for_indices(op: str, indices: torch.Tensor, num_rows: int) -> None:
    """The raising form of the index check (a call without an error word): host reads."""
    if indices.numel():
        neg = indices < 0
        if bool(neg.any()):
            pos = int(neg.nonzero()[0])
            _fail(f"{op}: negative index {int(indices[pos])} at position {pos}")
        big = indices >= num_rows
        if bool(big.any()):
            pos = int(big.nonzero()[0])
            _fail(f"{op}: index {int(indices[pos])} at position {pos} is out of range for a table of {num_rows} rows")


def _check_table(op, param, exp_avg, exp_avg_sq, step, hyper) -> list:
    if not (isinstance(param, torch.Tensor) and _param_device_ok(param)):
        _fail(f"{op}: param must be a CUDA tensor (a CPU tensor only under TRITON_INTERPRET=1)")
    if param.dim() != 2:
        _fail(f"{op}: param must be 2-D (rows x width), got shape {list(param.shape)}")
    if param.dtype not in (torch.float32, torch.bfloat16):
        _fail(f"{op}: param has dtype {param.dtype}; supported: float32, bfloat16")
    if not param.is_contiguous():
        _fail(f"{op}: param must be contiguous (row-major)")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not (t.device == param.device and t.dtype == torch.float32 and t.shape == param.shape and t.is_contiguous()):
            _fail(
                f"{op}: {name} must be a contiguous float32 tensor on the param's device of the param's "
                f"shape {list(param.shape)}, got {t.dtype} {list(t.shape)}"
            )
    if not (
        step.numel() == 1
        and step.dtype in (torch.float32, torch.float64)
        and (step.device.type == "cpu" or step.device == param.device)
    ):
        _fail(f"{op}: step must be a one-element float32/float64 tensor on the CPU or the param's device")
    if not (
        (hyper.device.type == "cpu" or hyper.device == param.device)
        and hyper.dtype == torch.float64
        and hyper.dim() == 2
        and tuple(hyper.shape) == (1, HYPER_COLS)
        and hyper.is_contiguous()
    ):
        _fail(
            f"{op}: hyper must be a contiguous float64 tensor of shape [1, {HYPER_COLS}] on the CPU or the "
            f"param's device, got {hyper.dtype} {list(hyper.shape)} on {hyper.device}"
        )
    if hyper.device.type != "cpu":
        # A device row (a captured step's) is read by the kernels only; it was checked where it was
        # built (lvopt/optim.py). Valid placeholders stand in for the checks below.
        return [0.5, 0.5, 0.5, 0.0, 0.5, 0.0]
    row = hyper.tolist()[0]
    if not (math.isfinite(row[LR]) and row[LR] >= 0.0):
        _fail(f"{op}: lr must be finite and >= 0, got {row[LR]}")
    if not (0.0 <= row[BETA1] < 1.0):
        _fail(f"{op}: beta1 must be in [0, 1), got {row[BETA1]}")
    if not (0.0 <= row[BETA2] < 1.0):
        _fail(f"{op}: beta2 must be in [0, 1), got {row[BETA2]}")
    if not (math.isfinite(row[EPS]) and row[EPS] > 0.0):
        _fail(f"{op}: eps must be finite and > 0, got {row[EPS]}")
    if not math.isfinite(row[WEIGHT_DECAY]):
        _fail(f"{op}: weight_decay must be finite, got {row[WEIGHT_DECAY]}")
    return row


def _check_clock(op, param, last_step, hist, qpow, row, hist_base, epoch, window) -> None:
    n = param.shape[0]
    if not (
        last_step.dtype == torch.int64
        and last_step.dim() == 1
        and last_step.shape[0] == n
        and last_step.is_contiguous()
        and last_step.device == param.device
    ):
        _fail(
            f"{op}: last_step must be a contiguous int64 tensor of shape [{n}] on the param's device, got "
            f"{last_step.dtype} {list(last_step.shape)} on {last_step.device}"
        )
    if not (
        hist.dtype == torch.float64
        and hist.dim() == 2
        and hist.shape[1] == HIST_COLS
        and hist.shape[0] >= 1
        and hist.is_contiguous()
    ):
        _fail(
            f"{op}: hist must be a contiguous float64 CPU tensor of shape [steps, {HIST_COLS}], got "
            f"{hist.dtype} {list(hist.shape)}"
        )
    if not (epoch >= 1 and window >= 0 and hist_base >= 0):
        _fail(f"{op}: need epoch >= 1, window >= 0, hist_base >= 0; got {epoch}, {window}, {hist_base}")
    qcols = epoch + max(window, epoch) + 1
    if not (
        qpow.dtype == torch.float64
        and qpow.dim() == 2
        and tuple(qpow.shape) == (HIST_SERIES, qcols)
        and qpow.is_contiguous()
    ):
        _fail(
            f"{op}: qpow must be a contiguous float64 CPU tensor of shape [{HIST_SERIES}, {qcols}], got "
            f"{list(qpow.shape)}"
        )
    if not row[BETA2] > 0.0:
        _fail(f"{op}: exact mode needs beta2 > 0")


def _check_flags(op, flags, exact, param, hist, error) -> bool:
    """The ops' ``flags`` (csrc/cuda/sparse_rows.cu check_flags); returns whether the history is
    a ring."""
    if flags & ~(SPARSE_COALESCED | SPARSE_RING):
        _fail(
            f"{op}: flags must be a combination of {SPARSE_COALESCED} (coalesced ids) and {SPARSE_RING} (ring "
            f"history), got {flags}"
        )
    if not flags & SPARSE_RING:
        return False
    if not exact:
        _fail(f"{op}: flags has the ring-history bit ({SPARSE_RING}) but exact is false")
    if not (hist.device == param.device and hist.shape[0] >= 2):
        _fail(
            f"{op}: a ring history (flags {SPARSE_RING}) must be on {param.device} with at least 2 rows, got "
            f"{list(hist.shape)} on {hist.device}"
        )
    if error is None:
        _fail(f"{op}: a ring history (flags {SPARSE_RING}) needs an error word (its coverage is checked on the device)")
    return True


def _check_rows_clock(op, last_rows: torch.Tensor, rows: torch.Tensor, hist_base, hist_rows, target) -> None:
    if not (target >= hist_base and target - hist_base < hist_rows):
        _fail(f"{op}: hist covers steps {hist_base}..{hist_base + hist_rows - 1} but step {target} is needed")
    bad = (last_rows < hist_base) | (last_rows > target)
    if last_rows.numel() and bool(bad.any()):
        k = int(bad.nonzero()[0])
        _fail(
            f"{op}: row {int(rows[k])} has last_step {int(last_rows[k])}, outside [{hist_base}, {target}] "
            f"(stale clock state?)"
        )


# ----- host side: the plan and the launches (no host reads) -------------------------------------

BLOCK_N = 128  # ids per program of the plan kernels
# Rows given more than RUN times are summed in pieces of RUN rows (csrc/cuda/sparse_rows.cu kRun).
RUN = 32


def _loop_block(dtype: torch.dtype) -> int:
    """Width tile of the loop-rows launch: one or two elements per thread (the CUDA loop kernel
    takes one), chosen per dtype from the SASS (benchmarks/sass_report.py): ptxas keeps the
    fp64 window loop spill-free at 128 for fp32 and at 256 for bf16, and spills one or two
    values the other way round."""
    if C.interpreting():
        return 32
    return 256 if dtype == torch.bfloat16 else 128


def _max_pieces(n: int) -> int:
    """The most pieces n ids can make: a run of c > RUN rows makes ceil(c / RUN) <= c / 16."""
    return n // 16 + 1 if n > RUN else 0


def _grid(n: int, per: int = 1) -> tuple:
    return (max(1, (n + per - 1) // per),)


def _plan(idx: torch.Tensor, coalesced: bool = False):
    """(perm, rows, offsets, num_runs) of N ids on their device, sized by N: the input positions
    sorted stably by id (duplicates in input order), the distinct rows (the first U entries),
    each row's span [offsets[k], offsets[k+1]) of perm, and U as a one-element device tensor.
    ``coalesced`` (flags SPARSE_COALESCED: the ids are sorted and distinct): each id is its own
    run, and the plan is three fills, with no sort."""
    n = idx.numel()
    dev = idx.device
    if coalesced:
        return (
            torch.arange(n, dtype=torch.int64, device=dev),
            idx.contiguous(),
            torch.arange(n + 1, dtype=torch.int64, device=dev),
            torch.full((1,), n, dtype=torch.int64, device=dev),
        )
    sorted_idx, perm = torch.sort(idx, stable=True)
    starts = torch.empty(n, dtype=torch.int64, device=dev)
    rows = torch.empty(n, dtype=torch.int64, device=dev)
    offsets = torch.empty(n + 1, dtype=torch.int64, device=dev)
    num_runs = torch.zeros(1, dtype=torch.int64, device=dev)
    if n:
        launch(_runs_kernel, _grid(n, BLOCK_N), sorted_idx, starts, n, BLOCK=BLOCK_N)
        run = torch.cumsum(starts, 0)
        launch(_offsets_kernel, _grid(n, BLOCK_N), sorted_idx, starts, run, rows, offsets, num_runs, n, BLOCK=BLOCK_N)
    return perm.contiguous(), rows, offsets, num_runs


NO_RING = 1 << 62  # the `ring` of a history that is not one: (j - base) % NO_RING = j - base


def _setup(
    idx,
    num_rows,
    step,
    row,
    hyper,
    err,
    step_op: bool,
    exact: bool,
    hist_base: int,
    hist_rows: int,
    hist=None,
    qpow=None,
    epoch: int = 1,
    ring: bool = False,
):
    """(info [2] int64, coef [9] fp32, clk [3] fp64) on the device: see _setup_kernel. The hyper
    row is read by the kernel where it lives when it is on the param's device (``hyper``; its
    host values ``row`` then serve the checks only), else passed by value."""
    dev = idx.device
    info = torch.empty(2, dtype=torch.int64, device=dev)
    coef = torch.zeros(9, dtype=torch.float32, device=dev)
    clk = torch.zeros(3, dtype=torch.float64, device=dev)
    n = idx.numel()
    if n:
        lo, hi = torch.aminmax(idx)
    else:
        lo = hi = info
    hyper_dev = hyper.device == dev
    launch(
        _setup_kernel,
        (1,),
        step,
        lo,
        hi,
        err,
        info,
        coef,
        clk,
        hyper if hyper_dev else clk,
        hist if ring else clk,
        qpow if ring else clk,
        n,
        num_rows,
        hist_base,
        hist_rows,
        hist_rows if ring else NO_RING,
        epoch,
        qpow.shape[1] if ring else 0,
        _bits(row[LR]),
        _bits(row[BETA1]),
        _bits(row[BETA2]),
        _bits(row[WEIGHT_DECAY]),
        _bits(row[EPS]),
        -1.0 if row[MAXIMIZE] else 1.0,
        STEP_OP=step_op,
        EXACT=exact,
        HYPER_DEV=hyper_dev,
        RING=ring,
    )
    return info, coef, clk


def _device_step(step: torch.Tensor, dev) -> torch.Tensor:
    """The step counter as the kernels read it: on the device (a host counter, in a direct call
    of the op, is copied: then it is advanced on the host)."""
    return step if step.device == dev else step.to(dev)


def _rows_launch(
    param,
    vals,
    exp_avg,
    exp_avg_sq,
    plan,
    err,
    info,
    coef,
    clock,
    partial,
    has_grad,
    exact,
    track,
    hist_base,
    epoch,
    window,
    coalesced=False,
):
    """The exact-mode scalars kernel, then the row kernel, over N programs each. ``clock``:
    (last_step, hist, qpow, clk, ring rows or NO_RING)."""
    perm, rows, offsets, num_runs = plan
    n = rows.numel()
    dev = param.device
    d = param.shape[1]
    last_step, hist, qpow, clk, ring = clock if exact else (None, None, None, None, NO_RING)
    if exact:
        row_last = torch.empty(n, dtype=torch.int64, device=dev)
        cr = torch.empty(n, CR_COLS, dtype=torch.float32, device=dev)
        qcols = qpow.shape[1]
        launch(
            _scalars_kernel,
            _grid(n),
            rows,
            num_runs,
            last_step,
            info,
            err,
            hist,
            qpow,
            row_last,
            cr,
            clk,
            hist_base,
            epoch,
            window,
            qcols,
            ring,
        )
    else:
        row_last = last_step = cr = hist = qpow = info
        qcols = 0
    aligned = _aligned(d, param.dtype, param, vals, exp_avg, exp_avg_sq)
    part, part_start = info, info
    pieces = _max_pieces(n) if has_grad and not coalesced else 0
    if pieces:
        # Rows given more than RUN times (the head of a Zipf batch) are summed in pieces of RUN
        # rows by programs of their own (as csrc/cuda/sparse_rows.cu does); the row's program
        # then adds the pieces in order.
        count = torch.zeros(1, dtype=torch.int64, device=dev)
        part_start = torch.empty(n, dtype=torch.int64, device=dev)
        owner = torch.empty(pieces, dtype=torch.int64, device=dev)
        part = torch.empty(pieces, d, dtype=torch.float32, device=dev)
        launch(_piece_table_kernel, _grid(n), offsets, num_runs, part_start, owner, count, RUN=RUN)
        launch(
            _partial_sums_kernel,
            _grid(pieces),
            vals,
            perm,
            offsets,
            owner,
            part_start,
            count,
            part,
            d,
            ALIGNED=aligned,
            RUN=RUN,
            BLOCK_D=_width_block(d),
            **launch_options(),
        )
    defer = exact and WINDOW_LOOP
    loop = torch.zeros(n + 1, dtype=torch.int64, device=dev) if defer else info
    args = (
        param,
        exp_avg,
        exp_avg_sq,
        vals,
        rows,
        perm,
        offsets,
        num_runs,
        err,
        info,
        coef,
        row_last,
        last_step,
        cr,
        hist,
        qpow,
        partial,
        part,
        part_start,
        loop,
        d,
        hist_base,
        epoch,
        window,
        qcols,
        ring,
    )
    flags = dict(HAS_GRAD=has_grad, EXACT=exact, TRACK=track, SPLIT=bool(pieces), RUN=RUN, RING=ring != NO_RING)
    launch(
        sparse_rows_kernel,
        _grid(n),
        *args,
        **flags,
        ALIGNED=aligned,
        DEFER=defer,
        LOOP_LIST=False,
        BLOCK_D=_width_block(d, exact),
        **launch_options(),
    )
    if defer:
        # The rows the launch above listed, whole, with the exact windowed loop for the elements
        # between the series (rare: sqrt(v) within a few decades of eps), one or two elements per thread.
        launch(
            sparse_rows_kernel,
            _grid(n),
            *args,
            **flags,
            ALIGNED=False,
            DEFER=False,
            LOOP_LIST=True,
            BLOCK_D=_loop_block(param.dtype),
            **launch_options(),
        )


def _error_word(error, dev):
    return error if error is not None else torch.zeros(3, dtype=torch.int64, device=dev)


def _check_error(op, error, param):
    if error is not None and not (
        error.dtype == torch.int64 and error.numel() == 3 and error.is_contiguous() and error.device == param.device
    ):
        _fail(
            f"{op}: error must be a contiguous three-element int64 tensor on {param.device}, got "
            f"{error.dtype} {list(error.shape)} on {error.device}"
        )


def _raise_for_clock(op, last_step, indices, hist_base, hist_rows, target):
    """The raising form of the clock check (a call without an error word): host reads."""
    rows = torch.unique(indices.to(last_step.device))
    _check_rows_clock(op, last_step[rows], rows, hist_base, hist_rows, target)


# ----- the ops ---------------------------------------------------------------------------------


@torch.library.custom_op("lvopt_triton::coalesce_rows", mutates_args=())
def coalesce_rows(indices: torch.Tensor, values: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    op = "lvopt::coalesce_rows"
    if num_rows < 0:
        _fail(f"{op}: num_rows must be >= 0, got {num_rows}")
    if not (
        _param_device_ok(values)
        and values.dim() == 2
        and values.shape[0] == indices.numel()
        and values.dtype in (torch.float32, torch.bfloat16)
    ):
        _fail(
            f"{op}: values must be a float32/bfloat16 tensor of shape [{indices.numel()}, width] on a "
            f"Triton device, got {values.dtype} {list(values.shape)}"
        )
    dev = values.device
    _check_index_layout(op, indices, dev)
    _raise_for_indices(op, indices, num_rows)
    idx = indices.to(dev)
    perm, rows, offsets, num_runs = _plan(idx)
    # host read: the number of distinct rows sizes the outputs (a data-dependent shape, as
    # torch's coalesce() has); the optimizer's step does not call this op on a GPU.
    u = int(num_runs[0]) if idx.numel() else 0
    vals = values.contiguous()
    d = vals.shape[1]
    out = torch.empty((u, d), dtype=vals.dtype, device=dev)
    if u and d:
        launch(
            coalesce_kernel,
            (u,),
            vals,
            perm,
            offsets,
            out,
            d,
            ALIGNED=_aligned(d, vals.dtype, vals, out),
            BLOCK_D=_width_block(d),
            **launch_options(),
        )
    return rows[:u].clone(), out


@coalesce_rows.register_fake
def _(indices, values, num_rows):
    u = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty((u,)), values.new_empty((u, values.shape[1]))


@torch.library.custom_op(
    "lvopt_triton::sparse_adamw_",
    mutates_args=("param", "exp_avg", "exp_avg_sq", "step", "last_step", "stats", "error"),
)
def sparse_adamw_(
    param: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    last_step: torch.Tensor,
    hist: torch.Tensor,
    qpow: torch.Tensor,
    hyper: torch.Tensor,
    hist_base: int,
    epoch: int,
    window: int,
    exact: bool,
    stats: Optional[torch.Tensor] = None,
    error: Optional[torch.Tensor] = None,
    flags: int = 0,
) -> None:
    sparse_adamw_impl(
        param,
        indices,
        values,
        exp_avg,
        exp_avg_sq,
        step,
        last_step,
        hist,
        qpow,
        hyper,
        hist_base,
        epoch,
        window,
        exact,
        stats,
        error,
        flags,
    )


def sparse_adamw_impl(
    param,
    indices,
    values,
    exp_avg,
    exp_avg_sq,
    step,
    last_step,
    hist,
    qpow,
    hyper,
    hist_base,
    epoch,
    window,
    exact,
    stats=None,
    error=None,
    flags=0,
) -> None:
    """The body of lvopt_triton::sparse_adamw_ (callable on fake tensors, for the tests that
    show the host path reads nothing from the device)."""
    op = "lvopt::sparse_adamw_"
    row = _check_table(op, param, exp_avg, exp_avg_sq, step, hyper)
    if not (
        values.device == param.device
        and values.dim() == 2
        and values.shape[0] == indices.numel()
        and values.shape[1] == param.shape[1]
    ):
        _fail(f"{op}: values must have shape [{indices.numel()}, {param.shape[1]}], got {list(values.shape)}")
    if values.dtype != param.dtype:
        _fail(f"{op}: values have dtype {values.dtype} but param has {param.dtype}")
    dev = param.device
    _check_index_layout(op, indices, dev)
    _check_error(op, error, param)
    if stats is not None and not (
        stats.dtype == torch.float64 and stats.numel() == 2 and stats.is_contiguous() and stats.device == dev
    ):
        _fail(
            f"{op}: stats must be a contiguous two-element float64 tensor on the param's device, got "
            f"{stats.dtype} {list(stats.shape)} on {stats.device}"
        )
    if exact:
        _check_clock(op, param, last_step, hist, qpow, row, hist_base, epoch, window)
    ring = _check_flags(op, flags, exact, param, hist, error)
    if error is None:
        _raise_for_indices(op, indices, param.shape[0])
        if exact:
            # host read: the step count, for a call that raises (no error word given).
            _raise_for_clock(op, last_step, indices, hist_base, hist.shape[0], int(float(step)))
    # Every check that raises has passed: from here on, the device decides.
    idx = indices.to(dev)
    err = _error_word(error, dev)
    dstep = _device_step(step, dev)
    hist_d, qpow_d = (hist.to(dev), qpow.to(dev)) if exact else (None, None)
    info, coef, clk = _setup(
        idx,
        param.shape[0],
        dstep,
        row,
        hyper,
        err,
        True,
        exact,
        hist_base,
        hist.shape[0] if exact else 0,
        hist_d,
        qpow_d,
        epoch,
        ring,
    )
    n = idx.numel()
    track = stats is not None
    d = param.shape[1]
    coalesced = bool(flags & SPARSE_COALESCED)
    if n and d:
        plan = _plan(idx, coalesced)
        partial = torch.empty(n, 2, dtype=torch.float64, device=dev) if track else info
        clock = (last_step, hist_d, qpow_d, clk, hist.shape[0] if ring else NO_RING) if exact else None
        _rows_launch(
            param,
            values.contiguous(),
            exp_avg,
            exp_avg_sq,
            plan,
            err,
            info,
            coef,
            clock,
            partial,
            True,
            bool(exact),
            track,
            hist_base,
            epoch,
            window,
            coalesced,
        )
        if track:
            launch(_stats_kernel, (1,), partial, plan[3], err, stats, n, BLOCK=64)
    elif track:
        stats.zero_()
    launch(_finish_kernel, (1,), dstep, err)
    if dstep is not step:
        step.copy_(dstep)


@sparse_adamw_.register_fake
def _(
    param,
    indices,
    values,
    exp_avg,
    exp_avg_sq,
    step,
    last_step,
    hist,
    qpow,
    hyper,
    hist_base,
    epoch,
    window,
    exact,
    stats=None,
    error=None,
    flags=0,
):
    return None


@torch.library.custom_op(
    "lvopt_triton::sparse_catchup_", mutates_args=("param", "exp_avg", "exp_avg_sq", "last_step", "error")
)
def sparse_catchup_(
    param: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    last_step: torch.Tensor,
    hist: torch.Tensor,
    qpow: torch.Tensor,
    hyper: torch.Tensor,
    hist_base: int,
    epoch: int,
    window: int,
    error: Optional[torch.Tensor] = None,
    flags: int = 0,
) -> None:
    sparse_catchup_impl(
        param, indices, exp_avg, exp_avg_sq, step, last_step, hist, qpow, hyper, hist_base, epoch, window, error, flags
    )


def sparse_catchup_impl(
    param,
    indices,
    exp_avg,
    exp_avg_sq,
    step,
    last_step,
    hist,
    qpow,
    hyper,
    hist_base,
    epoch,
    window,
    error=None,
    flags=0,
) -> None:
    """The body of lvopt_triton::sparse_catchup_ (see sparse_adamw_impl)."""
    op = "lvopt::sparse_catchup_"
    row = _check_table(op, param, exp_avg, exp_avg_sq, step, hyper)
    dev = param.device
    _check_index_layout(op, indices, dev)
    _check_error(op, error, param)
    _check_clock(op, param, last_step, hist, qpow, row, hist_base, epoch, window)
    ring = _check_flags(op, flags, True, param, hist, error)
    if error is None:
        _raise_for_indices(op, indices, param.shape[0])
        # host read: the step count, for a call that raises (no error word given).
        _raise_for_clock(op, last_step, indices, hist_base, hist.shape[0], int(float(step)))
    idx = indices.to(dev)
    err = _error_word(error, dev)
    hist_d, qpow_d = hist.to(dev), qpow.to(dev)
    info, coef, clk = _setup(
        idx,
        param.shape[0],
        _device_step(step, dev),
        row,
        hyper,
        err,
        False,
        True,
        hist_base,
        hist.shape[0],
        hist_d,
        qpow_d,
        epoch,
        ring,
    )
    if not (idx.numel() and param.shape[1]):
        return
    coalesced = bool(flags & SPARSE_COALESCED)
    plan = _plan(idx, coalesced)
    clock = (last_step, hist_d, qpow_d, clk, hist.shape[0] if ring else NO_RING)
    _rows_launch(
        param,
        param,
        exp_avg,
        exp_avg_sq,
        plan,
        err,
        info,
        coef,
        clock,
        info,
        False,
        True,
        False,
        hist_base,
        epoch,
        window,
        coalesced,
    )


@sparse_catchup_.register_fake
def _(
    param,
    indices,
    exp_avg,
    exp_avg_sq,
    step,
    last_step,
    hist,
    qpow,
    hyper,
    hist_base,
    epoch,
    window,
    error=None,
    flags=0,
):
    return None


def catchup_scalars(last_step, rows, hist, qpow, hyper, hist_base, epoch, window, target):
    """The catch-up scalars [len(rows), CR_COLS] (fp32: P, b1k, b2k, M0..M3, N1..N4, fwd_v,
    rev_v) of ``rows`` brought from their last steps to ``target``, as the exact-mode kernels
    compute them (for tests and inspection; rows already current hold garbage)."""
    dev = last_step.device
    row = hyper.tolist()[0]
    rows = rows.to(dev)
    n = rows.numel()
    err = torch.zeros(3, dtype=torch.int64, device=dev)
    info = torch.tensor([target, target], dtype=torch.int64, device=dev)
    num_runs = torch.tensor([n], dtype=torch.int64, device=dev)
    row_last = torch.empty(n, dtype=torch.int64, device=dev)
    cr = torch.zeros(n, CR_COLS, dtype=torch.float32, device=dev)
    clk = torch.tensor([row[BETA1], row[BETA2], _f32(row[EPS])], dtype=torch.float64, device=dev)
    launch(
        _scalars_kernel,
        _grid(n),
        rows,
        num_runs,
        last_step,
        info,
        err,
        hist.to(dev),
        qpow.to(dev),
        row_last,
        cr,
        clk,
        hist_base,
        epoch,
        window,
        qpow.shape[1],
        NO_RING,
    )
    return cr
