"""Hyperparameter transfer from LR sweeps: optimal learning rates, their scaling laws, and the
three transfer metrics. The formulas are in docs/transfer.md; this module is their reference.

Input is a sweep table, one training run per row (CSV, or a list of dicts / dict of columns):

=============  ========  ===================================================================
column         required  meaning
=============  ========  ===================================================================
``N``          yes       model size (parameters)
``D``          yes       training tokens
``seed``       yes       run seed (the bootstrap resamples seeds)
``loss``       yes       final loss; ``nan``/``inf`` (diverged) rows are dropped
``lr``         one LR    the swept base LR, or per-role ``lr_embedding``, ``lr_hidden``,
               column    ``lr_output``, ``lr_vector`` (the first present, in that order
                         after ``lr``, is the swept one unless ``lr_col`` says otherwise)
``eff_lr``     no        effective LR recorded by telemetry, ||dW||/||W|| (or
                         ``eff_lr_<role>``): fits are repeated with it as the x variable
``param``      no        parametrization name (``mup``, ``lv``, ``sp``...); default
                         ``default``. Fits are per parametrization.
``width``      no        model width (kept for grouping and in the outputs)
=============  ========  ===================================================================

A *configuration* is one (param, N, D, width); its rows differ in LR and seed.

Only numpy is imported at module import; SciPy and matplotlib are imported by the functions
that need them, so ``import lvopt.transfer`` stays cheap.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

ROLES = ("embedding", "hidden", "output", "vector")
REQUIRED = ("N", "D", "seed", "loss")
VARIABLES = ("N", "D")

__all__ = ["load_sweep", "default_lr_col", "default_eff_col", "Optimum", "optimal_lrs",
           "LRLaw", "fit_lr_law", "curvature_test", "choose_axis", "select_slice",
           "extrapolation_penalty", "LossLaw", "fit_loss_law", "asymptotic_penalty",
           "plot_loss_vs_lr", "plot_lr_law", "plot_loss_laws", "analyze", "main"]


# --------------------------------------------------------------------------- sweep table

def load_sweep(source: str | os.PathLike | list[dict] | dict) -> dict:
    """Reads a sweep into a dict of numpy columns: ``param`` as str, every other column as
    float (empty cells become nan). ``source`` is a CSV path, a list of row dicts, or a dict
    of columns."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{source}: no rows")
        cols = {k.strip(): [r[k] for r in rows] for k in rows[0]}
    elif isinstance(source, dict):
        cols = dict(source)
    else:
        rows = list(source)
        if not rows:
            raise ValueError("empty sweep")
        cols = {k: [r[k] for r in rows] for k in rows[0]}
    n = len(next(iter(cols.values())))
    out = {}
    for k, v in cols.items():
        if k == "param":
            out[k] = np.asarray([str(x) for x in v], dtype=object)
        else:
            out[k] = np.asarray([float(x) if str(x).strip() != "" else math.nan for x in v],
                                dtype=np.float64)
    out.setdefault("param", np.asarray(["default"] * n, dtype=object))
    out.setdefault("width", np.full(n, math.nan))
    missing = [c for c in REQUIRED if c not in out]
    if missing:
        raise ValueError(f"sweep lacks required column(s) {missing}; see lvopt.transfer's docstring")
    default_lr_col(out)
    keep = np.isfinite(out["loss"])
    return {k: v[keep] for k, v in out.items()}


def _as_sweep(x) -> dict:
    """``x`` itself when it is already a loaded sweep (all numpy columns, ``param`` and
    ``width`` present), else ``load_sweep(x)``."""
    if isinstance(x, dict) and all(isinstance(v, np.ndarray) for v in x.values()) \
            and "param" in x and "width" in x:
        return x
    return load_sweep(x)


def default_lr_col(sweep: dict) -> str:
    for c in ("lr",) + tuple(f"lr_{r}" for r in ROLES):
        if c in sweep:
            return c
    raise ValueError("sweep has no LR column (lr or lr_<role>)")


def default_eff_col(sweep: dict) -> str | None:
    for c in ("eff_lr",) + tuple(f"eff_lr_{r}" for r in ROLES):
        if c in sweep and np.all(np.isfinite(sweep[c])) and np.all(sweep[c] > 0):
            return c
    return None


