"""Triton sparse embedding rows (docs/design.md section 2.3): lvopt_triton::coalesce_rows,
lvopt_triton::sparse_adamw_ and lvopt_triton::sparse_catchup_, the signatures and in-place
semantics of the lvopt ops of csrc/cpu/sparse_rows.cpp (csrc/register.cpp).

Host side of each op: the CPU op's argument checks and messages, all before anything is
written; a stable sort of the indices (duplicates keep their input order) and
unique_consecutive give the distinct rows, sorted, with each row's span of input positions.
Kernels: one program per distinct row, looping over width tiles; a row's gradient is the sum
of its value rows in input order in fp32 (fused into the update kernel, as the CPU op does:
the summed gradient is not rounded to bf16 before the update).

Per element the math is math.h's, in the same order of fp32 operations, with IEEE square root
and division (tl.sqrt_rn / tl.div_rn) and no FMA contraction (enable_fp_fusion=False):
adamw_element with make_adam_coef's coefficients (_common.advance_steps, as the fused op), and
in exact mode catchup_element_fast, and catchup_element_loop's fp64 sum over the window for
the elements whose v lies between rev_v and fwd_v.

Exact mode's per-row catch-up scalars (CatchupRow) are computed on the host in fp64 with torch
ops, for all behind rows at once, exactly as Clock::row (csrc/include/lvopt/sparse_clock.h: epoch loop, series
sums, window bounds); torch's exp/pow may differ from libm's in the last fp64 bit, which
changes an fp32-rounded scalar only rarely (tests allow 4 fp32 ulps against the CPU op in
exact mode; on the tests' inputs the bits were identical). Rows
with loop elements are found by a host-side pass over the behind rows' v (one extra read of v
of those rows, and a synchronisation); only for those rows are the window's w_j, a_j built
(fp64, on the host) and uploaded, and the kernel runs the masked fp64 loop over the window on
the tiles that hold such elements.

On a GPU the host side synchronises (index range checks, the step value, last_step of the
rows, the loop-row pass) and builds each loop row's window table with a few torch ops per row
(rare rows, ~1e-5 of elements at unit-scale gradients); the kernels themselves are
synchronisation-free. Unlike the CUDA kernel, a row given many times (a frequent token) is
summed by its own program alone; cutting long runs into pieces, as csrc/cuda/sparse_rows.cu
does, is left for when it can be timed on a GPU.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..reference import BETA1, BETA2, EPS, HYPER_COLS, LR, WEIGHT_DECAY
from . import _common as C
from .fused_adamw import _coef, _store_param, _store_state, _track_sums, adamw_math, launch_options

# History table layout (csrc/include/lvopt/math.h HistCol, lvopt/sparse.py).
H_LOGPI, H_U, H_SQRTBC2, H_SERIES = 2, 3, 4, 5
HIST_SERIES, HIST_COLS = 8, 13
SERIES_LIMIT = 1e2  # sparse_rows.cpp kSeriesLimit
# Columns of the per-row catch-up table (CatchupRow): P, b1k, b2k, M0..M3, N1..N4, fwd_v, rev_v.
CR_COLS = 13
# Per-row int64 info: behind (0/1), offset of its w/a window in the fp64 table, window length.
INFO_COLS = 3


def _width_block(d: int, exact: bool = False) -> int:
    """Width tile: the largest power of two <= d, 64 .. 1024 (512 for the exact-mode kernels,
    whose catch-up and fp64 window loop would otherwise need more than 128 registers and spill:
    benchmarks/sass_report.py), so that most of a row is full (unmasked) tiles; under the
    interpreter 32, so that the small test widths have full tiles and a masked tail (the same
    code paths)."""
    if C.interpreting():
        return 32
    return max(64, min(512 if exact else 1024, 1 << (max(d, 1).bit_length() - 1)))


def _aligned(d: int, dtype: torch.dtype, *ts) -> bool:
    """Every row of every tensor starts 16-byte aligned (rows of 16-byte multiples)."""
    return (d * (2 if dtype == torch.bfloat16 else 4)) % 16 == 0 and d % 4 == 0 and all(
        t.data_ptr() % 16 == 0 for t in ts)


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
def _catchup_tile(pi, mi, vi, mask, cr_ptr, ceps, loop_off, loop_len, wa_ptr, BLOCK_D: tl.constexpr):
    """math.h catchup_element_fast, and catchup_element_loop for the tile's elements with v
    between rev_v and fwd_v (when the row has a window table: loop_len > 0)."""
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
    if loop_len > 0:
        mid = (~(vi >= fwd_v)) & (~(vi <= rev_v)) & mask  # NaN v counts as mid, as in the CPU kernel's passes
        if tl.sum(mid.to(tl.int32), axis=0) > 0:
            # fp64 sqrt and / are IEEE (sqrt.rn.f64, div.rn.f64). catchup_element_loop's r = 0
            # branch is never taken here: v = 0 satisfies v <= rev_v (>= 0), so a mid element
            # has r > 0 (or is NaN, NaN either way); other lanes' values are discarded below.
            rd = tl.sqrt(vi.to(tl.float64))
            e64 = ceps.to(tl.float64) / rd
            acc = tl.zeros((BLOCK_D,), tl.float64)
            for j in range(0, loop_len):
                wj = tl.load(wa_ptr + loop_off + j)
                aj = tl.load(wa_ptr + loop_off + loop_len + j)
                acc = acc + wj / (1.0 + e64 * aj)
            acc = acc * (mi.to(tl.float64) / rd)
            p_new = tl.where(mid, pi * P - acc.to(tl.float32), p_new)
    return p_new, mi * b1k, vi * b2k


@triton.jit
def _row_tile(p, m, v, vals_ptr, perm_ptr, g_lo, g_hi, d, offs, mask, coef_ptr, cr_ptr, ceps, behind,
              loop_off, loop_len, wa_ptr, HAS_GRAD: tl.constexpr, EXACT: tl.constexpr, ALIGNED: tl.constexpr,
              MASKED: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile of a row: [exact: catch-up if behind], [AdamW step], stores; returns the tile's
    fp64 (sum W^2, sum dW^2) (unused values cost nothing)."""
    pi = _load(p + offs, mask, MASKED).to(tl.float32)
    mi = _load(m + offs, mask, MASKED)
    vi = _load(v + offs, mask, MASKED)
    w0 = pi
    if EXACT:
        if behind != 0:
            pi, mi, vi = _catchup_tile(pi, mi, vi, mask, cr_ptr, ceps, loop_off, loop_len, wa_ptr, BLOCK_D)
    if HAS_GRAD:
        b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign = _coef(coef_ptr, 0)
        gi = _grad_tile(vals_ptr, perm_ptr, g_lo, g_hi, d, offs, mask, ALIGNED, MASKED)
        pi, mi, vi = adamw_math(pi, gi, mi, vi, b1, omb1, b2, omb2, decay, step_size, inv_bc2, eps, sign)
    _store_state(m, v, offs, mask, mi, vi, MASKED)
    _store_param(p + offs, pi, mask, MASKED)
    return _track_sums(w0, pi, p, mask, MASKED)


