"""Optimal learning rates: a quadratic fit of loss against ln LR around the best grid point of
every configuration, with a bootstrap over seeds (docs/transfer.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..roles import ROLES
from .sweep import _as_sweep, _configs, default_lr_col


@dataclass
class Optimum:
    """The optimal x (an LR column) of one configuration. With u = ln x, the loss near the
    optimum is fitted as L(u) = L* + c·(u − u*)², so ``curvature`` is c (loss per ln² unit)."""

    param: str
    N: float
    D: float
    width: float
    x_col: str
    log_x: float  # u* = ln x*
    x: float  # x*
    ci: tuple  # bootstrap percentile interval of x*
    se_log: float  # bootstrap standard deviation of u*
    curvature: float  # c
    loss: float  # L*
    loss_se: float  # bootstrap standard deviation of L*
    n_seeds: int
    n_rows: int
    n_boot: int  # bootstrap fits with c > 0 (the others have no minimum)
    edge: bool  # the lowest mean loss is at the end of the LR grid: not bracketed
    ok: bool  # c > 0 on the full data
    roles: dict = field(default_factory=dict)  # optimal per-role LRs implied by x*

    @property
    def usable(self) -> bool:
        return self.ok and not self.edge and math.isfinite(self.log_x)


def _fit_window(grid_x, u, y, half_width):
    """Quadratic least-squares fit of y against u on the rows whose grid value lies within
    ``half_width`` grid points of the grid point with the lowest mean loss (shifted at the
    grid's ends so the window keeps 2·half_width+1 points). Returns (u*, c, L*, edge, ok)."""
    g = np.unique(grid_x)
    k = len(g)
    if k < 3:
        return math.nan, math.nan, math.nan, True, False
    pos = np.searchsorted(g, grid_x)
    means = np.bincount(pos, weights=y, minlength=k) / np.maximum(np.bincount(pos, minlength=k), 1)
    i0 = int(np.argmin(means))
    lo = max(0, min(i0 - half_width, k - 1 - 2 * half_width))
    hi = min(k - 1, lo + 2 * half_width)
    sel = (pos >= lo) & (pos <= hi)
    us, ys = u[sel], y[sel]
    um = us.mean()
    X = np.column_stack([np.ones_like(us), us - um, (us - um) ** 2])
    (a, b, c), *_ = np.linalg.lstsq(X, ys, rcond=None)
    edge = i0 == 0 or i0 == k - 1
    if not c > 0:
        ustar = float(np.mean(u[pos == i0]))
        return ustar, math.nan, float(means[i0]), edge, False
    return float(um - b / (2 * c)), float(c), float(a - b * b / (4 * c)), edge, True


def optimal_lrs(
    sweep: dict | list[dict] | str,
    x_col: str | None = None,
    lr_col: str | None = None,
    half_width: int = 2,
    n_boot: int = 200,
    conf: float = 0.95,
    seed: int = 0,
) -> list[Optimum]:
    """The optimal ``x_col`` (default: the swept LR column) of every configuration.

    The fit window is chosen on the swept LR grid (``lr_col``), so an effective-LR column,
    which varies a little between seeds at one grid point, is windowed like its raw LR.
    The interval resamples seeds with replacement (rows of a seed stay together); with one
    seed it resamples rows. Each resample re-selects its window."""
    sweep = _as_sweep(sweep)
    lr_col = lr_col or default_lr_col(sweep)
    x_col = x_col or lr_col
    rng = np.random.default_rng(seed)
    out = []
    for (param, N, D, w), idx in _configs(sweep):
        grid = sweep[lr_col][idx]
        u = np.log(sweep[x_col][idx])
        y = sweep["loss"][idx]
        seeds = sweep["seed"][idx]
        ustar, c, lstar, edge, ok = _fit_window(grid, u, y, half_width)
        useeds = np.unique(seeds)
        groups = (
            [np.flatnonzero(seeds == s) for s in useeds]
            if len(useeds) > 1
            else [np.asarray([i]) for i in range(len(idx))]
        )
        bu, bl = [], []
        for _ in range(n_boot):
            pick = np.concatenate([groups[j] for j in rng.integers(len(groups), size=len(groups))])
            bu_, bc_, bl_, _, bok = _fit_window(grid[pick], u[pick], y[pick], half_width)
            if bok:
                bu.append(bu_)
                bl.append(bl_)
        bu, bl = np.asarray(bu), np.asarray(bl)
        if len(bu) >= 2:
            # resampling G groups underestimates the variance by (G-1)/G; widen the percentile
            # interval about u* by sqrt(G/(G-1)) (with 3 seeds the plain one covers ~75% at 95%)
            g = len(groups)
            q = ustar + (np.quantile(bu, [(1 - conf) / 2, (1 + conf) / 2]) - ustar) * math.sqrt(g / (g - 1))
            ci = (float(np.exp(q[0])), float(np.exp(q[1])))
            se_log = float(bu.std(ddof=1)) * math.sqrt(g / (g - 1))
            loss_se = float(bl.std(ddof=1)) * math.sqrt(g / (g - 1))
        else:
            ci, se_log, loss_se = (math.nan, math.nan), math.nan, math.nan
        roles = {}
        xr = sweep[x_col][idx]
        for r in ROLES:
            col = f"lr_{r}"
            if col not in sweep or col == x_col:
                continue
            v = sweep[col][idx]
            ratio = v / xr
            if np.all(np.isfinite(ratio)) and np.ptp(ratio) <= 1e-6 * abs(ratio.mean()):
                roles[r] = float(ratio.mean() * math.exp(ustar))  # swept with x: scales with x*
            elif np.ptp(v) <= 1e-12 * abs(v.mean()):
                roles[r] = float(v.mean())  # held fixed
            else:
                roles[r] = None  # varied independently
        out.append(
            Optimum(
                str(param),
                float(N),
                float(D),
                float(w) if w >= 0 else math.nan,
                x_col,
                ustar,
                math.exp(ustar),
                ci,
                se_log,
                c,
                lstar,
                loss_se,
                len(useeds),
                len(idx),
                len(bu),
                bool(edge),
                bool(ok),
                roles,
            )
        )
    return out