def _configs(sweep):
    """Groups row indices by configuration (param, N, D, width), in a stable order."""
    w = np.where(np.isfinite(sweep["width"]), sweep["width"], -1.0)
    keys = {}
    for i, k in enumerate(zip(sweep["param"], sweep["N"], sweep["D"], w)):
        keys.setdefault(k, []).append(i)
    return sorted(((k, np.asarray(v)) for k, v in keys.items()),
                  key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3]))


# --------------------------------------------------------------------------- optimal LR

@dataclass
class Optimum:
    """The optimal x (an LR column) of one configuration. With u = ln x, the loss near the
    optimum is fitted as L(u) = L* + c·(u − u*)², so ``curvature`` is c (loss per ln² unit)."""

    param: str
    N: float
    D: float
    width: float
    x_col: str
    log_x: float          # u* = ln x*
    x: float              # x*
    ci: tuple             # bootstrap percentile interval of x*
    se_log: float         # bootstrap standard deviation of u*
    curvature: float      # c
    loss: float           # L*
    loss_se: float        # bootstrap standard deviation of L*
    n_seeds: int
    n_rows: int
    n_boot: int           # bootstrap fits with c > 0 (the others have no minimum)
    edge: bool            # the lowest mean loss is at the end of the LR grid: not bracketed
    ok: bool              # c > 0 on the full data
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


def optimal_lrs(sweep: dict | list[dict] | str, x_col: str | None = None, lr_col: str | None = None,
                half_width: int = 2, n_boot: int = 200, conf: float = 0.95, seed: int = 0) -> list[Optimum]:
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
        groups = [np.flatnonzero(seeds == s) for s in useeds] if len(useeds) > 1 \
            else [np.asarray([i]) for i in range(len(idx))]
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
                roles[r] = float(ratio.mean() * math.exp(ustar))   # swept with x: scales with x*
            elif np.ptp(v) <= 1e-12 * abs(v.mean()):
                roles[r] = float(v.mean())                         # held fixed
            else:
                roles[r] = None                                   # varied independently
        out.append(Optimum(str(param), float(N), float(D), float(w) if w >= 0 else math.nan,
                           x_col, ustar, math.exp(ustar), ci, se_log, c, lstar, loss_se,
                           len(useeds), len(idx), len(bu), bool(edge), bool(ok), roles))
    return out


# --------------------------------------------------------------------------- LR scaling laws

def _tq(conf, dof):
    from scipy import stats
    return float(stats.t.ppf(0.5 + conf / 2, dof)) if dof > 0 else math.inf


@dataclass
class LRLaw:
    """ln x*(N, D) = β·f(u, v) with u = ln(N/N_ref), v = ln(D/D_ref); f is [1, u, v]
    (``linear``) or [1, u, v, u², v²] (``quadratic``, plus u·v with ``cross``), restricted
    to ``variables``. Ordinary least squares over configurations; intervals are Student-t."""

    x_col: str
    kind: str
    variables: tuple
    refs: dict
    names: list
    coef: np.ndarray
    cov: np.ndarray
    dof: int
    sigma: float
    r2: float
    loso: float           # leave-one-scale-out RMS error of ln x*
    loso_n: int           # held-out predictions behind ``loso``
    conf: float
    N: np.ndarray
    D: np.ndarray
    y: np.ndarray
    cross: bool = False

    @property
    def ci(self) -> dict:
        t = _tq(self.conf, self.dof)
        se = np.sqrt(np.diag(self.cov))
        return {n: (float(b - t * s), float(b + t * s)) for n, b, s in zip(self.names, self.coef, se)}

    def design(self, N: float | np.ndarray, D: float | np.ndarray) -> np.ndarray:
        return _design(np.atleast_1d(np.asarray(N, float)), np.atleast_1d(np.asarray(D, float)),
                       self.kind, self.variables, self.refs, self.cross)[0]

    def predict(self, N: float, D: float, conf: float | None = None) -> dict:
        """Point, confidence interval of the law's mean and prediction interval of one new
        configuration's x*, at (N, D)."""
        conf = self.conf if conf is None else conf
        X = self.design(N, D)
        m = X @ self.coef
        se_mean = np.sqrt(np.einsum("ij,jk,ik->i", X, self.cov, X))
        se_pred = np.sqrt(se_mean ** 2 + self.sigma ** 2)
        t = _tq(conf, self.dof)
        one = np.ndim(N) == 0 and np.ndim(D) == 0
        f = (lambda a: float(a[0])) if one else (lambda a: a)
        return {"log_x": f(m), "x": f(np.exp(m)), "se_mean": f(se_mean), "se_pred": f(se_pred),
                "ci": (f(np.exp(m - t * se_mean)), f(np.exp(m + t * se_mean))),
                "pi": (f(np.exp(m - t * se_pred)), f(np.exp(m + t * se_pred)))}

    def summary(self) -> dict:
        return {"x_col": self.x_col, "kind": self.kind, "variables": list(self.variables),
                "refs": self.refs, "coef": dict(zip(self.names, map(float, self.coef))),
                "ci": self.ci, "dof": self.dof, "sigma": self.sigma, "r2": self.r2,
                "loso": self.loso, "loso_n": self.loso_n, "n_configs": int(len(self.y))}


