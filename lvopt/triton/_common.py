"""Host side shared by lvopt's Triton step kernels: argument checks (the CPU kernel's, same
messages, raised before anything is written), step counters and per-tensor coefficients, and
the multi-tensor launch tables.

Launch plan: every tensor is cut into chunks of CHUNK elements, one program per chunk. A
launch serves every tensor of one parameter dtype (and alignment class): its programs find
their tensor and chunk in two int32 arrays, and the tensor's addresses, size and coefficient
row in an int64 table. All of it is one int64 tensor, built on the host and copied once.
Addresses are cast to pointers in the kernel; tensors whose four streams are 16-byte aligned
get tl.multiple_of hints, so the compiled kernel uses 128-bit loads and stores (see
benchmarks/sass_report.py), the rest a launch without hints.

Coefficients: lvopt/triton/_plan.py's setup kernel advances the step counters and computes the
bias corrections from them in fp64 on the device, as make_adam_coef of
csrc/include/lvopt/math.h does, rounded once to fp32. advance_steps below does the same with
torch ops, for counters the kernel cannot reach (host counters of CUDA parameters, mixed
dtypes). With a device hyper table and device step counters nothing waits for the device.
The launch tables are held, with the rest of a step's device state, by a
_plan.DensePlan per list of tensors.

Device side: the JIT helpers that more than one kernel file runs on these tables
(program_row, load_step_tile).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .._layout import BETA1, BETA2, EPS, HYPER_COLS, LR, WEIGHT_DECAY
from ..optim import _dense

# Elements per program (a multiple of BLOCK) and per tile. 16 Ki elements per program, as in
# the CUDA kernels; a 1024-element tile is 8 elements per thread with 4 warps: two float4 of
# fp32, or one 16-byte vector of bf16.
CHUNK = 16384
BLOCK = 1024
NUM_WARPS = 4
# Table row: p, g, m, v addresses, numel, tensor index (coefficient row), first global chunk,
# AMSGrad's max_exp_avg_sq address (0 without amsgrad).
TABLE_COLS = 8
COEF_COLS = 9  # beta1, 1-beta1, beta2, 1-beta2, decay, step_size, 1/sqrt(bc2), eps, grad sign


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block() -> int:
    """Tile size: BLOCK compiled; under the interpreter, whose cost is per operation rather
    than per element, 4096 (same code paths: unmasked tiles and a masked tail per chunk)."""
    return 4096 if interpreting() else BLOCK


def _fail(msg: str):
    raise RuntimeError(msg)


def _check_layout(op, name, i, t, p, dtype):
    if t is None:
        _fail(f"{op}: {name}[{i}] is undefined")
    if t.device != p.device:
        _fail(f"{op}: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
    if t.layout != torch.strided:
        _fail(f"{op}: {name}[{i}] is a sparse tensor ({t.layout}); this op takes dense tensors")
    if t.dtype != dtype:
        _fail(f"{op}: {name}[{i}] has dtype {t.dtype}, expected {dtype}")
    if t.shape != p.shape:
        _fail(f"{op}: {name}[{i}] has shape {list(t.shape)} but params[{i}] has shape {list(p.shape)}")
    if t.stride() != p.stride():
        _fail(
            f"{op}: {name}[{i}] has strides {list(t.stride())} but params[{i}] has strides "
            f"{list(p.stride())} (lvopt.optim lays gradients and states out like their parameter)"
        )


def _native_check():
    from .. import _ops

    return getattr(_ops._C, "check_dense_step_args", None) if _ops.native_available() else None


def check_step_args(op, params, grads, exp_avgs, exp_avg_sqs, steps, hyper, max_exp_avg_sqs=None):
    """The checks of csrc/include/lvopt/step_args.h (and, with max_exp_avg_sqs, AMSGrad's). hyper
    may be on the CPU (values checked) or on the parameters' device (shape and dtype only:
    reading values would synchronise). Returns hyper's rows when it is on the CPU, else None.
    Runs the native checks of lvopt._C when it is built (the same checks and messages, ~20x
    faster for GPT-2's 148 tensors), else the Python ones below."""
    native = _native_check()
    if native is not None and params and params[0].device.type in ("cuda", "cpu"):
        cuda = params[0].device.type == "cuda"
        if cuda or interpreting():
            native(
                op,
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                hyper,
                list(max_exp_avg_sqs) if max_exp_avg_sqs else None,
                cuda,
            )
            return hyper.tolist() if hyper.device.type == "cpu" else None
    rows = _check_step_args_py(op, params, grads, exp_avgs, exp_avg_sqs, steps, hyper)
    check_amsgrad(op, params, max_exp_avg_sqs)
    return rows


def _check_step_args_py(op, params, grads, exp_avgs, exp_avg_sqs, steps, hyper):
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n):
        _fail(
            f"{op}: tensor lists differ in length (params {n}, grads {len(grads)}, exp_avgs "
            f"{len(exp_avgs)}, exp_avg_sqs {len(exp_avg_sqs)}, steps {len(steps)})"
        )
    dev = params[0].device if n else hyper.device
    if not (
        (hyper.device.type == "cpu" or hyper.device == dev)
        and hyper.dtype == torch.float64
        and hyper.dim() == 2
        and tuple(hyper.shape) == (n, HYPER_COLS)
        and hyper.is_contiguous()
    ):
        _fail(
            f"{op}: hyper must be a contiguous float64 tensor of shape [{n}, {HYPER_COLS}] on the "
            f"CPU or on the parameters' device, got {hyper.dtype} {list(hyper.shape)} on {hyper.device}"
        )
    rows = hyper.tolist() if hyper.device.type == "cpu" else None
    for i in range(n):
        if rows is not None:
            r = rows[i]
            if not (math.isfinite(r[LR]) and r[LR] >= 0.0):
                _fail(f"{op}: lr of tensor {i} must be finite and >= 0, got {r[LR]}")
            if not (0.0 <= r[BETA1] < 1.0):
                _fail(f"{op}: beta1 of tensor {i} must be in [0, 1), got {r[BETA1]}")
            if not (0.0 <= r[BETA2] < 1.0):
                _fail(f"{op}: beta2 of tensor {i} must be in [0, 1), got {r[BETA2]}")
            if not (math.isfinite(r[EPS]) and r[EPS] > 0.0):
                _fail(f"{op}: eps of tensor {i} must be finite and > 0, got {r[EPS]}")
            if not math.isfinite(r[WEIGHT_DECAY]):
                _fail(f"{op}: weight_decay of tensor {i} must be finite, got {r[WEIGHT_DECAY]}")
        p = params[i]
        ok_device = p.device.type == "cuda" or (p.device.type == "cpu" and interpreting())
        if not ok_device or p.device != dev:
            _fail(
                f"{op}: params[{i}] is on {p.device}; the Triton kernels take CUDA tensors (CPU "
                f"tensors only under TRITON_INTERPRET=1), all on one device (params[0] is on {dev})"
            )
        if p.dtype not in (torch.float32, torch.bfloat16):
            _fail(f"{op}: params[{i}] has dtype {p.dtype}; supported: float32, bfloat16")
        if p.layout != torch.strided or not _dense(p):
            _fail(f"{op}: params[{i}] must be dense and non-overlapping (strides {list(p.stride())})")
        _check_layout(op, "grads", i, grads[i], p, p.dtype)
        _check_layout(op, "exp_avgs", i, exp_avgs[i], p, torch.float32)
        _check_layout(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, torch.float32)
        s = steps[i]
        if (
            not (s.device.type == "cpu" or s.device == dev)
            or s.numel() != 1
            or s.dtype not in (torch.float32, torch.float64)
        ):
            _fail(f"{op}: steps[{i}] must be a one-element float32/float64 tensor on the CPU or the parameters' device")
    return rows


