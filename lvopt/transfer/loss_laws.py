"""Loss laws: L*(s) = E + A·(s/s_ref)^(−α) over the optimal losses of one parametrization, and
the asymptotic loss penalty between parametrizations (docs/transfer.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .lr_laws import _tq, select_slice
from .optima import Optimum


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
        return {
            n: (float(b - t * e), float(b + t * e))
            for n, b, e in zip(("E", "A", "alpha"), (self.E, self.A, self.alpha), se)
        }

    def summary(self) -> dict:
        return {
            "param": self.param,
            "var": self.var,
            "ref": self.ref,
            "E": self.E,
            "A": self.A,
            "alpha": self.alpha,
            "ci": self.ci,
            "dof": self.dof,
            "n": int(len(self.s)),
        }


def fit_loss_law(optima: list[Optimum], var: str = "N", fixed: float | None = None, conf: float = 0.95) -> LossLaw:
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
    popt, pcov = curve_fit(f, x, L, p0=p0, bounds=([0.0, 0.0, 1e-3], [np.inf, np.inf, 3.0]), method="trf", maxfev=20000)
    return LossLaw(
        opts[0].param, var, ref, float(popt[0]), float(popt[1]), float(popt[2]), pcov, len(s) - 3, conf, s, L
    )


def asymptotic_penalty(
    laws: dict[str, LossLaw], reference: str | None = None, at: float | None = None, conf: float = 0.95
) -> dict:
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
