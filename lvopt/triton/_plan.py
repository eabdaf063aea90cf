"""The per-list launch plan of the Triton dense steps, reused across steps, and the two small
kernels every step launches besides the update kernels: the setup kernel (step counters and
coefficients) and the non-finite scan.

A :class:`DensePlan` belongs to one list of tensors (parameters, moments, AMSGrad maxima, step
counters, AdamH radii; by address, size and dtype). It holds the device tables the kernels
walk: the launch tables of lvopt/triton/_common.py (one per dtype and alignment class), a table
of the step counters' addresses (and the radii's, for AdamH), and the buffers a step writes
(coefficients, chunk partials, AdamH's scales). It holds addresses, never the tensors, so a
cached plan keeps no memory alive. A step through a plan does, on the host, a fixed number of
Python operations whatever the number of tensors: the gradients' addresses are compared in one
pass at C level (map over data_ptr) and, when they moved, written into the tables by one
asynchronous copy from pinned memory per launch; the step counters and bias corrections are
computed by one launch of :func:`adam_setup_kernel` from the counters themselves (no torch op
per tensor, no host read); then the update launches.

Coefficients: :func:`adam_setup_kernel` advances every counter in its own dtype (by 1, or by
``1 - found_inf``) and computes math.h's make_adam_coef in fp64, rounded once to fp32: the
same operations as the CPU kernel, with ``pow(beta, step)`` computed to double-double precision
by squaring (step counts are whole numbers), so it is the correctly rounded power (glibc's pow,
which the CPU kernel calls, is correctly rounded in practice; tests/test_triton_capturable.py
compares the coefficients with torch's fp64 arithmetic on the CPU, bit for bit). libdevice's
pow is not used because the interpreter the tests run under does not implement it.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import program_row

# Tensors per program of the setup kernel.
SETUP_BLOCK = 128


@triton.jit
def _split(a):
    """Veltkamp's split of an fp64 value into two halves of 26 bits (no FMA needed)."""
    c = 134217729.0 * a
    hi = c - (c - a)
    return hi, a - hi


@triton.jit
def _dd_mul(xh, xl, yh, yl):
    """Double-double product (Dekker): (xh + xl) * (yh + yl) to ~2^-104 relative."""
    p = xh * yh
    ah, al = _split(xh)
    bh, bl = _split(yh)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    e = e + (xh * yl + xl * yh)
    h = p + e
    return h, e - (h - p)


@triton.jit
def _pow2_int(a, b, k):
    """(a^k, b^k) for fp64 a, b in [0, 1) and whole k >= 0 (int64), by squaring in
    double-double and rounded once to fp64: the correctly rounded powers (but for results
    within ~2^-100 of a rounding midpoint)."""
    zero = a * 0.0
    rah = zero + 1.0
    ral = zero
    rbh = zero + 1.0
    rbl = zero
    ah = a
    al = zero
    bh = b
    bl = zero
    while tl.max(k, axis=0) > 0:
        odd = (k & 1) != 0
        th, tlo = _dd_mul(rah, ral, ah, al)
        rah = tl.where(odd, th, rah)
        ral = tl.where(odd, tlo, ral)
        th, tlo = _dd_mul(rbh, rbl, bh, bl)
        rbh = tl.where(odd, th, rbh)
        rbl = tl.where(odd, tlo, rbl)
        ah, al = _dd_mul(ah, al, ah, al)
        bh, bl = _dd_mul(bh, bl, bh, bl)
        k = k >> 1
    return rah + ral, rbh + rbl