def stack_scalars(ts, device) -> torch.Tensor:
    """One-element tensors as one fp64 vector on ``device``: one copy, not one per tensor,
    when they share a device (CPU step counters of CUDA parameters: a single upload)."""
    if len({t.device for t in ts}) == 1:
        return torch.stack([t.reshape(()) for t in ts]).to(device=device, dtype=torch.float64)
    return torch.stack([t.reshape(()).to(device=device, dtype=torch.float64) for t in ts])


def nonfinite_scan_(tensors, found_inf) -> None:
    """The Triton backend's ``nonfinite_scan_``: sets found_inf to 1 when an element of ``tensors``
    is NaN or infinite, with one fused reduction per tensor on its device (isfinite, all, then a
    masked fill of the flag): no host read, so the step that follows decides on the device. Its
    own code, not the reference's, so that the reference (the oracle of the tests) never checks
    itself."""
    for t in tensors:
        if t.numel():
            found_inf.masked_fill_(torch.isfinite(t).all().logical_not(), 1.0)


def advance_steps(steps, hyper, device, unit_step: bool, found_inf=None, advance: bool = True):
    """Increments every step counter (in its own dtype, as the CPU kernel) and returns the fp32
    coefficient table [n, COEF_COLS] on ``device`` (math.h's make_adam_coef / unit_lr).
    With found_inf, the counters advance by 1 - found_inf, on the device: a skipped step leaves
    them as they were, and no value is read on the host. Counters on another device than the
    flag (host counters of CUDA parameters, an old checkpoint's layout) need the flag on the
    host: then it is read (one synchronisation) and None is returned for a skipped step.
    ``advance=False``: the counters are only read (the second op of a step split in two,
    fused_adamh_apply_), and the coefficients are those of the step they hold."""
    steps = list(steps)
    if not advance:
        if found_inf is not None and any(s.device != found_inf.device for s in steps) and bool(found_inf):
            return None
    elif found_inf is None:
        # One multi-tensor launch on a GPU instead of one per counter (the same adds, in each
        # counter's own dtype).
        torch._foreach_add_(steps, 1)
    elif all(s.device == found_inf.device for s in steps):
        # The list overload: the scalar-tensor one reads its scalar on the host in fake mode.
        delta = (1.0 - found_inf).reshape(())
        torch._foreach_add_(steps, [delta] * len(steps))
    elif bool(found_inf):
        return None
    else:
        torch._foreach_add_(steps, 1)
    t = stack_scalars(steps, device)
    h = hyper.to(device=device, dtype=torch.float64)
    lr, b1, b2, wd, eps, mx = h.unbind(1)
    bc1 = 1.0 - torch.pow(b1, t)
    bc2 = 1.0 - torch.pow(b2, t)
    step_size = (1.0 / bc1) if unit_step else (lr / bc1)
    sign = torch.where(mx != 0.0, -1.0, 1.0).to(torch.float64)
    coef = torch.stack([b1, 1.0 - b1, b2, 1.0 - b2, 1.0 - lr * wd, step_size, 1.0 / torch.sqrt(bc2), eps, sign], 1)
    return coef.to(torch.float32).contiguous()