@triton.jit
def sparse_rows_kernel(p_ptr, m_ptr, v_ptr, vals_ptr, rows_ptr, perm_ptr, offsets_ptr, coef_ptr,
                       cr_ptr, info_ptr, wa_ptr, partial_ptr, d, HAS_GRAD: tl.constexpr,
                       EXACT: tl.constexpr, TRACK: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """One distinct row per program: [exact: catch-up if behind] then [HAS_GRAD: AdamW step
    with the row's summed gradient]; TRACK: the row's fp64 (sum W^2, sum dW^2), tiles added in
    order. Full tiles unmasked (16-byte vectors when ALIGNED), then a masked tail."""
    k = tl.program_id(0)
    r = tl.load(rows_ptr + k)
    base = r * d
    p = p_ptr + base
    m = m_ptr + base
    v = v_ptr + base
    if ALIGNED:
        p = tl.multiple_of(p, 16)
        m = tl.multiple_of(m, 16)
        v = tl.multiple_of(v, 16)
    g_lo = 0
    g_hi = 0
    if HAS_GRAD:
        g_lo = tl.load(offsets_ptr + k)
        g_hi = tl.load(offsets_ptr + k + 1)
    ceps = tl.load(coef_ptr + 7)
    behind = 0
    loop_off = 0
    loop_len = 0
    if EXACT:
        behind = tl.load(info_ptr + k * 3 + 0)
        loop_off = tl.load(info_ptr + k * 3 + 1)
        loop_len = tl.load(info_ptr + k * 3 + 2)
    cr = cr_ptr + k * 13
    ww = tl.sum(tl.zeros((BLOCK_D,), tl.float64), axis=0)
    dd = ww
    full = d // BLOCK_D
    for t in range(0, full):
        offs = t * BLOCK_D + tl.arange(0, BLOCK_D)
        a, b = _row_tile(p, m, v, vals_ptr, perm_ptr, g_lo, g_hi, d, offs, offs < d, coef_ptr, cr, ceps, behind,
                         loop_off, loop_len, wa_ptr, HAS_GRAD, EXACT, ALIGNED, False, BLOCK_D)
        if TRACK:
            ww += a
            dd += b
    offs = full * BLOCK_D + tl.arange(0, BLOCK_D)
    a, b = _row_tile(p, m, v, vals_ptr, perm_ptr, g_lo, g_hi, d, offs, offs < d, coef_ptr, cr, ceps, behind,
                     loop_off, loop_len, wa_ptr, HAS_GRAD, EXACT, ALIGNED, True, BLOCK_D)
    if TRACK:
        tl.store(partial_ptr + 2 * k + 0, ww + a)
        tl.store(partial_ptr + 2 * k + 1, dd + b)


# ----- host side: checks (csrc/cpu/sparse_rows.cpp's, same messages) ----------------------------

def _fail(msg: str):
    raise RuntimeError(msg)


def _param_device_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (t.device.type == "cpu" and C.interpreting())


def _check_indices(op: str, indices: torch.Tensor, num_rows: int, dev) -> None:
    if not (isinstance(indices, torch.Tensor) and indices.dtype == torch.int64 and indices.dim() == 1
            and (indices.device.type == "cpu" or indices.device == dev)):
        _fail(f"{op}: indices must be a 1-D int64 tensor on the CPU or the param's device, got "
              f"{getattr(indices, 'dtype', None)} {list(getattr(indices, 'shape', []))}")
    if indices.numel():
        neg = indices < 0
        if bool(neg.any()):
            pos = int(neg.nonzero()[0])
            _fail(f"{op}: negative index {int(indices[pos])} at position {pos}")
        big = indices >= num_rows
        if bool(big.any()):
            pos = int(big.nonzero()[0])
            _fail(f"{op}: index {int(indices[pos])} at position {pos} is out of range for a table of "
                  f"{num_rows} rows")


def _plan(indices: torch.Tensor, dev):
    """(rows, perm, offsets) on ``dev``: the sorted distinct rows, the input positions sorted
    stably by row (duplicates in input order), and each row's span [offsets[k], offsets[k+1])."""
    idx = indices.to(dev)
    sorted_idx, perm = torch.sort(idx, stable=True)
    rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offsets[1:])
    return rows, perm.contiguous(), offsets


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
        if not (t.device == param.device and t.dtype == torch.float32 and t.shape == param.shape
                and t.is_contiguous()):
            _fail(f"{op}: {name} must be a contiguous float32 tensor on the param's device of the param's "
                  f"shape {list(param.shape)}, got {t.dtype} {list(t.shape)}")
    if not (step.numel() == 1 and step.dtype in (torch.float32, torch.float64)
            and (step.device.type == "cpu" or step.device == param.device)):
        _fail(f"{op}: step must be a one-element float32/float64 CPU tensor")
    if not (hyper.device.type == "cpu" and hyper.dtype == torch.float64 and hyper.dim() == 2
            and tuple(hyper.shape) == (1, HYPER_COLS) and hyper.is_contiguous()):
        _fail(f"{op}: hyper must be a contiguous CPU float64 tensor of shape [1, {HYPER_COLS}], got "
              f"{hyper.dtype} {list(hyper.shape)}")
    row = hyper.reshape(-1).tolist()
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
    if not (last_step.dtype == torch.int64 and last_step.dim() == 1 and last_step.shape[0] == n
            and last_step.is_contiguous() and (last_step.device.type == "cpu" or last_step.device == param.device)):
        _fail(f"{op}: last_step must be a contiguous int64 CPU tensor of shape [{n}], got {last_step.dtype} "
              f"{list(last_step.shape)}")
    if not (hist.dtype == torch.float64 and hist.dim() == 2 and hist.shape[1] == HIST_COLS and hist.shape[0] >= 1
            and hist.is_contiguous()):
        _fail(f"{op}: hist must be a contiguous float64 CPU tensor of shape [steps, {HIST_COLS}], got "
              f"{hist.dtype} {list(hist.shape)}")
    if not (epoch >= 1 and window >= 0 and hist_base >= 0):
        _fail(f"{op}: need epoch >= 1, window >= 0, hist_base >= 0; got {epoch}, {window}, {hist_base}")
    qcols = epoch + max(window, epoch) + 1
    if not (qpow.dtype == torch.float64 and qpow.dim() == 2 and tuple(qpow.shape) == (HIST_SERIES, qcols)
            and qpow.is_contiguous()):
        _fail(f"{op}: qpow must be a contiguous float64 CPU tensor of shape [{HIST_SERIES}, {qcols}], got "
              f"{list(qpow.shape)}")
    if not row[BETA2] > 0.0:
        _fail(f"{op}: exact mode needs beta2 > 0")


