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

import torch

# Columns of the history table (csrc/include/lvopt/math.h, HistCol).
H_LR, H_DECAY, H_LOGPI, H_U, H_SQRTBC2, H_SERIES = 0, 1, 2, 3, 4, 5
HIST_SERIES = 8
HIST_COLS = 13


def check_exact_hyper(beta1: float, beta2: float, lr: float, wd: float, where: str) -> None:
    """Exact mode's closed form needs rho = beta1/sqrt(beta2) < 1 (the skipped steps' updates
    then decay geometrically) and 1 - lr*wd > 0."""
    if not (beta2 > 0.0 and beta1 * beta1 < beta2):
        raise ValueError(f"{where}: sparse_mode='exact' needs beta1**2 < beta2 (so that the updates of "
                         f"skipped steps decay), got betas=({beta1}, {beta2}); use sparse_mode='lazy'")
    if lr * wd >= 1.0:
        raise ValueError(f"{where}: sparse_mode='exact' needs lr*weight_decay < 1, got {lr * wd}")


class RowClock:
    """Per-step history of one exact-mode parameter; see the module docstring."""

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
        self.epoch = max(1, min(max(self.window, 1), int(math.log(1e6) / -math.log(q_min)) if q_min < 1 else self.window))
        self.horizon = max(4096, 8 * (self.window + self.epoch))
        self.horizon -= self.horizon % self.epoch
        e, w = self.epoch, max(self.window, self.epoch)
        ks = torch.arange(-e, w + 1, dtype=torch.float64)
        self.qpow = torch.stack([torch.tensor(q, dtype=torch.float64) ** ks for q in qs]).contiguous()
        self.reset(step)

    def reset(self, step: int) -> None:
        """All rows are current at ``step``: the history restarts there."""
        self._mirror = None
        self.base = int(step)
        self._buf = torch.zeros(256, HIST_COLS, dtype=torch.float64)
        self._buf[0, H_DECAY] = 1.0
        self._buf[0, H_SQRTBC2] = math.sqrt(1.0 - self.beta2 ** self.base)
        self.n = 1
        self._last = self._buf[0].tolist()

    @property
    def last_step(self) -> int:
        return self.base + self.n - 1

    @property
    def hist(self) -> torch.Tensor:
        return self._buf[: self.n]

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
            self._buf = torch.cat([self._buf, torch.zeros_like(self._buf)])
        self._buf[self.n] = torch.tensor(row, dtype=torch.float64)
        self.n += 1
        self._last = row

    def truncate(self, min_last_step: int) -> None:
        """Drops history before the epoch that holds ``min_last_step`` (no row needs it)."""
        nb = self.base + self.epoch * ((min_last_step - self.base) // self.epoch)
        if nb > self.base:
            self._buf = self._buf[nb - self.base:].clone()
            self.n -= nb - self.base
            self.base = nb
            self._mirror = None

    def op_args(self, device: torch.device | str | None = None) -> tuple:
        """(hist, qpow, hist_base, epoch, window) for lvopt::sparse_adamw_ / sparse_catchup_.
        With a non-CPU ``device`` the tables are device copies kept in step with the host ones:
        each call uploads only the history rows appended since the last (one row per step),
        instead of the whole table (up to ``horizon`` x 13 fp64) that the op would otherwise
        copy on every step."""
        if device is None or torch.device(device).type == "cpu":
            return self.hist, self.qpow, self.base, self.epoch, self.window
        hist, qpow = self.device_tables(torch.device(device))
        return hist, qpow, self.base, self.epoch, self.window

    def device_tables(self, device: torch.device) -> tuple:
        """(hist, qpow) on ``device``, updated incrementally (see op_args)."""
        m = self._mirror
        if m is None or m["device"] != device or m["buf"].shape[0] < self.n:
            buf = torch.empty(self._buf.shape, dtype=torch.float64, device=device)
            buf[: self.n].copy_(self._buf[: self.n])
            qpow = m["qpow"] if m is not None and m["device"] == device else self.qpow.to(device)
            m = self._mirror = {"device": device, "buf": buf, "n": self.n, "qpow": qpow}
        elif m["n"] < self.n:
            m["buf"][m["n"]: self.n].copy_(self._buf[m["n"]: self.n])
            m["n"] = self.n
        return m["buf"][: self.n], m["qpow"]

    def hyper(self) -> torch.Tensor:
        """A hyperparameter row carrying this clock's betas and eps (what a catch-up uses)."""
        return torch.tensor([[0.0, self.beta1, self.beta2, 0.0, self.eps, 0.0]], dtype=torch.float64)
