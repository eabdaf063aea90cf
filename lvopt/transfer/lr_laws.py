"""LR scaling laws: ln x*(N, D) fitted over configurations (linear or quadratic in ln N and
ln D), their curvature test, the extrapolation axis, and the extrapolation penalty
(docs/transfer.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .optima import Optimum


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
    loso: float  # leave-one-scale-out RMS error of ln x*
    loso_n: int  # held-out predictions behind ``loso``
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
        return _design(
            np.atleast_1d(np.asarray(N, float)),
            np.atleast_1d(np.asarray(D, float)),
            self.kind,
            self.variables,
            self.refs,
            self.cross,
        )[0]

    def predict(self, N: float, D: float, conf: float | None = None) -> dict:
        """Point, confidence interval of the law's mean and prediction interval of one new
        configuration's x*, at (N, D)."""
        conf = self.conf if conf is None else conf
        X = self.design(N, D)
        m = X @ self.coef
        se_mean = np.sqrt(np.einsum("ij,jk,ik->i", X, self.cov, X))
        se_pred = np.sqrt(se_mean**2 + self.sigma**2)
        t = _tq(conf, self.dof)
        one = np.ndim(N) == 0 and np.ndim(D) == 0
        f = (lambda a: float(a[0])) if one else (lambda a: a)
        return {
            "log_x": f(m),
            "x": f(np.exp(m)),
            "se_mean": f(se_mean),
            "se_pred": f(se_pred),
            "ci": (f(np.exp(m - t * se_mean)), f(np.exp(m + t * se_mean))),
            "pi": (f(np.exp(m - t * se_pred)), f(np.exp(m + t * se_pred))),
        }

    def summary(self) -> dict:
        return {
            "x_col": self.x_col,
            "kind": self.kind,
            "variables": list(self.variables),
            "refs": self.refs,
            "coef": dict(zip(self.names, map(float, self.coef))),
            "ci": self.ci,
            "dof": self.dof,
            "sigma": self.sigma,
            "r2": self.r2,
            "loso": self.loso,
            "loso_n": self.loso_n,
            "n_configs": int(len(self.y)),
        }


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


def fit_lr_law(
    optima: list[Optimum],
    kind: str = "linear",
    variables: list[str] | tuple[str, ...] | None = None,
    refs: dict | None = None,
    conf: float = 0.95,
    cross: bool = False,
    include_unusable: bool = False,
) -> LRLaw:
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
    cov = sigma**2 * np.linalg.pinv(X.T @ X) if dof > 0 else np.full((p, p), math.inf)
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
    return LRLaw(
        opts[0].x_col, kind, variables, refs, names, coef, cov, dof, sigma, r2, loso, len(errs), conf, N, D, y, cross
    )


def curvature_test(linear: LRLaw, quadratic: LRLaw) -> dict:
    """Is the quadratic law needed? The F test of the nested linear law, and whether any
    quadratic coefficient's interval excludes 0."""
    from scipy import stats

    rss_l = linear.sigma**2 * linear.dof
    rss_q = quadratic.sigma**2 * quadratic.dof
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
    return fit_lr_law(select_slice(optima, other, N if other == "N" else D), kind, (axis,), refs, conf)


def extrapolation_penalty(law: LRLaw, optima: list[Optimum], N: float, D: float, conf: float | None = None) -> dict:
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
    return {
        "curvature": c,
        "curvature_at": {"N": near.N, "D": near.D},
        "se_pred": pred["se_pred"],
        "penalty": c * pred["se_pred"] ** 2,
        "loso": law.loso,
        "penalty_loso": c * law.loso**2 if math.isfinite(law.loso) else math.nan,
        "penalty_per_factor2": c * math.log(2) ** 2,
    }