def _design(N, D, kind, variables, refs, cross=False):
    cols, names = [np.ones_like(N)], ["c0"]
    logs = {"N": np.log(N / refs["N"]), "D": np.log(D / refs["D"])}
    for v in variables:
        cols.append(logs[v])
        names.append("c" + v)
    if kind == "quadratic":
        for v in variables:
            cols.append(logs[v] ** 2)
            names.append("q" + v)
        if cross and len(variables) == 2:
            cols.append(logs["N"] * logs["D"])
            names.append("qND")
    elif kind != "linear":
        raise ValueError(f"kind must be 'linear' or 'quadratic', not {kind!r}")
    return np.column_stack(cols), names


def _identified(N, D, kind, variables, n_coef):
    need = 3 if kind == "quadratic" else 2
    vals = {"N": N, "D": D}
    return len(N) >= n_coef and all(len(np.unique(vals[v])) >= need for v in variables)


def _ols(X, y):
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return coef


def fit_lr_law(optima: list[Optimum], kind: str = "linear", variables: list[str] | tuple[str, ...] | None = None,
               refs: dict | None = None, conf: float = 0.95, cross: bool = False,
               include_unusable: bool = False) -> LRLaw:
    """Fits the optimal-LR law over configurations (one parametrization and one x column).
    ``variables`` defaults to those of N and D that take two or more values. Configurations
    whose optimum is not bracketed by the grid (``edge``) or has no minimum are left out
    unless ``include_unusable``."""
    opts = [o for o in optima if include_unusable or o.usable]
    if not opts:
        raise ValueError("no usable optima")
    if len({(o.param, o.x_col) for o in opts}) != 1:
        raise ValueError("fit one parametrization and one x column at a time")
    N = np.array([o.N for o in opts])
    D = np.array([o.D for o in opts])
    y = np.array([o.log_x for o in opts])
    if variables is None:
        variables = tuple(v for v, a in (("N", N), ("D", D)) if len(np.unique(a)) >= 2)
    variables = tuple(variables)
    refs = dict(refs or {})
    refs.setdefault("N", float(np.exp(np.log(N).mean())))
    refs.setdefault("D", float(np.exp(np.log(D).mean())))
    X, names = _design(N, D, kind, variables, refs, cross)
    p = X.shape[1]
    if not _identified(N, D, kind, variables, p):
        raise ValueError(f"{kind} law in {variables} is not identified by {len(y)} configurations")
    coef = _ols(X, y)
    resid = y - X @ coef
    dof = len(y) - p
    rss = float(resid @ resid)
    sigma = math.sqrt(rss / dof) if dof > 0 else math.nan
    cov = sigma ** 2 * np.linalg.pinv(X.T @ X) if dof > 0 else np.full((p, p), math.inf)
    tss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - rss / tss if tss > 0 else math.nan
    # leave-one-scale-out: hold out every configuration at one value of one modelled variable
    # (where the rest still identify the law), predict it, pool per-scale mean squared errors
    errs = []
    vals = {"N": N, "D": D}
    for v in variables:
        for s in np.unique(vals[v]):
            tr = vals[v] != s
            if not _identified(N[tr], D[tr], kind, variables, p + 1):
                continue
            b = _ols(X[tr], y[tr])
            errs.append(float(np.mean((X[~tr] @ b - y[~tr]) ** 2)))
    loso = math.sqrt(np.mean(errs)) if errs else math.nan
    return LRLaw(opts[0].x_col, kind, variables, refs, names, coef, cov, dof, sigma, r2, loso,
                 len(errs), conf, N, D, y, cross)