def ptr(t: torch.Tensor) -> int:
    """A tensor's address for the launch tables (one indirection, so that a test can give fake
    tensors, which have no storage, addresses: tests/test_triton_capturable.py)."""
    return t.data_ptr()


_PTR = ptr
_DATA_PTR = torch.Tensor.data_ptr


def ptrs(ts) -> list:
    """The addresses of ``ts``, in one C-level pass (map over Tensor.data_ptr), or through
    ``ptr`` when a test has replaced it."""
    return list(map(_DATA_PTR if ptr is _PTR else ptr, ts))


# Triton element types of the parameter dtypes.
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


def _aligned(*ts) -> bool:
    return all(ptr(t) % 16 == 0 for t in ts)


# Launch tables by what determines them (every stream's address, each tensor's size and dtype,
# the device), so that repeated steps on the same tensors neither rebuild them in Python nor
# upload them again: from pageable memory an upload waits for the stream to drain (CUDA runs a
# stream synchronisation before such a copy), which would stop the host queueing a step while
# the device still runs the last. A hit returns the same values a rebuild would produce.
_LAUNCH_CACHE: dict = {}
_LAUNCH_CACHE_SIZE = 16


def _upload(host: torch.Tensor, device) -> torch.Tensor:
    """``host`` on ``device`` without a blocking copy: through pinned memory, asynchronously (the
    caching host allocator keeps the pinned block until the copy has run)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class _Plan:
    """The launch tables of one list of parameters (and their moments), reused across steps.
    The gradients' addresses are the one column that may change from step to step (zero_grad
    with set_to_none=True re-allocates them): they are compared and, when they moved, written
    into the device tables by one asynchronous copy."""

    __slots__ = ("launches", "grad_ptrs", "grad_cols", "grad_aligned")

    def __init__(self, launches, grad_ptrs, grad_cols, grad_aligned):
        self.launches = launches
        self.grad_ptrs = grad_ptrs
        self.grad_cols = grad_cols  # per launch: the tensor indices of its table rows
        self.grad_aligned = grad_aligned  # per tensor: whether its gradient was 16-byte aligned


def launches(params, grads, exp_avgs, exp_avg_sqs, first_chunk, vmaxes=None):
    """(dtype, aligned, meta, n_tensors, n_programs) per launch: meta is one int64 tensor on the
    parameters' device holding the table [n_tensors, TABLE_COLS], then the program -> table
    row map and the program -> chunk map. first_chunk follows from the sizes (first_chunks).
    Cached by the parameters' and moments' addresses, sizes and dtypes, not by the gradients'
    (see _Plan)."""
    vm = vmaxes if vmaxes else [None] * len(params)
    key = (params[0].device if params else None,) + tuple(
        (ptr(p), ptr(m), ptr(v), 0 if x is None else ptr(x), p.numel(), p.dtype)
        for p, m, v, x in zip(params, exp_avgs, exp_avg_sqs, vm)
    )
    gptrs = [ptr(g) for g in grads]
    plan = _LAUNCH_CACHE.get(key)
    if plan is not None and gptrs != plan.grad_ptrs:
        if any((a % 16 == 0) != al for a, al in zip(gptrs, plan.grad_aligned)):
            plan = None  # an alignment class changed: rebuild
        else:
            for (dtype, aligned, meta, n_tensors, n_programs), idx in zip(plan.launches, plan.grad_cols):
                col = torch.tensor([gptrs[i] for i in idx], dtype=torch.int64)
                meta[1 : TABLE_COLS * n_tensors : TABLE_COLS].copy_(_upload(col, meta.device))
            plan.grad_ptrs = gptrs
    if plan is None:
        plan = _build_launches(params, grads, exp_avgs, exp_avg_sqs, first_chunk, vm)
        plan.grad_ptrs = gptrs
        if len(_LAUNCH_CACHE) >= _LAUNCH_CACHE_SIZE:
            _LAUNCH_CACHE.pop(next(iter(_LAUNCH_CACHE)))
        _LAUNCH_CACHE[key] = plan
    return plan.launches


def _build_launches(params, grads, exp_avgs, exp_avg_sqs, first_chunk, vmaxes) -> _Plan:
    groups: dict = {}
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        x = vmaxes[i]
        key = (p.dtype, _aligned(p, grads[i], exp_avgs[i], exp_avg_sqs[i], *(() if x is None else (x,))))
        groups.setdefault(key, []).append(i)
    plan, cols = [], []
    for (dtype, aligned), idx in groups.items():
        rows, owner, chunk = [], [], []
        for r, i in enumerate(idx):
            n = params[i].numel()
            nc = (n + CHUNK - 1) // CHUNK
            x = vmaxes[i]
            rows.append(
                [
                    ptr(params[i]),
                    ptr(grads[i]),
                    ptr(exp_avgs[i]),
                    ptr(exp_avg_sqs[i]),
                    n,
                    i,
                    first_chunk[i],
                    0 if x is None else ptr(x),
                ]
            )
            owner += [r] * nc
            chunk += range(nc)
        meta = torch.tensor([x for row in rows for x in row] + owner + chunk, dtype=torch.int64)
        plan.append((dtype, aligned, _upload(meta, params[idx[0]].device), len(rows), len(owner)))
        cols.append(idx)
    return _Plan(plan, None, cols, [ptr(g) % 16 == 0 for g in grads])


_CHUNK_TABLES: dict = {}


def chunk_table(params, first) -> torch.Tensor:
    """[n, 2] int64 (first chunk, chunk count) per tensor on the parameters' device, for the
    per-tensor reductions; cached by the device and the tensors' sizes (one asynchronous upload
    per layout, not one blocking upload per step)."""
    key = (params[0].device, tuple(p.numel() for p in params))
    t = _CHUNK_TABLES.get(key)
    if t is None:
        host = torch.tensor(
            [[f, (p.numel() + CHUNK - 1) // CHUNK] for f, p in zip(first, params)], dtype=torch.int64
        ).reshape(-1, 2)
        t = _upload(host, params[0].device)
        if len(_CHUNK_TABLES) >= _LAUNCH_CACHE_SIZE:
            _CHUNK_TABLES.pop(next(iter(_CHUNK_TABLES)))
        _CHUNK_TABLES[key] = t
    return t


def first_chunks(params):
    first, c = [], 0
    for p in params:
        first.append(c)
        c += (p.numel() + CHUNK - 1) // CHUNK
    return first, c


def check_amsgrad(op, params, max_exp_avg_sqs) -> bool:
    """AMSGrad's running maxima: absent or empty, or one fp32 tensor per parameter laid out like
    it (step_args.h check_amsgrad_args). Returns whether AMSGrad is on."""
    if not max_exp_avg_sqs:
        return False
    if len(max_exp_avg_sqs) != len(params):
        _fail(
            f"{op}: max_exp_avg_sqs has {len(max_exp_avg_sqs)} tensors, params has {len(params)} (pass one "
            f"per parameter for amsgrad, or none)"
        )
    for i, (x, p) in enumerate(zip(max_exp_avg_sqs, params)):
        _check_layout(op, "max_exp_avg_sqs", i, x, p, torch.float32)
    return True


def check_found_inf(op, found_inf, params) -> None:
    if found_inf is None:
        return
    if found_inf.dtype != torch.float32 or found_inf.numel() != 1 or (params and found_inf.device != params[0].device):
        _fail(
            f"{op}: found_inf must be a one-element float32 tensor on the parameters' device, got "
            f"{found_inf.dtype} {tuple(found_inf.shape)} on {found_inf.device}"
        )


def check_stats(op, stats, params, cols: int) -> None:
    n = len(params)
    if (
        stats.dtype != torch.float64
        or tuple(stats.shape) != (n, cols)
        or not stats.is_contiguous()
        or (params and stats.device != params[0].device)
    ):
        _fail(
            f"{op}: stats must be a contiguous float64 tensor of shape [{n}, {cols}] on the parameters' "
            f"device, got {stats.dtype} {tuple(stats.shape)} on {stats.device}"
        )


# ----- device side -------------------------------------------------------------------------------


@triton.jit
def program_row(meta_ptr, n_tensors):
    """This program's row of a launch table (a pointer to the tensor's TABLE_COLS int64
    columns) and its chunk of that tensor, from the program -> row and program -> chunk maps
    that follow the rows."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    owner = tl.load(meta_ptr + n_tensors * 8 + pid)
    chunk = tl.load(meta_ptr + n_tensors * 8 + n_programs + pid)
    return meta_ptr + owner * 8, chunk


@triton.jit
def load_step_tile(p, g, m, v, offs, mask, MASKED: tl.constexpr):
    """A tile of parameters and gradients (as fp32) and of both moments: the reads of a step's
    first pass (AdamW's tile, AdamH's pass 1). Masked lanes read 0."""
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
    return pi, gi, mi, vi