def _check_rows_clock(op, last_rows: torch.Tensor, rows: torch.Tensor, hist_base, hist_rows, target) -> None:
    if not (target >= hist_base and target - hist_base < hist_rows):
        _fail(f"{op}: hist covers steps {hist_base}..{hist_base + hist_rows - 1} but step {target} is needed")
    bad = (last_rows < hist_base) | (last_rows > target)
    if last_rows.numel() and bool(bad.any()):
        k = int(bad.nonzero()[0])
        _fail(f"{op}: row {int(rows[k])} has last_step {int(last_rows[k])}, outside [{hist_base}, {target}] "
              f"(stale clock state?)")


# ----- host side: exact-mode catch-up scalars (sparse_rows.cpp Clock::row) -----------------------

def _catchup_scalars(hist, qpow, base, epoch, window, b1, b2, eps32, s, c):
    """fp64 CatchupRow scalars [R, CR_COLS] for rows last current at s (int64 [R], CPU) brought
    to c (int64 [R]), as Clock::row computes them."""
    H = hist
    logpi = H[:, H_LOGPI]
    lpc = logpi[c - base]
    k_all = (c - s).to(torch.float64)
    P = torch.exp(lpc - logpi[s - base])
    b1k = torch.pow(torch.tensor(b1, dtype=torch.float64), k_all)
    b2k = torch.pow(torch.tensor(b2, dtype=torch.float64), k_all)
    yend = torch.minimum(c, s + window)
    has = yend > s
    S = torch.zeros(s.numel(), HIST_SERIES, dtype=torch.float64)
    b = base + epoch * torch.div(s - base, epoch, rounding_mode="floor")
    x = s.clone()
    qT = qpow.t()
    while True:
        act = x < yend
        if not bool(act.any()):
            break
        ye = torch.minimum(b + epoch, yend)
        # Rows already done (act false) keep their sums; their indices are clamped in range.
        bs = torch.where(act, b, s)
        scale = torch.exp(lpc - logpi[bs - base])
        hy = H[torch.where(act, ye, s) - base, H_SERIES:]
        hx = torch.where((x > b).unsqueeze(1), H[torch.where(act, x, s) - base, H_SERIES:], torch.zeros(()))
        q = qT[(bs - s) + epoch]
        S = torch.where(act.unsqueeze(1), S + scale.unsqueeze(1) * q * (hy - hx), S)
        x = torch.where(act, ye, x)
        b = torch.where(act, b + epoch, b)
    s1 = torch.minimum(s + 1, c)
    a_min = H[s1 - base, H_SQRTBC2] / math.sqrt(b2)
    a_max = H[yend - base, H_SQRTBC2] * torch.pow(torch.tensor(b2, dtype=torch.float64),
                                                   -0.5 * (yend - s).to(torch.float64))
    fwd = SERIES_LIMIT * eps32 * a_max
    rev = eps32 * a_min / SERIES_LIMIT
    inf = torch.full_like(fwd, math.inf)
    fwd_v = torch.where(has, fwd * fwd, inf)
    rev_v = torch.where(has, rev * rev, inf)
    return torch.cat([P[:, None], b1k[:, None], b2k[:, None], S, fwd_v[:, None], rev_v[:, None]], 1)