@triton.jit
def adam_setup_kernel(
    steps_ptr,
    hyper_ptr,
    coef_ptr,
    found_ptr,
    n,
    UNIT_STEP: tl.constexpr,
    STEP64: tl.constexpr,
    HAS_FOUND: tl.constexpr,
    RB: tl.constexpr,
    ADVANCE: tl.constexpr = True,
):
    """For tensors i of this program's block: step_i += 1 (or 1 - found_inf) in the counter's
    dtype, at the address in steps_ptr[i]; then row i of coef (fp32, COEF_COLS columns) from
    row i of hyper (fp64, reference.HYPER_COLS columns: lr, beta1, beta2, weight_decay, eps,
    maximize) and the new step, as math.h make_adam_coef (UNIT_STEP: step_size = 1/bc1, AdamH's
    unit_lr). ADVANCE=False: the counters are only read (the coefficients of the step they
    hold: fused_adamh_apply_, the second op of a step split in two)."""
    i = tl.program_id(0) * RB + tl.arange(0, RB)
    mask = i < n
    addr = tl.load(steps_ptr + i, mask=mask, other=0)
    if STEP64:
        sp = addr.to(tl.pointer_type(tl.float64), bitcast=True)
    else:
        sp = addr.to(tl.pointer_type(tl.float32), bitcast=True)
    s = tl.load(sp, mask=mask, other=0.0)
    if ADVANCE:
        if HAS_FOUND:
            s = s + (1.0 - tl.load(found_ptr))
        else:
            s = s + 1.0
        tl.store(sp, s, mask=mask)
    t = s.to(tl.float64)
    h = hyper_ptr + i * 6
    lr = tl.load(h + 0, mask=mask, other=0.0)
    b1 = tl.load(h + 1, mask=mask, other=0.0)
    b2 = tl.load(h + 2, mask=mask, other=0.0)
    wd = tl.load(h + 3, mask=mask, other=0.0)
    eps = tl.load(h + 4, mask=mask, other=0.0)
    mx = tl.load(h + 5, mask=mask, other=0.0)
    p1, p2 = _pow2_int(b1, b2, tl.where(mask, t, 1.0).to(tl.int64))
    bc1 = 1.0 - p1
    bc2 = 1.0 - p2
    # fp64 division and square root are IEEE (div.rn.f64, sqrt.rn.f64: there is no approximate
    # fp64 form on NVIDIA GPUs; numpy's under the interpreter).
    if UNIT_STEP:
        step_size = 1.0 / bc1
    else:
        step_size = lr / bc1
    inv_bc2 = 1.0 / tl.sqrt(bc2)
    sign = tl.where(mx != 0.0, -1.0, 1.0)
    c = coef_ptr + i * 9
    tl.store(c + 0, b1.to(tl.float32), mask=mask)
    tl.store(c + 1, (1.0 - b1).to(tl.float32), mask=mask)
    tl.store(c + 2, b2.to(tl.float32), mask=mask)
    tl.store(c + 3, (1.0 - b2).to(tl.float32), mask=mask)
    tl.store(c + 4, (1.0 - lr * wd).to(tl.float32), mask=mask)
    tl.store(c + 5, step_size.to(tl.float32), mask=mask)
    tl.store(c + 6, inv_bc2.to(tl.float32), mask=mask)
    tl.store(c + 7, eps.to(tl.float32), mask=mask)
    tl.store(c + 8, sign.to(tl.float32), mask=mask)