def curvature_test(linear: LRLaw, quadratic: LRLaw) -> dict:
    """Is the quadratic law needed? The F test of the nested linear law, and whether any
    quadratic coefficient's interval excludes 0."""
    from scipy import stats
    rss_l = linear.sigma ** 2 * linear.dof
    rss_q = quadratic.sigma ** 2 * quadratic.dof
    dp = linear.dof - quadratic.dof
    if quadratic.dof <= 0 or dp <= 0:
        return {"F": math.nan, "p": math.nan, "curved": False, "excludes_zero": []}
    F = ((rss_l - rss_q) / dp) / (rss_q / quadratic.dof) if rss_q > 0 else math.inf
    p = float(stats.f.sf(F, dp, quadratic.dof))
    ci = quadratic.ci
    excl = [n for n in quadratic.names if n.startswith("q") and (ci[n][0] > 0 or ci[n][1] < 0)]
    return {"F": float(F), "p": p, "curved": bool(excl), "excludes_zero": excl}


def choose_axis(optima: list[Optimum], N: float, D: float, tol: float = 0.01) -> str:
    """Which way to extrapolate to (N, D): along ``"N"`` (a law in N fitted at the sweep D
    nearest the target's) when D is inside the sweep's D range and N is not, along ``"D"``
    in the opposite case, and with the joint law ``"ND"`` otherwise. A variable the sweep
    does not vary is never fitted (the target then inherits the sweep's value of it)."""
    Ns = np.array([o.N for o in optima])
    Ds = np.array([o.D for o in optima])
    varies = {"N": len(np.unique(Ns)) >= 2, "D": len(np.unique(Ds)) >= 2}

    def inside(a, x):
        return math.log(a.min()) - tol <= math.log(x) <= math.log(a.max()) + tol

    if not varies["D"]:
        return "N"
    if not varies["N"]:
        return "D"
    inN, inD = inside(Ns, N), inside(Ds, D)
    if inD and not inN:
        return "N"
    if inN and not inD:
        return "D"
    return "ND"


def select_slice(optima: list[Optimum], fixed: str, value: float) -> list[Optimum]:
    """The optima at the sweep value of ``fixed`` ("N" or "D") nearest ``value`` in log."""
    vals = np.unique([getattr(o, fixed) for o in optima])
    near = vals[np.argmin(np.abs(np.log(vals) - math.log(value)))]
    return [o for o in optima if getattr(o, fixed) == near]


def _law_for_axis(optima, axis, N, D, kind, conf, refs=None):
    if axis == "ND":
        return fit_lr_law(optima, kind, ("N", "D"), refs, conf)
    other = "D" if axis == "N" else "N"
    return fit_lr_law(select_slice(optima, other, N if other == "N" else D), kind, (axis,),
                      refs, conf)


# --------------------------------------------------------------------------- metrics

def extrapolation_penalty(law: LRLaw, optima: list[Optimum], N: float, D: float,
                          conf: float | None = None) -> dict:
    """Robustness to extrapolation error. With u = ln x, L(u) ≈ L* + c·(u − u*)², an
    extrapolated optimum with error e costs E[c·e²] = c·E[e²] in loss. ``penalty`` uses the
    law's prediction variance at the target (E[e²] = se_pred²), ``penalty_loso`` the
    leave-one-scale-out error (E[e²] = LOSO²); c is the fitted curvature of the sweep
    configuration nearest the target in (ln N, ln D)."""
    pred = law.predict(N, D, conf)
    usable = [o for o in optima if o.usable and o.param == optima[0].param]
    d = [math.hypot(math.log(o.N / N), math.log(o.D / D)) for o in usable]
    near = usable[int(np.argmin(d))]
    c = near.curvature
    return {"curvature": c, "curvature_at": {"N": near.N, "D": near.D},
            "se_pred": pred["se_pred"], "penalty": c * pred["se_pred"] ** 2,
            "loso": law.loso, "penalty_loso": c * law.loso ** 2 if math.isfinite(law.loso) else math.nan,
            "penalty_per_factor2": c * math.log(2) ** 2}


