"""Exact-mode bookkeeping for sparse embedding rows (docs/design.md sections 2.3.1-2.3.2).

A :class:`RowClock` holds, for one parameter, the per-step history that lets a row last brought
current at step s be caught up to step c in O(1) per element: per step j the learning rate,
the decay D_j = 1 - lr_j wd_j, log Pi_j = sum log D_i, and eight epoch-relative prefix sums
(the columns of ``HistCol`` in csrc/include/lvopt/math.h). Epochs are ``epoch`` steps long and
aligned to ``base``, the step of history row 0; rows never lag behind ``base`` (the optimizer
sweeps rows that fall more than ``horizon`` steps behind), so the history stays bounded.

Closed form (checked in tests/test_sparse_rows.py against a step-by-step simulation): with
rho = beta1/sqrt(beta2), w_j = L_j (lr_j/bc1_j) sqrt(bc2_j) rho^k, a_j = sqrt(bc2_j)/beta2^(k/2),
M_n = sum_j w_j a_j^n and N_n = sum_j w_j a_j^-n. Each M_n (N_n) is
sum_j f(j) q^(j-s) Pi_c/Pi_j with q = beta1 beta2^-(n+1)/2 (beta1 beta2^(n-1)/2), summed over the
window s+1 .. min(c, s+W) epoch by epoch from the epoch-relative prefix sums.
"""

from __future__ import annotations

import math
import weakref

import torch

# Columns of the history table and the error word's codes (lvopt/_layout.py, from math.h's HistCol
# and sparse_args.h).
from ._layout import (
    ERR_CLOCK,
    H_DECAY,
    H_LOGPI,
    H_SERIES,
    H_SQRTBC2,
    HIST_COLS,
    HIST_SERIES,
    SPARSE_COALESCED,
    SPARSE_RING,
)


def _host_tables(fn):
    """RowClock's host tables are bookkeeping, never traced: they stay real CPU tensors even when
    a fake-tensor mode is active (torch.compile's tracing, or the tests that run the host path
    on fake CUDA tensors)."""

    def wrapper(*args, **kwargs):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def check_exact_hyper(beta1: float, beta2: float, lr: float, wd: float, where: str) -> None:
    """Exact mode's closed form needs rho = beta1/sqrt(beta2) < 1 (the skipped steps' updates
    then decay geometrically) and 1 - lr*wd > 0."""
    if not (beta2 > 0.0 and beta1 * beta1 < beta2):
        raise ValueError(
            f"{where}: sparse_mode='exact' needs beta1**2 < beta2 (so that the updates of "
            f"skipped steps decay), got betas=({beta1}, {beta2}); use sparse_mode='lazy'"
        )
    if lr * wd >= 1.0:
        raise ValueError(f"{where}: sparse_mode='exact' needs lr*weight_decay < 1, got {lr * wd}")