def _window_weights(hist, qpow, base, epoch, window, s: int, c: int):
    """w_j, a_j (fp64) of the window s+1 .. min(c, s+window) (Clock::row's loop tables)."""
    yend = min(c, s + window)
    j = torch.arange(s + 1, yend + 1)
    h = hist[j - base]
    k = (j - s) + epoch
    lpc = hist[c - base, H_LOGPI]
    w = torch.exp(lpc - h[:, H_LOGPI]) * h[:, H_U] * qpow[0, k]
    a = h[:, H_SQRTBC2] * qpow[1, k] / qpow[0, k]
    return w, a


def _exact_tables(op, param, exp_avg_sq, rows, last_step, hist, qpow, row, base, epoch, window, target, dev):
    """(cr [U, CR_COLS] fp32, info [U, INFO_COLS] int64, wa fp64) on ``dev`` for the plan's rows
    brought current to ``target``: CatchupRow scalars and behind flags per row, and the window
    tables (w_j then a_j per row, at info's offset) of the rows that have loop elements. ``op``
    names the op (unused: every check has been made by the caller)."""
    rows_h = rows.to(last_step.device)
    last = last_step[rows_h].cpu()
    hist_c, qpow_c = hist.cpu(), qpow.cpu()
    u = rows.numel()
    behind = last < target
    cr = torch.zeros(u, CR_COLS, dtype=torch.float32)
    info = torch.zeros(u, INFO_COLS, dtype=torch.int64)
    wa = torch.zeros(1, dtype=torch.float64)
    bidx = behind.nonzero().reshape(-1)
    if bidx.numel():
        eps32 = float(torch.tensor(row[EPS], dtype=torch.float32))
        s = last[bidx]
        c = torch.full_like(s, target)
        sc = _catchup_scalars(hist_c, qpow_c, base, epoch, window, row[BETA1], row[BETA2], eps32, s, c)
        crb = sc.to(torch.float32)
        cr[bidx] = crb
        info[bidx, 0] = 1
        # Rows with elements between rev_v and fwd_v need the window loop (catchup_element_loop).
        vb = exp_avg_sq.index_select(0, rows[bidx.to(rows.device)])
        fv, rv = crb[:, 11].to(dev).unsqueeze(1), crb[:, 12].to(dev).unsqueeze(1)
        mid = ~(vb >= fv) & ~(vb <= rv)
        loop_rows = mid.any(1).nonzero().reshape(-1).cpu().tolist()
        parts, off = [], 0
        for kb in loop_rows:
            w, a = _window_weights(hist_c, qpow_c, base, epoch, window, int(s[kb]), target)
            n = w.numel()
            info[bidx[kb], 1] = off
            info[bidx[kb], 2] = n
            parts += [w, a]
            off += 2 * n
        if parts:
            wa = torch.cat(parts)
    return cr.to(dev), info.to(dev), wa.to(dev)