@dataclass
class LossLaw:
    """L*(s) = E + A·(s/s_ref)^(−α) over the optimal losses of one parametrization, s = N or
    D at a fixed value of the other, fitted with scipy.optimize.curve_fit."""

    param: str
    var: str
    ref: float
    E: float
    A: float
    alpha: float
    cov: np.ndarray
    dof: int
    conf: float
    s: np.ndarray
    L: np.ndarray

    def __call__(self, s: float | np.ndarray) -> np.ndarray:
        return self.E + self.A * (np.asarray(s, float) / self.ref) ** (-self.alpha)

    @property
    def ci(self) -> dict:
        t = _tq(self.conf, self.dof)
        se = np.sqrt(np.diag(self.cov))
        return {n: (float(b - t * e), float(b + t * e))
                for n, b, e in zip(("E", "A", "alpha"), (self.E, self.A, self.alpha), se)}

    def summary(self) -> dict:
        return {"param": self.param, "var": self.var, "ref": self.ref, "E": self.E, "A": self.A,
                "alpha": self.alpha, "ci": self.ci, "dof": self.dof, "n": int(len(self.s))}


def fit_loss_law(optima: list[Optimum], var: str = "N", fixed: float | None = None,
                 conf: float = 0.95) -> LossLaw:
    """Fits L*(var) for one parametrization, at the sweep value of the other variable nearest
    ``fixed`` (default: its largest)."""
    from scipy.optimize import curve_fit
    other = "D" if var == "N" else "N"
    opts = [o for o in optima if o.usable]
    if len({o.param for o in opts}) != 1:
        raise ValueError("fit one parametrization at a time")
    if fixed is None:
        fixed = max(getattr(o, other) for o in opts)
    opts = select_slice(opts, other, fixed)
    s = np.array([getattr(o, var) for o in opts])
    L = np.array([o.loss for o in opts])
    if len(np.unique(s)) < 4:
        raise ValueError(f"a loss law in {var} needs 4 or more scales, got {len(np.unique(s))}")
    ref = float(np.exp(np.log(s).mean()))
    x = s / ref

    def f(x, E, A, a):
        return E + A * x ** (-a)

    p0 = (max(L.min() - 0.5 * np.ptp(L), 0.0), max(np.ptp(L), 1e-6), 0.3)
    popt, pcov = curve_fit(f, x, L, p0=p0, bounds=([0.0, 0.0, 1e-3], [np.inf, np.inf, 3.0]),
                           method="trf", maxfev=20000)
    return LossLaw(opts[0].param, var, ref, float(popt[0]), float(popt[1]), float(popt[2]),
                   pcov, len(s) - 3, conf, s, L)


