"""Plots of a transfer analysis (matplotlib, imported when a plot is drawn)."""

from __future__ import annotations

import math
import os

import numpy as np

from .loss_laws import LossLaw
from .lr_laws import LRLaw
from .optima import Optimum


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | os.PathLike) -> str | os.PathLike:
    """Lays ``fig`` out, writes it to ``path`` and closes it (every plot here ends so)."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_loss_vs_lr(
    sweep: dict, optima: list[Optimum], path: str | os.PathLike, x_col: str | None = None, half_width: int = 2
) -> str | os.PathLike:
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
                ax.plot(np.exp(u), o.loss + o.curvature * (u - o.log_x) ** 2, color=col, lw=1.2, label=f"N={o.N:.3g}")
                ax.plot([o.x], [o.loss], "o", color=col, mec="k", ms=5)
                if all(map(math.isfinite, o.ci)):
                    ax.hlines(o.loss, o.ci[0], o.ci[1], color=col, lw=3, alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(x_col)
        ax.set_ylabel("final loss")
        ax.set_title(f"{param}, D={D:.3g}")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_lr_law(
    laws: list[LRLaw], optima: list[Optimum], path: str | os.PathLike, target: dict[str, float] | None = None
) -> str | os.PathLike:
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
        ax.errorbar(xs, [o.x for o in sub], yerr=[lo, up], fmt="o", color=col, ms=4, label=f"{other}={ov:.3g}")
        for law, ls in zip(laws, ("--", "-", ":")):
            if var not in law.variables:
                continue
            if other in law.variables or np.all(getattr(law, other) == ov):
                NN, DD = (grid, np.full_like(grid, ov)) if var == "N" else (np.full_like(grid, ov), grid)
                ax.plot(grid, law.predict(NN, DD)["x"], ls, color=col, lw=1)
    if target:
        for law, ls in zip(laws, ("--", "-", ":")):
            p = law.predict(target["N"], target["D"])
            ax.errorbar(
                [target[var]],
                [p["x"]],
                yerr=[[p["x"] - p["pi"][0]], [p["pi"][1] - p["x"]]],
                fmt="s",
                color="k",
                mfc="none",
                capsize=3,
                label=f"target ({law.kind})",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(var)
    ax.set_ylabel(f"optimal {laws[0].x_col}")
    ax.set_title(f"{opts[0].param}: optimal {laws[0].x_col} (-- linear, - quadratic)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)