# ----- the ops ---------------------------------------------------------------------------------

@torch.library.custom_op("lvopt_triton::coalesce_rows", mutates_args=())
def coalesce_rows(indices: torch.Tensor, values: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    op = "lvopt::coalesce_rows"
    if num_rows < 0:
        _fail(f"{op}: num_rows must be >= 0, got {num_rows}")
    if not (_param_device_ok(values) and values.dim() == 2 and values.shape[0] == indices.numel()
            and values.dtype in (torch.float32, torch.bfloat16)):
        _fail(f"{op}: values must be a float32/bfloat16 tensor of shape [{indices.numel()}, width] on a "
              f"Triton device, got {values.dtype} {list(values.shape)}")
    dev = values.device
    _check_indices(op, indices, num_rows, dev)
    rows, perm, offsets = _plan(indices, dev)
    vals = values.contiguous()
    d = vals.shape[1]
    out = torch.empty((rows.numel(), d), dtype=vals.dtype, device=dev)
    if rows.numel() and d:
        coalesce_kernel[(rows.numel(),)](vals, perm, offsets, out, d, ALIGNED=_aligned(d, vals.dtype, vals, out),
                                         BLOCK_D=_width_block(d), **launch_options())
    return rows, out


@coalesce_rows.register_fake
def _(indices, values, num_rows):
    u = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty((u,)), values.new_empty((u, values.shape[1]))


def _launch(param, vals, exp_avg, exp_avg_sq, rows, perm, offsets, coef, cr, info, wa, partial,
            has_grad, exact, track):
    d = param.shape[1]
    sparse_rows_kernel[(rows.numel(),)](param, exp_avg, exp_avg_sq, vals, rows, perm, offsets, coef, cr, info,
                                        wa, partial, d, HAS_GRAD=has_grad, EXACT=exact, TRACK=track,
                                        ALIGNED=_aligned(d, param.dtype, param, vals, exp_avg, exp_avg_sq),
                                        BLOCK_D=_width_block(d, exact), **launch_options())


@torch.library.custom_op("lvopt_triton::sparse_adamw_",
                         mutates_args=("param", "exp_avg", "exp_avg_sq", "step", "last_step", "stats"))
def sparse_adamw_(param: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, step: torch.Tensor, last_step: torch.Tensor, hist: torch.Tensor,
                  qpow: torch.Tensor, hyper: torch.Tensor, hist_base: int, epoch: int, window: int, exact: bool,
                  stats: Optional[torch.Tensor] = None) -> None:
    op = "lvopt::sparse_adamw_"
    row = _check_table(op, param, exp_avg, exp_avg_sq, step, hyper)
    if not (values.device == param.device and values.dim() == 2 and values.shape[0] == indices.numel()
            and values.shape[1] == param.shape[1]):
        _fail(f"{op}: values must have shape [{indices.numel()}, {param.shape[1]}], got {list(values.shape)}")
    if values.dtype != param.dtype:
        _fail(f"{op}: values have dtype {values.dtype} but param has {param.dtype}")
    dev = param.device
    _check_indices(op, indices, param.shape[0], dev)
    rows, perm, offsets = _plan(indices, dev)
    t = float(step) + 1.0
    ti = int(t)
    if exact:
        _check_clock(op, param, last_step, hist, qpow, row, hist_base, epoch, window)
        _check_rows_clock(op, last_step[rows.to(last_step.device)], rows, hist_base, hist.shape[0], ti - 1)
    if stats is not None and not (stats.dtype == torch.float64 and stats.numel() == 2 and stats.is_contiguous()
                                  and stats.device == dev):
        _fail(f"{op}: stats must be a contiguous two-element float64 tensor on the param's device, got "
              f"{stats.dtype} {list(stats.shape)} on {stats.device}")
    if exact and rows.numel():
        cr, info, wa = _exact_tables(op, param, exp_avg_sq, rows, last_step, hist, qpow, row, hist_base, epoch,
                                     window, ti - 1, dev)
    else:
        cr = info = wa = torch.zeros(1, dtype=torch.float64, device=dev)
    # Every check has passed: from here on, writes.
    coef = C.advance_steps([step], hyper, dev, unit_step=False)
    u = rows.numel()
    track = stats is not None
    partial = torch.zeros(max(u, 1), 2, dtype=torch.float64, device=dev)
    if u and param.shape[1]:
        _launch(param, values.contiguous(), exp_avg, exp_avg_sq, rows, perm, offsets, coef, cr, info, wa,
                partial, True, bool(exact), track)
    if exact and u:
        last_step[rows.to(last_step.device)] = ti
    if track:
        # Rows in row order (torch's fixed reduction of a fixed-size tensor): deterministic.
        stats.view(-1).copy_(partial[:u].sum(0) if u else torch.zeros(2, dtype=torch.float64, device=dev))


@sparse_adamw_.register_fake
def _(param, indices, values, exp_avg, exp_avg_sq, step, last_step, hist, qpow, hyper, hist_base, epoch, window,
      exact, stats=None):
    return None


@torch.library.custom_op("lvopt_triton::sparse_catchup_",
                         mutates_args=("param", "exp_avg", "exp_avg_sq", "last_step"))
def sparse_catchup_(param: torch.Tensor, indices: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    step: torch.Tensor, last_step: torch.Tensor, hist: torch.Tensor, qpow: torch.Tensor,
                    hyper: torch.Tensor, hist_base: int, epoch: int, window: int) -> None:
    op = "lvopt::sparse_catchup_"
    row = _check_table(op, param, exp_avg, exp_avg_sq, step, hyper)
    dev = param.device
    _check_indices(op, indices, param.shape[0], dev)
    _check_clock(op, param, last_step, hist, qpow, row, hist_base, epoch, window)
    rows, _, _ = _plan(indices, dev)
    c = int(float(step))
    _check_rows_clock(op, last_step[rows.to(last_step.device)], rows, hist_base, hist.shape[0], c)
    # Rows already current are skipped.
    behind = (last_step[rows.to(last_step.device)] < c).to(dev)
    rows = rows[behind]
    if not rows.numel():
        return
    cr, info, wa = _exact_tables(op, param, exp_avg_sq, rows, last_step, hist, qpow, row, hist_base, epoch,
                                 window, c, dev)
    dummy = torch.zeros(2, dtype=torch.int64, device=dev)
    coef = torch.zeros(9, dtype=torch.float32, device=dev)
    coef[7] = float(torch.tensor(row[EPS], dtype=torch.float32))
    if param.shape[1]:
        _launch(param, param, exp_avg, exp_avg_sq, rows, dummy, dummy, coef, cr, info, wa,
                torch.zeros(2, dtype=torch.float64, device=dev), False, True, False)
    last_step[rows.to(last_step.device)] = c


@sparse_catchup_.register_fake
def _(param, indices, exp_avg, exp_avg_sq, step, last_step, hist, qpow, hyper, hist_base, epoch, window):
    return None