def asymptotic_penalty(laws: dict[str, LossLaw], reference: str | None = None, at: float | None = None,
                       conf: float = 0.95) -> dict:
    """Asymptotic loss penalty of each parametrization against ``reference`` (default: the
    lowest E): ΔE = E_p − E_ref, with interval ±t·sqrt(var E_p + var E_ref) (independent fits,
    t at the smaller dof); with ``at``, also the finite-scale gap L_p(at) − L_ref(at)."""
    if reference is None:
        reference = min(laws, key=lambda k: laws[k].E)
    ref = laws[reference]
    out = {}
    for name, law in laws.items():
        d = law.E - ref.E
        se = 0.0 if name == reference else math.sqrt(law.cov[0, 0] + ref.cov[0, 0])
        t = _tq(conf, min(law.dof, ref.dof))
        out[name] = {"reference": reference, "dE": d, "ci": (d - t * se, d + t * se)}
        if at is not None:
            out[name]["dL_at"] = float(law(at) - ref(at))
            out[name]["at"] = float(at)
    return out


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss_vs_lr(sweep: dict, optima: list[Optimum], path: str | os.PathLike, x_col: str | None = None,
                    half_width: int = 2) -> str | os.PathLike:
    """Loss against LR for every configuration of one parametrization (panels by D, colours
    by N): seed means, the fitted quadratic over its window, the optimum and its interval."""
    plt = _plt()
    x_col = x_col or optima[0].x_col
    param = optima[0].param
    Ds = sorted({o.D for o in optima})
    fig, axes = plt.subplots(1, len(Ds), figsize=(4.5 * len(Ds), 3.6), squeeze=False)
    Ns = sorted({o.N for o in optima})
    cmap = plt.get_cmap("viridis")
    sel_p = sweep["param"] == param
    for ax, D in zip(axes[0], Ds):
        for o in (o for o in optima if o.D == D):
            col = cmap(Ns.index(o.N) / max(len(Ns) - 1, 1))
            m = sel_p & (sweep["N"] == o.N) & (sweep["D"] == D)
            x, y = sweep[x_col][m], sweep["loss"][m]
            ax.scatter(x, y, s=6, color=col, alpha=0.35)
            if o.ok:
                u = np.linspace(o.log_x - 1.5, o.log_x + 1.5, 50)
                ax.plot(np.exp(u), o.loss + o.curvature * (u - o.log_x) ** 2, color=col, lw=1.2,
                        label=f"N={o.N:.3g}")
                ax.plot([o.x], [o.loss], "o", color=col, mec="k", ms=5)
                if all(map(math.isfinite, o.ci)):
                    ax.hlines(o.loss, o.ci[0], o.ci[1], color=col, lw=3, alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(x_col)
        ax.set_ylabel("final loss")
        ax.set_title(f"{param}, D={D:.3g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_lr_law(laws: list[LRLaw], optima: list[Optimum], path: str | os.PathLike,
                target: dict[str, float] | None = None) -> str | os.PathLike:
    """Optimal LR against N (or D when N is fixed) with the fitted laws, and the target's
    extrapolation with its prediction interval."""
    plt = _plt()
    opts = [o for o in optima if o.usable]
    var = laws[0].variables[0]
    other = "D" if var == "N" else "N"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    svals = np.array([getattr(o, var) for o in opts])
    hi = max(svals.max(), target[var] if target else 0)
    grid = np.exp(np.linspace(math.log(svals.min()), math.log(hi), 60))
    cmap = plt.get_cmap("plasma")
    others = sorted({getattr(o, other) for o in opts})
    for j, ov in enumerate(others):
        col = cmap(j / max(len(others), 1))
        sub = [o for o in opts if getattr(o, other) == ov]
        xs = [getattr(o, var) for o in sub]
        lo = [o.x - o.ci[0] for o in sub]
        up = [o.ci[1] - o.x for o in sub]
        ax.errorbar(xs, [o.x for o in sub], yerr=[lo, up], fmt="o", color=col, ms=4,
                    label=f"{other}={ov:.3g}")
        for law, ls in zip(laws, ("--", "-", ":")):
            if var not in law.variables:
                continue
            if other in law.variables or np.all(getattr(law, other) == ov):
                NN, DD = (grid, np.full_like(grid, ov)) if var == "N" else (np.full_like(grid, ov), grid)
                ax.plot(grid, law.predict(NN, DD)["x"], ls, color=col, lw=1)
    if target:
        for law, ls in zip(laws, ("--", "-", ":")):
            p = law.predict(target["N"], target["D"])
            ax.errorbar([target[var]], [p["x"]], yerr=[[p["x"] - p["pi"][0]], [p["pi"][1] - p["x"]]],
                        fmt="s", color="k", mfc="none", capsize=3, label=f"target ({law.kind})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(var)
    ax.set_ylabel(f"optimal {laws[0].x_col}")
    ax.set_title(f"{opts[0].param}: optimal {laws[0].x_col} (-- linear, - quadratic)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_loss_laws(loss_laws: dict[str, LossLaw], path: str | os.PathLike) -> str | os.PathLike:
    """Optimal loss against scale per parametrization, with the fitted E + A·s^(−α)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, law in loss_laws.items():
        line = ax.plot(law.s, law.L, "o", ms=4, label=f"{name}: E={law.E:.3g}, α={law.alpha:.2g}")[0]
        g = np.exp(np.linspace(math.log(law.s.min()), math.log(law.s.max()) + 2, 60))
        ax.plot(g, law(g), "-", color=line.get_color(), lw=1)
        ax.axhline(law.E, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(next(iter(loss_laws.values())).var)
    ax.set_ylabel("optimal loss L*")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- analysis + CLI

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def analyze(sweep: dict | list[dict] | str, target: dict[str, float] | None = None, axis: str = "auto",
            lr_col: str | None = None, eff_col: str | None = "auto", half_width: int = 2, n_boot: int = 200,
            conf: float = 0.95, seed: int = 0, loss_var: str = "N", out_dir: str | os.PathLike | None = None,
            plots: bool = True) -> dict:
    """Everything the CLI reports, as a JSON-able dict; with ``out_dir``, also writes
    ``summary.json``, ``optima.csv`` and (``plots``) PNGs there."""
    sweep = _as_sweep(sweep)
    lr_col = lr_col or default_lr_col(sweep)
    eff_col = default_eff_col(sweep) if eff_col == "auto" else eff_col
    x_cols = [lr_col] + ([eff_col] if eff_col else [])
    params = sorted(set(sweep["param"]))
    res = {"lr_col": lr_col, "eff_col": eff_col, "conf": conf, "params": {}, "files": []}
    all_optima, png = [], []
    loss_laws = {}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    for p in params:
        sub = {k: v[sweep["param"] == p] for k, v in sweep.items()}
        pres = {}
        for xc in x_cols:
            opts = optimal_lrs(sub, xc, lr_col, half_width, n_boot, conf, seed)
            all_optima += opts
            usable = [o for o in opts if o.usable]
            entry = {"optima": [asdict(o) for o in opts],
                     "excluded": [{"N": o.N, "D": o.D, "edge": o.edge, "ok": o.ok}
                                  for o in opts if not o.usable], "laws": {}}
            ax_ = axis
            if target is not None and ax_ == "auto":
                ax_ = choose_axis(usable, target["N"], target["D"])
            elif ax_ == "auto":
                ax_ = "".join(v for v in VARIABLES if len({getattr(o, v) for o in usable}) >= 2) or "N"
            entry["axis"] = ax_
            tN = target["N"] if target else max(o.N for o in usable)
            tD = target["D"] if target else max(o.D for o in usable)
            laws = {}
            for kind in ("linear", "quadratic"):
                try:
                    laws[kind] = _law_for_axis(usable, ax_, tN, tD, kind, conf)
                except ValueError as e:
                    entry["laws"][kind] = {"error": str(e)}
                    continue
                entry["laws"][kind] = laws[kind].summary()
                if target:
                    entry["laws"][kind]["target"] = laws[kind].predict(target["N"], target["D"])
                    entry["laws"][kind]["robustness"] = extrapolation_penalty(
                        laws[kind], usable, target["N"], target["D"])
            if len(laws) == 2:
                entry["curvature_test"] = curvature_test(laws["linear"], laws["quadratic"])
            pres[xc] = entry
            if out_dir and plots:
                tag = f"{p}_{xc}"
                png.append(plot_loss_vs_lr(sub, opts, os.path.join(out_dir, f"loss_vs_lr_{tag}.png")))
                if laws:
                    png.append(plot_lr_law(list(laws.values()), usable,
                                           os.path.join(out_dir, f"lr_law_{tag}.png"), target))
        try:
            loss_laws[p] = fit_loss_law([o for o in all_optima if o.param == p and o.x_col == lr_col],
                                        loss_var, target[("D" if loss_var == "N" else "N")] if target else None, conf)
            pres["loss_law"] = loss_laws[p].summary()
        except (ValueError, RuntimeError) as e:
            pres["loss_law"] = {"error": str(e)}
        res["params"][p] = pres
    if len(loss_laws) >= 1:
        res["asymptotic_penalty"] = asymptotic_penalty(loss_laws, at=target[loss_var] if target else None,
                                                       conf=conf)
        if out_dir and plots:
            png.append(plot_loss_laws(loss_laws, os.path.join(out_dir, "loss_law.png")))
    res = _jsonable(res)
    if out_dir:
        path = os.path.join(out_dir, "optima.csv")
        cols = ["param", "x_col", "N", "D", "width", "x", "ci_lo", "ci_hi", "se_log", "curvature",
                "loss", "loss_se", "n_seeds", "n_rows", "n_boot", "edge", "ok"]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for o in all_optima:
                d = asdict(o)
                d["ci_lo"], d["ci_hi"] = o.ci
                w.writerow([d[c] for c in cols])
        res["files"] = [path] + png + [os.path.join(out_dir, "summary.json")]
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


def _parse_target(s):
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in VARIABLES or not v:
            raise argparse.ArgumentTypeError(f"target must look like N=1e9,D=2e10, not {s!r}")
        out[k.strip()] = float(v)
    if set(out) != set(VARIABLES):
        raise argparse.ArgumentTypeError("target needs both N and D")
    return out


def _fmt(x):
    return "nan" if x is None else f"{x:.4g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lvopt transfer", description=(
        "Optimal-LR fits, LR scaling laws and transfer metrics over a sweep CSV "
        "(columns N, D, seed, loss, lr or lr_<role>; optional eff_lr, param, width). "
        "Formulas: docs/transfer.md."))
    ap.add_argument("sweep", help="sweep table (CSV)")
    ap.add_argument("--out", default="transfer_out", help="output directory (default %(default)s)")
    ap.add_argument("--target", type=_parse_target, help="extrapolation target, e.g. N=1e9,D=2e10")
    ap.add_argument("--axis", choices=("auto", "N", "D", "ND"), default="auto",
                    help="extrapolate along N, D or both (auto: the one the target leaves the sweep along)")
    ap.add_argument("--lr-col", help="the swept LR column (default: lr, else the first lr_<role>)")
    ap.add_argument("--eff-col", default="auto", help="effective-LR column, 'none' to skip (default: eff_lr if present)")
    ap.add_argument("--half-width", type=int, default=2, help="grid points each side of the best LR in the quadratic fit")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples over seeds")
    ap.add_argument("--conf", type=float, default=0.95, help="interval level")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    ap.add_argument("--loss-var", choices=VARIABLES, default="N", help="scale variable of the loss law")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = analyze(a.sweep, a.target, a.axis, a.lr_col, None if a.eff_col == "none" else a.eff_col,
                      a.half_width, a.bootstrap, a.conf, a.seed, a.loss_var, a.out, not a.no_plots)
    except (OSError, ValueError) as e:
        print(f"lvopt transfer: {e}", file=sys.stderr)
        return 1
    for p, pres in res["params"].items():
        for xc, e in pres.items():
            if xc == "loss_law":
                continue
            print(f"[{p}] {xc}: {len(e['optima'])} configurations, {len(e['excluded'])} excluded, axis {e['axis']}")
            for kind, law in e["laws"].items():
                if "error" in law:
                    print(f"  {kind}: {law['error']}")
                    continue
                line = f"  {kind}: R2={_fmt(law['r2'])} LOSO={_fmt(law['loso'])} " + \
                       " ".join(f"{k}={_fmt(v)}" for k, v in law["coef"].items())
                if "target" in law:
                    t, r = law["target"], law["robustness"]
                    line += (f" | target {xc}*={_fmt(t['x'])} PI=[{_fmt(t['pi'][0])}, {_fmt(t['pi'][1])}]"
                             f" penalty={_fmt(r['penalty'])}")
                print(line)
            if "curvature_test" in e:
                ct = e["curvature_test"]
                print(f"  curvature: p={_fmt(ct['p'])} curved={ct['curved']}")
    for p, d in res.get("asymptotic_penalty", {}).items():
        print(f"[{p}] asymptotic penalty dE={_fmt(d['dE'])} CI=[{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]"
              f" vs {d['reference']}")
    print(f"wrote {len(res['files'])} files to {a.out}")
    return 0