class RowClock:
    """Per-step history of one exact-mode parameter; see the module docstring."""

    @_host_tables
    def __init__(self, beta1: float, beta2: float, eps: float, step: int):
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        qs = [beta1 * beta2 ** (-(i + 1) / 2) for i in range(4)] + [beta1 * beta2 ** ((n - 1) / 2) for n in range(1, 5)]
        self.q = qs
        rho = qs[0]
        # Terms decay like rho^k: beyond W steps they are below 1e-16 of the first one.
        self.window = 0 if rho == 0.0 else int(math.ceil(math.log(1e-16) / math.log(rho)))
        # A difference of two epoch-relative sums loses at most q^-epoch <= 1e6 (6 of fp64's 16
        # digits); epochs longer than the window buy nothing.
        q_min = min(q for q in qs if q > 0.0) if rho > 0.0 else 0.5
        self.epoch = max(
            1, min(max(self.window, 1), int(math.log(1e6) / -math.log(q_min)) if q_min < 1 else self.window)
        )
        self.horizon = max(4096, 8 * (self.window + self.epoch))
        self.horizon -= self.horizon % self.epoch
        e, w = self.epoch, max(self.window, self.epoch)
        ks = torch.arange(-e, w + 1, dtype=torch.float64)
        self.qpow = torch.stack([torch.tensor(q, dtype=torch.float64) ** ks for q in qs]).contiguous()
        self._pin = False
        self.reset(step)

    @_host_tables
    def reset(self, step: int) -> None:
        """All rows are current at ``step``: the history restarts there (a device mirror keeps
        its buffer and qpow, and re-uploads from row 0)."""
        m = getattr(self, "_mirror", None)
        if m is not None:
            m["n"] = 0
        self._mirror = m
        self.base = int(step)
        self._buf = self._new_buf(256)
        self._buf[0, H_DECAY] = 1.0
        self._buf[0, H_SQRTBC2] = math.sqrt(1.0 - self.beta2**self.base)
        self.n = 1
        self._last = self._buf[0].tolist()

    def _new_buf(self, rows: int) -> torch.Tensor:
        """A host table; pinned when a CUDA device mirrors it, so that each appended row goes up
        with a non-blocking copy (a fresh buffer each time: rows already queued for upload from
        the old one stay valid until their copies are done, as torch's pinned-memory allocator
        keeps a block until the copies recorded on it have completed)."""
        buf = torch.zeros(rows, HIST_COLS, dtype=torch.float64)
        if getattr(self, "_pin", False):
            buf = buf.pin_memory()
        return buf

    @property
    def last_step(self) -> int:
        return self.base + self.n - 1

    @property
    def hist(self) -> torch.Tensor:
        return self._buf[: self.n]

    @_host_tables
    def append(self, t: int, lr: float, wd: float) -> None:
        """Adds step ``t`` (the next one) with its learning rate and weight decay."""
        assert t == self.last_step + 1, (t, self.last_step)
        b1, b2 = self.beta1, self.beta2
        d = 1.0 - lr * wd
        log_pi = self._last[H_LOGPI] + math.log(d)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        sb = math.sqrt(bc2)
        b = self.base + self.epoch * ((t - 1 - self.base) // self.epoch)
        k = t - b
        scale = math.exp(self._buf[b - self.base, H_LOGPI].item() - log_pi)
        lb = lr / bc1
        f = [lb * bc2 ** ((i + 1) / 2) for i in range(4)] + [lb * bc2 ** ((1 - n) / 2) for n in range(1, 5)]
        inside = t - 1 > b
        row = [lr, d, log_pi, lb * sb, sb]
        for i in range(HIST_SERIES):
            prev = self._last[H_SERIES + i] if inside else 0.0
            row.append(prev + f[i] * self.q[i] ** k * scale)
        if self.n == self._buf.shape[0]:
            grown = self._new_buf(2 * self._buf.shape[0])
            grown[: self.n] = self._buf
            self._buf = grown
        self._buf[self.n] = torch.tensor(row, dtype=torch.float64)
        self.n += 1
        self._last = row

    @_host_tables
    def pop(self) -> None:
        """Drops the last step (a step that wrote nothing: its op found bad ids on the device)."""
        assert self.n > 1
        self.n -= 1
        self._last = self._buf[self.n - 1].tolist()
        if self._mirror is not None:
            self._mirror["n"] = min(self._mirror["n"], self.n)

    def truncate(self, min_last_step: int) -> None:
        """Drops history before the epoch that holds ``min_last_step`` (no row needs it). The
        device mirror drops the same rows on the device."""
        nb = self.base + self.epoch * ((min_last_step - self.base) // self.epoch)
        if nb > self.base:
            off = nb - self.base
            self._buf = self._buf[off:].clone()
            if self._pin:
                self._buf = self._buf.pin_memory()
            self.n -= off
            self.base = nb
            m = self._mirror
            if m is not None:
                keep = max(min(m["n"], self.n + off) - off, 0)
                m["buf"][:keep].copy_(m["buf"][off : off + keep].clone())
                m["n"] = keep

    def op_args(self, device: torch.device | str | None = None) -> tuple:
        """(hist, qpow, hist_base, epoch, window) for lvopt::sparse_adamw_ / sparse_catchup_.
        With a non-CPU ``device`` the tables are device copies kept in step with the host ones:
        each call uploads only the history rows appended since the last (one row per step),
        from pinned memory without blocking, instead of the whole table (up to ``horizon`` x 13
        fp64) that the op would otherwise copy on every step."""
        if device is None or torch.device(device).type == "cpu":
            return self.hist, self.qpow, self.base, self.epoch, self.window
        hist, qpow = self.device_tables(torch.device(device))
        return hist, qpow, self.base, self.epoch, self.window

    def device_tables(self, device: torch.device) -> tuple:
        """(hist, qpow) on ``device``, updated incrementally (see op_args): no host read, and
        no blocking copy once the tables are pinned (from the second call on a CUDA device)."""
        m = self._mirror
        if m is None or m["device"] != device:
            if device.type == "cuda" and not self._pin:
                self._pin = True
                self._buf = self._buf.pin_memory()
                self.qpow = self.qpow.pin_memory()
            qpow = self.qpow.to(device, non_blocking=True)
            buf = torch.empty(self._buf.shape, dtype=torch.float64, device=device)
            m = self._mirror = {"device": device, "buf": buf, "n": 0, "qpow": qpow}
        if m["buf"].shape[0] < self.n:
            grown = torch.empty((2 * self.n, HIST_COLS), dtype=torch.float64, device=device)
            grown[: m["n"]].copy_(m["buf"][: m["n"]])
            m["buf"] = grown
        if m["n"] < self.n:
            m["buf"][m["n"] : self.n].copy_(self._buf[m["n"] : self.n], non_blocking=True)
            m["n"] = self.n
        return m["buf"][: self.n], m["qpow"]

    @_host_tables
    def hyper(self) -> torch.Tensor:
        """A hyperparameter row carrying this clock's betas and eps (what a catch-up uses)."""
        return torch.tensor([[0.0, self.beta1, self.beta2, 0.0, self.eps, 0.0]], dtype=torch.float64)


class RingClock:
    """The exact-mode history of a capturable group (``capturable=True``, cuda and triton
    backends), kept and advanced on the device so that one captured step replays correctly
    at every later step (docs/sparse-rows.md, "CUDA graphs").

    * The history is a ring of ``ring`` rows on the device: step j is row (j - base) % ring, and
      ``base`` (the step the clock started at) never moves, so epochs stay aligned to it. The
      step op appends its step's row itself, in its setup kernel, from the device step counter
      and the device hyperparameter row (the formula of RowClock.append, in fp64 on the device).
    * The sweep is spread over the steps: every step first catches up one slice of
      ``ceil(V / period)`` rows, slice (step mod period) (the last one shifted to end at row
      V - 1), so every row is brought current at least once every ``period`` steps, and a row
      never lags more than ``period`` steps. The ring holds ``period + 2 epoch + 2`` steps: a
      catch-up reads the rows from the start of the row's epoch on, and the op refuses (error
      code 2) a row whose epoch start the ring has overwritten.
    * Nothing is decided or uploaded on the host after the clock was made: the host work of a
      step is the same at every step (what a CUDA graph replays).

    ``log Pi`` is never restarted (RowClock restarts it at each sweep): it accumulates one fp64
    rounding per step, harmless to the differences the catch-up takes (~1e-12 relative after
    1e6 steps). The step count is the device counter (fp32, exact to 2**24 steps, torch's
    convention). The values equal RowClock's to fp64 rounding, not bit for bit (device libm).
    """

    def __init__(
        self, beta1: float, beta2: float, eps: float, step: int, num_rows: int, device, period: int | None = None
    ):
        host = RowClock(beta1, beta2, eps, step)
        self.beta1, self.beta2, self.eps = host.beta1, host.beta2, host.eps
        self.window, self.epoch, self.horizon, self.base = host.window, host.epoch, host.horizon, host.base
        self.period = max(1, int(period)) if period else max(1, host.horizon // 2)
        self.ring = self.period + 2 * self.epoch + 2
        self.num_rows = int(num_rows)
        self.slice = max(1, min(self.num_rows, -(-self.num_rows // self.period)))
        device = torch.device(device)
        table, qpow, self._hyper = _ring_tables(host, self.ring)
        if device.type == "cuda":
            table, qpow = table.pin_memory(), qpow.pin_memory()
        # The one upload of the clock (at its first step), from pinned memory.
        self.hist = table.to(device, non_blocking=True)
        self.qpow = qpow.to(device, non_blocking=True)
        self._offsets = torch.arange(self.slice, dtype=torch.int64, device=device)

    last_step = None  # the host does not count a RingClock's steps

    def op_args(self, device=None) -> tuple:
        """(hist, qpow, hist_base, epoch, window) for the ops, with flags SPARSE_RING."""
        return self.hist, self.qpow, self.base, self.epoch, self.window

    def hyper(self) -> torch.Tensor:
        """A hyperparameter row carrying this clock's betas and eps (what a catch-up uses; a host
        constant, made once)."""
        return self._hyper

    def slice_ids(self, step: torch.Tensor) -> torch.Tensor:
        """The rows this step's share of the sweep brings current (sorted, distinct), computed on
        the device from the step counter: slice (step mod period) of ceil(V / period) rows."""
        j = torch.remainder(step.reshape(1), self.period).to(torch.int64)
        return torch.clamp(j * self.slice, max=self.num_rows - self.slice) + self._offsets


@_host_tables
def _ring_tables(host: RowClock, ring: int) -> tuple:
    """A RingClock's initial host tables: the ring with the base step's row, qpow, and the
    catch-up's constant hyper row."""
    table = torch.zeros(ring, HIST_COLS, dtype=torch.float64)
    table[0] = host.hist[0]
    return table, host.qpow.clone(), host.hyper()


# ----- the row lifecycle of an optimizer's row-sparse parameters ----------------------------------

SPARSE_MODES = ("exact", "lazy")
# Exact-mode bookkeeping kept in a sparse parameter's state between steps; a checkpoint never
# holds it (state_dict() first brings every row current, so it would say nothing).
ROW_KEYS = ("last_step", "row_clock")
# Backends with a row-sparse step.
SPARSE_BACKENDS = ("cpu", "cuda", "triton", "reference")
# When ids are checked on a GPU: "deferred" (on the device, no host synchronisation: a bad batch
# makes the step's writes to that table no-ops and the error is raised by the next step(),
# flush() or state_dict()) or "sync" (on the host before anything is written: one
# synchronisation per sparse parameter and step). On the CPU ids are always checked at once.
CHECK_IDS = ("deferred", "sync")


def _device_tables(backend: str) -> bool:
    """Whether a backend's ops read the exact-mode history on the parameter's device (CUDA and
    Triton: RowClock keeps a device mirror, uploaded one row a step from pinned memory) or on the
    host (CPU and reference)."""
    return backend in ("cuda", "triton")


def _on_device(x) -> bool:
    """A tensor hyperparameter that lives on a device (read there, never on the host)."""
    return isinstance(x, torch.Tensor) and x.device.type != "cpu"


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


class _PendingError:
    """A device-side error word ``[code, min id, max id]`` that the sparse ops of one parameter
    set instead of raising (no host synchronisation), and its lazy read-back: after each op a
    copy to pinned host memory is queued behind it (non-blocking) with an event; ``check``
    waits on that event only (by the next step the copy has long completed) and reads it."""

    def __init__(self, device: torch.device):
        self.word = torch.zeros(3, dtype=torch.int64, device=device)
        self._host = None
        self._event = None
        self._direct = False  # armed inside a CUDA-graph capture: read the word itself
        self.armed = False

    def arm(self) -> None:
        self.armed = True
        if self.word.device.type != "cuda" or _is_fake(self.word):
            return  # a CPU word (the Triton interpreter) is read directly; fake tensors hold nothing
        if torch.cuda.is_current_stream_capturing():
            # A step being captured in a CUDA graph: its replays set the word when they find bad
            # ids, and no host copy or event of the capture tells when; the word is read
            # directly (one synchronisation) by the next flush(), state_dict() or eager step().
            self._direct = True
            return
        if self._host is None:
            self._host = torch.empty(3, dtype=torch.int64, pin_memory=True)
            self._event = torch.cuda.Event()
        self._host.copy_(self.word, non_blocking=True)
        self._event.record()

    def read(self) -> list | None:
        """[code, lo, hi] if an op has run since the last read, else None."""
        if not self.armed or _is_fake(self.word):
            return None
        if self.word.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # (a step being captured reads nothing; its replays are read later)
        self.armed = False
        if self._host is None or self._direct:
            return self.word.tolist()
        self._event.synchronize()
        return self._host.tolist()


class SparseRows:
    """The row lifecycle of one optimizer's row-sparse parameters (design: docs/design.md,
    "Sparse embedding rows"): the checks of a sparse gradient, the step (lazy or exact), the
    periodic sweep that bounds the history, catch-up, flush and the drop of the bookkeeping.

    Nothing here reads device memory on the host: ids are range-checked on the device (unless
    ``check_ids="sync"``), the sweep and flush catch up every row of the table (rows already
    current cost a read of their step), and the history is kept by RowClock on the host, one
    appended row a step uploaded without blocking. The exact-mode step count lives on the host
    in the clock (``RowClock.last_step``), in step with the state's ``step`` counter."""

    def __init__(self, opt):
        self._opt = weakref.ref(opt)
        self._errors: dict = {}  # id(p) -> (weakref(p), _PendingError)
        self._arange: dict = {}  # id(p) -> (weakref(p), every row index of p, on p's device)
        self._hyper: dict = {}  # id(p) -> [weakref(p), device hyper row, its host numbers] (capturable)

    @property
    def opt(self):
        return self._opt()

    # -- checks -----------------------------------------------------------------------------
    def check_grad(
        self, p: torch.Tensor, g: torch.Tensor, backend: str, group: dict | None, where, hyperball: bool
    ) -> None:
        """A torch.sparse_coo gradient must be row-sparse over a 2-D contiguous table, in a group
        that can take it, with every index in range; checked before anything is written. On a
        GPU the index range is checked on the device by the step itself (see CHECK_IDS)."""
        if hyperball and p.dim() >= 2:
            raise TypeError(
                f"{where()}: got a sparse gradient in a hyperball group, which cannot take it: "
                f"AdamH rescales the whole matrix every step. Put embeddings in a group with "
                f"hyperball=False (row-sparse AdamW)"
            )
        if p.dim() != 2 or g.sparse_dim() != 1 or g.dense_dim() != 1:
            raise TypeError(
                f"{where()}: got a sparse gradient with sparse_dim={g.sparse_dim()}, "
                f"dense_dim={g.dense_dim()}; lvopt takes row-sparse gradients of 2-D "
                f"(rows x width) parameters, as nn.Embedding(sparse=True) produces"
            )
        if backend not in SPARSE_BACKENDS:
            raise TypeError(
                f"{where()}: backend {backend!r} has no row-sparse step; sparse gradients are "
                f"stepped by the {SPARSE_BACKENDS} backends"
            )
        if not p.is_contiguous():
            raise TypeError(f"{where()}: a row-sparse step needs a contiguous (row-major) parameter")
        if self.checks_on_host(backend):
            idx = g._indices()
            if idx.numel():
                lo, hi = (int(x) for x in torch.aminmax(idx))
                if lo < 0:
                    raise ValueError(f"{where()}: sparse gradient has a negative row index {lo}")
                if hi >= p.shape[0]:
                    raise ValueError(f"{where()}: sparse gradient row index {hi} is out of range for {p.shape[0]} rows")
        if group is not None and group.get("sparse_mode", "exact") == "exact":
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            if _on_device(lr) or _on_device(wd):
                # A device tensor (a captured step's lr) is not read on the host: the betas only.
                lr = wd = 0.0
            check_exact_hyper(float(b1), float(b2), float(lr), float(wd), where())

    def checks_on_host(self, backend: str) -> bool:
        """Whether ids are checked on the host before the step: for the host backends (cpu,
        reference: no synchronisation to save), or with check_ids="sync"; else (cuda, triton) on
        the device, deferred."""
        return not _device_tables(backend) or getattr(self.opt, "check_ids", "deferred") == "sync"

    def _error_for(self, p: torch.Tensor, backend: str) -> _PendingError | None:
        if self.checks_on_host(backend):
            return None
        entry = self._errors.get(id(p))
        if entry is None or entry[0]() is not p:
            entry = self._errors[id(p)] = (weakref.ref(p), _PendingError(p.device))
        return entry[1]

    def raise_pending(self) -> None:
        """Raises the deferred error of an earlier step, if one of its ops found bad ids on the
        device: that op (and any later one on the same table) wrote nothing."""
        opt = self.opt
        for key, (ref, err) in list(self._errors.items()):
            p = ref()
            if p is None:
                del self._errors[key]
                continue
            word = err.read()
            if word is None or word[0] == 0:
                continue
            err.word.zero_()
            st = opt.state.get(p, {})
            clock = st.get("row_clock")
            if isinstance(clock, RowClock):
                # A step whose op found the error wrote nothing, its step count included; the
                # clock (which counts on the host) drops the history row it appended. This is the
                # error path: reading the step count here costs nothing that matters. (A
                # RingClock needs nothing: the next step appends the same step's row again.)
                t = int(float(st["step"]))
                while clock.last_step > t and clock.n > 1:
                    clock.pop()
            clock_note = (
                "; a row's last_step was outside the history (stale clock state)" if word[0] & ERR_CLOCK else ""
            )
            where = self._name(p)
            raise ValueError(
                f"{where}: a sparse gradient (or catch_up ids) held row indices in [{word[1]}, {word[2]}], "
                f"outside [0, {p.shape[0]}){clock_note}. Checked on the device (check_ids='deferred'): "
                f"that step wrote nothing to this parameter (rows, moments, step count), and this error "
                f"is raised by the next step(), flush() or state_dict(). Pass check_ids='sync' to raise "
                f"at once, at the cost of one host synchronisation per step"
            )

    def _name(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.opt.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return self.opt._where(group, gi, pi, p)
        return f"param of shape {tuple(p.shape)}"

    # -- the step -----------------------------------------------------------------------------
    def step(self, row: tuple, p: torch.Tensor, backend: str, group: dict, track: bool):
        """One row-sparse step; returns the telemetry sums (two fp64) when tracking."""
        opt = self.opt
        exact = group.get("sparse_mode", "exact") == "exact"
        fresh = not opt.state.get(p)
        st = opt._init_state(p, "adamw")
        clock = st.get("row_clock")
        # A capturable group (capturable=True) on a GPU backend keeps its history on the device
        # (RingClock) and its hyperparameters in a device row: nothing is decided on the host.
        capturable = bool(group.get("capturable", False)) and _device_tables(backend)
        lr, b1, b2, wd, eps, _ = row
        b1, b2, eps = float(b1), float(b2), float(eps)
        known = 0 if fresh else None  # the step count, where the host knows it without a read
        kind = RingClock if capturable else RowClock
        if clock is not None and (
            not exact or (clock.beta1, clock.beta2, clock.eps) != (b1, b2, eps) or type(clock) is not kind
        ):
            # The closed form assumes fixed betas and eps since each row's last step: bring every
            # row current under the old ones first (and under the old clock, when the group's
            # capturable setting changed).
            self.flush_param(p, backend)
            known = clock.last_step
            self.drop(p)
            clock = None
        if exact and clock is None:
            # The step count at which the clock starts: 0 for a new table, the old clock's after
            # a change of betas/eps; else (the first exact step after a checkpoint was loaded or
            # after dense steps of this table) one host read, once.
            t0 = known if known is not None else int(float(st["step"]))
            if capturable:
                clock = RingClock(b1, b2, eps, t0, p.shape[0], p.device, period=group.get("sparse_sweep_period"))
            else:
                clock = RowClock(b1, b2, eps, t0)
            st["row_clock"] = clock
            st["last_step"] = torch.full((p.shape[0],), t0, dtype=torch.int64, device=p.device)
            p._lvopt_row_owner = weakref.ref(opt)
        if _device_tables(backend) and st["step"].device != p.device:
            # The device ops read and advance the step count on the device (and leave it when
            # they write nothing), as torch's fused Adam keeps it: moved there once.
            st["step"] = st["step"].to(p.device)
        g = p.grad
        fns = _backend_ops(backend)
        hyper = self._device_hyper(p, row) if capturable else _hyper_row(row)
        sums = torch.zeros(1, 2, dtype=torch.float64, device=p.device) if track else None
        extra = {} if sums is None else {"stats": sums}
        err = self._error_for(p, backend)
        if err is not None:
            extra["error"] = err.word
        idx, vals = g._indices()[0], g._values()
        # A coalesced gradient (sorted, distinct rows: torch's flag, set by coalesce() and by
        # lvopt.nn.Embedding's CPU backward) is not sorted again by the GPU ops.
        flags = SPARSE_COALESCED if _device_tables(backend) and g.is_coalesced() else 0
        if flags:
            extra["flags"] = flags
        if isinstance(clock, RingClock) and exact:
            # The sweep, spread over the steps: this step's slice of rows is brought current
            # first (rows already current return at once), so that no row lags more than
            # `period` steps and the ring always holds what a catch-up reads.
            self.catchup_rows(p, clock.slice_ids(st["step"]), backend, coalesced=True)
            hist, qpow, base, epoch, window = clock.op_args()
            extra["flags"] = flags | SPARSE_RING
            fns.sparse_adamw_(
                p.data,
                idx,
                vals,
                st["exp_avg"],
                st["exp_avg_sq"],
                st["step"],
                st["last_step"],
                hist,
                qpow,
                hyper,
                base,
                epoch,
                window,
                True,
                **extra,
            )
        elif exact:
            if clock.n > clock.horizon:
                self.sweep(p, backend)
            t = clock.last_step + 1
            clock.append(t, lr, wd)
            hist, qpow, base, epoch, window = clock.op_args(p.device if _device_tables(backend) else None)
            fns.sparse_adamw_(
                p.data,
                idx,
                vals,
                st["exp_avg"],
                st["exp_avg_sq"],
                st["step"],
                st["last_step"],
                hist,
                qpow,
                hyper,
                base,
                epoch,
                window,
                True,
                **extra,
            )
        else:
            empty = torch.empty(0, dtype=torch.float64, device=p.device)
            fns.sparse_adamw_(
                p.data,
                idx,
                vals,
                st["exp_avg"],
                st["exp_avg_sq"],
                st["step"],
                torch.empty(0, dtype=torch.int64, device=p.device),
                empty,
                empty,
                hyper,
                0,
                1,
                0,
                False,
                **extra,
            )
        if err is not None:
            err.arm()
        return sums

    def _every_row(self, p: torch.Tensor) -> torch.Tensor:
        entry = self._arange.get(id(p))
        if entry is None or entry[0]() is not p or entry[1].device != p.device:
            entry = self._arange[id(p)] = (weakref.ref(p), torch.arange(p.shape[0], device=p.device))
        return entry[1]

    def _device_hyper(self, p: torch.Tensor, row: tuple) -> torch.Tensor:
        """The hyperparameter row of a capturable step, on p's device (the ops read it there, so a
        replayed graph reads the current values): one tensor per parameter, written only when a
        number in it changes (from pinned memory, without blocking); a device tensor entry (a
        tensor lr) is copied into its column on the device at every step, never read on the host."""
        entry = self._hyper.get(id(p))
        if entry is None or entry[0]() is not p or entry[1].device != p.device:
            entry = self._hyper[id(p)] = [
                weakref.ref(p),
                torch.zeros(1, len(row), dtype=torch.float64, device=p.device),
                None,
            ]
        numbers = tuple(None if _on_device(x) else float(x) for x in row)
        if numbers != entry[2]:
            host = _hyper_row(tuple(0.0 if x is None else x for x in numbers))
            if p.device.type == "cuda":
                host = host.pin_memory()
            entry[1].copy_(host, non_blocking=True)
            entry[2] = numbers
        for i, x in enumerate(row):
            if numbers[i] is None:
                entry[1][0, i].copy_(x.reshape(()))
        return entry[1]

    def sweep(self, p: torch.Tensor, backend: str) -> None:
        """Bounds the history: every row is brought current and the history restarts at the
        current step (once every ``horizon`` steps, before a step appends to a full history, so
        after step() has raised any pending error; rows already current only read their last
        step). No host read: which rows are behind is decided on the device."""
        self.flush_param(p, backend)

    def catchup_rows(self, p: torch.Tensor, rows: torch.Tensor, backend: str, coalesced: bool = False) -> None:
        """Brings ``rows`` of ``p`` current (``coalesced``: they are sorted and distinct, so the GPU
        ops skip their sort)."""
        st = self.opt.state[p]
        clock = st["row_clock"]
        hist, qpow, base, epoch, window = clock.op_args(p.device if _device_tables(backend) else None)
        extra = {}
        err = self._error_for(p, backend)
        if err is not None:
            extra["error"] = err.word
        flags = (SPARSE_RING if isinstance(clock, RingClock) else 0) | (
            SPARSE_COALESCED if coalesced and _device_tables(backend) else 0
        )
        if flags:
            extra["flags"] = flags
        _backend_ops(backend).sparse_catchup_(
            p.data,
            rows,
            st["exp_avg"],
            st["exp_avg_sq"],
            st["step"],
            st["last_step"],
            hist,
            qpow,
            clock.hyper(),
            base,
            epoch,
            window,
            **extra,
        )
        if err is not None:
            err.arm()

    def flush_param(self, p: torch.Tensor, backend: str | None = None) -> None:
        st = self.opt.state.get(p, {})
        if "row_clock" not in st:
            return
        clock = st["row_clock"]
        if isinstance(clock, RowClock) and clock.n == 1:
            return  # nothing stepped since the clock (re)started: every row is current
        backend = backend or self.opt._backend_for(p.device)[0]
        self.catchup_rows(p, self._every_row(p), backend, coalesced=True)
        if isinstance(clock, RowClock):
            clock.reset(clock.last_step)  # (a RingClock's history goes on: its base is fixed)

    def drop(self, p: torch.Tensor) -> None:
        for key in ROW_KEYS:
            self.opt.state[p].pop(key, None)

    def catch_up(self, param: torch.Tensor, ids: torch.Tensor) -> None:
        st = self.opt.state.get(param)
        if not st or "row_clock" not in st:
            return
        ids = ids.reshape(-1)
        if ids.dtype != torch.int64:
            ids = ids.to(torch.int64)
        if ids.device != param.device:
            ids = ids.to(param.device, non_blocking=True)
        backend = self.opt._backend_for(param.device)[0]
        if self.checks_on_host(backend) and _device_tables(backend) and ids.numel():
            lo, hi = (int(x) for x in torch.aminmax(ids))
            if lo < 0 or hi >= param.shape[0]:
                raise ValueError(f"{self._name(param)}: catch_up ids span [{lo}, {hi}], outside [0, {param.shape[0]})")
        self.catchup_rows(param, ids, backend)


def _backend_ops(backend: str):
    from . import _backend

    return _backend.ops(backend)


@_host_tables
def _hyper_row(row: tuple) -> torch.Tensor:
    """The [1, 6] fp64 hyperparameter row of a sparse step, on the host for every backend: the
    CUDA op passes its values to the kernels by value and the Triton op builds its coefficients
    on the device from them, so no copy to the device (and no host read) is needed."""
    return torch.tensor([row], dtype=torch.float64)