@triton.jit
def nonfinite_scan_kernel(
    meta_ptr,
    found_ptr,
    n_tensors,
    P_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """found_inf = 1 when an element of this program's gradient chunk is NaN or infinite (a
    launch table of lvopt/triton/_common.py; every program that finds one stores the same 1)."""
    row, chunk = program_row(meta_ptr, n_tensors)
    g = tl.load(row + 1).to(tl.pointer_type(P_DTYPE), bitcast=True)
    if ALIGNED:
        g = tl.multiple_of(g, 16)
    begin = chunk * CHUNK
    n = tl.minimum(tl.load(row + 4) - begin, CHUNK)
    g = g + begin
    acc = tl.zeros((BLOCK,), tl.float32)
    full = n // BLOCK
    for t in range(0, full):  # whole tiles unmasked: 16-byte loads
        x = tl.load(g + t * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        acc += x - x  # 0 for a finite x, NaN for NaN and +-inf
    offs = full * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(g + offs, mask=offs < n, other=0.0).to(tl.float32)
    acc += x - x
    bad = tl.sum((acc != acc).to(tl.int32), axis=0)
    tl.store(found_ptr, 1.0, mask=bad > 0)


def _picker(idx):
    """A C-level function returning the items ``idx`` of a sequence, as a tuple."""
    if len(idx) == 1:
        i = idx[0]
        return lambda s: (s[i],)
    return operator.itemgetter(*idx)


_MOD16 = (15).__and__
_NUMEL = torch.Tensor.numel
_DTYPE = operator.attrgetter("dtype")
_DEVICE_TYPE = operator.attrgetter("device.type")


class DensePlan:
    """The device tables and buffers of one list of tensors (see the module docstring).
    Built by :func:`plan_for`; steps run through lvopt/triton/fused_adamw.run and
    fused_adamh.run."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, steps, vmaxes=None, radii=None):
        dev = params[0].device
        self.device = dev
        self.n = len(params)
        self.ams = bool(vmaxes)
        self.first, self.total = C.first_chunks(params)
        vm = list(vmaxes) if vmaxes else [None] * self.n
        self.tables = C._build_launches(params, grads, exp_avgs, exp_avg_sqs, self.first, vm)
        self.tables.grad_ptrs = C.ptrs(grads)
        self._grad_launches = [
            (_picker(idx), meta, n_tensors)
            for (_, _, meta, n_tensors, _), idx in zip(self.tables.launches, self.tables.grad_cols)
        ]
        self._aligned_pick = [
            _picker(idx) for (_, aligned, _, _, _), idx in zip(self.tables.launches, self.tables.grad_cols) if aligned
        ]
        # Step counters the setup kernel advances: all on the parameters' device, one dtype.
        # Otherwise (host counters of CUDA parameters, mixed dtypes) C.advance_steps does it.
        dtypes = set(map(_DTYPE, steps))
        on_dev = all(s.device == dev for s in steps)
        self.step64 = dtypes == {torch.float64}
        self.step_tab = None
        if on_dev and len(dtypes) == 1:
            self.step_tab = C._upload(torch.tensor(C.ptrs(steps), dtype=torch.int64), dev)
        self.radius_tab = None
        if radii is not None and all(r.device == dev for r in radii):
            self.radius_tab = C._upload(torch.tensor(C.ptrs(radii), dtype=torch.int64), dev)
        self.coef = torch.empty(self.n, C.COEF_COLS, device=dev, dtype=torch.float32)
        self._buffers: dict = {}
        self._chunks = None

    def buffer(self, name, shape, dtype):
        """A device buffer of this plan, reused by every step (stream order keeps one step's
        use before the next step's)."""
        t = self._buffers.get(name)
        if t is None:
            t = self._buffers[name] = torch.empty(shape, device=self.device, dtype=dtype)
        return t

    def chunks(self, params) -> torch.Tensor:
        if self._chunks is None:
            self._chunks = C.chunk_table(params, self.first)
        return self._chunks

    def set_grads(self, grads) -> bool:
        """Points the launch tables at ``grads``: nothing when they did not move; one
        asynchronous copy per launch when they did. False when a gradient of a 16-byte-aligned
        launch is not 16-byte aligned (the plan must be rebuilt)."""
        g = C.ptrs(grads)
        t = self.tables
        if g == t.grad_ptrs:
            return True
        for pick in self._aligned_pick:
            if any(map(_MOD16, pick(g))):
                return False
        for pick, meta, n_tensors in self._grad_launches:
            col = torch.tensor(pick(g), dtype=torch.int64)
            meta[1 : C.TABLE_COLS * n_tensors : C.TABLE_COLS].copy_(C._upload(col, meta.device))
        t.grad_ptrs = g
        return True

    def scan(self, found_inf) -> None:
        """found_inf = 1 when a gradient of the plan holds NaN or inf (on the device)."""
        from .fused_adamw import launch_options

        for dtype, aligned, meta, n_tensors, n_programs in self.tables.launches:
            nonfinite_scan_kernel[(n_programs,)](
                meta,
                found_inf,
                n_tensors,
                P_DTYPE=C.TL_DTYPE[dtype],
                ALIGNED=aligned,
                CHUNK=C.CHUNK,
                BLOCK=C.block(),
                **launch_options(),
            )

    def advance(self, steps, hyper, unit_step: bool, found_inf=None, increment: bool = True):
        """The step counters advanced and this step's coefficient table [n, COEF_COLS] (fp32, on
        the device): one launch of adam_setup_kernel; without a step table C.advance_steps
        (torch ops; may return None, see there). ``increment=False``: the counters are only read
        and the coefficients are those of the step they hold (fused_adamh_apply_)."""
        if self.step_tab is None:
            return C.advance_steps(steps, hyper, self.device, unit_step, found_inf, advance=increment)
        from .fused_adamw import launch_options

        has_found = found_inf is not None
        adam_setup_kernel[(triton.cdiv(self.n, SETUP_BLOCK),)](
            self.step_tab,
            hyper,
            self.coef,
            found_inf if has_found else self.coef,
            self.n,
            UNIT_STEP=unit_step,
            STEP64=self.step64,
            HAS_FOUND=has_found,
            RB=SETUP_BLOCK,
            ADVANCE=increment,
            **launch_options(),
        )
        return self.coef


_PLANS: dict = {}
_PLANS_SIZE = 16


def plan_for(params, grads, exp_avgs, exp_avg_sqs, steps, vmaxes=None, radii=None) -> DensePlan:
    """The cached DensePlan of these tensors (keyed by every address but the gradients', the
    sizes and dtypes, the counters' dtypes and devices), pointed at ``grads``. The key is built
    by C-level passes over the lists (no Python loop per tensor)."""
    key = (
        params[0].device,
        tuple(C.ptrs(params)),
        tuple(C.ptrs(exp_avgs)),
        tuple(C.ptrs(exp_avg_sqs)),
        tuple(C.ptrs(vmaxes)) if vmaxes else None,
        tuple(C.ptrs(steps)),
        tuple(map(_NUMEL, params)),
        tuple(map(_DTYPE, params)),
        tuple(map(_DTYPE, steps)),
        tuple(map(_DEVICE_TYPE, steps)),
        None if radii is None else (tuple(C.ptrs(radii)), tuple(map(_DEVICE_TYPE, radii))),
    )
    plan = _PLANS.get(key)
    if plan is not None and not plan.set_grads(grads):
        plan = None
    if plan is None:
        plan = DensePlan(params, grads, exp_avgs, exp_avg_sqs, steps, vmaxes, radii)
        if len(_PLANS) >= _PLANS_SIZE:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan
