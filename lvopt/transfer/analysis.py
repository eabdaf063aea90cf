"""The whole analysis of a sweep, as the CLI reports it: optima, LR laws and metrics per
parametrization and x column, loss laws, and the files written (docs/transfer.md)."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict

import numpy as np

from .loss_laws import asymptotic_penalty, fit_loss_law
from .lr_laws import _law_for_axis, choose_axis, curvature_test, extrapolation_penalty
from .optima import optimal_lrs
from .plots import plot_loss_laws, plot_loss_vs_lr, plot_lr_law
from .sweep import VARIABLES, _as_sweep, default_eff_col, default_lr_col


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


def analyze(
    sweep: dict | list[dict] | str,
    target: dict[str, float] | None = None,
    axis: str = "auto",
    lr_col: str | None = None,
    eff_col: str | None = "auto",
    half_width: int = 2,
    n_boot: int = 200,
    conf: float = 0.95,
    seed: int = 0,
    loss_var: str = "N",
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
) -> dict:
    """Everything the CLI reports, as a JSON-able dict; with ``out_dir``, also writes
    ``summary.json``, ``optima.csv`` and (``plots``) PNGs there."""
    sweep = _as_sweep(sweep)
    lr_col = lr_col or default_lr_col(sweep)
    eff_col = default_eff_col(sweep) if eff_col == "auto" else eff_col
    x_cols = [lr_col] + ([eff_col] if eff_col else [])
    res = {"lr_col": lr_col, "eff_col": eff_col, "conf": conf, "params": {}, "files": []}
    all_optima, png = [], []
    loss_laws = {}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    for p in sorted(set(sweep["param"])):
        sub = {k: v[sweep["param"] == p] for k, v in sweep.items()}
        pres = {}
        for xc in x_cols:
            opts = optimal_lrs(sub, xc, lr_col, half_width, n_boot, conf, seed)
            all_optima += opts
            usable = [o for o in opts if o.usable]
            pres[xc], laws = _laws_entry(opts, usable, axis, target, conf)
            if out_dir and plots:
                tag = f"{p}_{xc}"
                png.append(plot_loss_vs_lr(sub, opts, os.path.join(out_dir, f"loss_vs_lr_{tag}.png")))
                if laws:
                    png.append(
                        plot_lr_law(list(laws.values()), usable, os.path.join(out_dir, f"lr_law_{tag}.png"), target)
                    )
        pres["loss_law"] = _loss_law_entry(
            [o for o in all_optima if o.param == p and o.x_col == lr_col], loss_var, target, conf, loss_laws, p
        )
        res["params"][p] = pres
    if len(loss_laws) >= 1:
        res["asymptotic_penalty"] = asymptotic_penalty(loss_laws, at=target[loss_var] if target else None, conf=conf)
        if out_dir and plots:
            png.append(plot_loss_laws(loss_laws, os.path.join(out_dir, "loss_law.png")))
    res = _jsonable(res)
    if out_dir:
        res["files"] = _write_outputs(out_dir, res, all_optima, png)
    return res


def _laws_entry(opts: list, usable: list, axis: str, target: dict | None, conf: float) -> tuple:
    """The report of one parametrization and x column: its optima, the excluded ones, the
    extrapolation axis, the linear and quadratic LR laws (with the target's prediction and
    robustness) and their curvature test. Returns (entry, {kind: LRLaw} of the laws fitted)."""
    entry = {
        "optima": [asdict(o) for o in opts],
        "excluded": [{"N": o.N, "D": o.D, "edge": o.edge, "ok": o.ok} for o in opts if not o.usable],
        "laws": {},
    }
    if target is not None and axis == "auto":
        axis = choose_axis(usable, target["N"], target["D"])
    elif axis == "auto":
        axis = "".join(v for v in VARIABLES if len({getattr(o, v) for o in usable}) >= 2) or "N"
    entry["axis"] = axis
    tN = target["N"] if target else max(o.N for o in usable)
    tD = target["D"] if target else max(o.D for o in usable)
    laws = {}
    for kind in ("linear", "quadratic"):
        try:
            laws[kind] = _law_for_axis(usable, axis, tN, tD, kind, conf)
        except ValueError as e:  # not identified by this sweep: reported, not fatal
            entry["laws"][kind] = {"error": str(e)}
            continue
        entry["laws"][kind] = laws[kind].summary()
        if target:
            entry["laws"][kind]["target"] = laws[kind].predict(target["N"], target["D"])
            entry["laws"][kind]["robustness"] = extrapolation_penalty(laws[kind], usable, target["N"], target["D"])
    if len(laws) == 2:
        entry["curvature_test"] = curvature_test(laws["linear"], laws["quadratic"])
    return entry, laws


def _loss_law_entry(optima: list, loss_var: str, target: dict | None, conf: float, loss_laws: dict, param: str) -> dict:
    """The loss law of one parametrization (added to ``loss_laws``), or why it was not fitted."""
    other = "D" if loss_var == "N" else "N"
    try:
        loss_laws[param] = fit_loss_law(optima, loss_var, target[other] if target else None, conf)
    except (ValueError, RuntimeError) as e:  # too few scales, or no convergence: reported
        return {"error": str(e)}
    return loss_laws[param].summary()


def _write_outputs(out_dir: str | os.PathLike, res: dict, all_optima: list, png: list) -> list:
    """Writes optima.csv and summary.json (with the list of files) to ``out_dir``; returns
    the files written, the PNGs included."""
    path = os.path.join(out_dir, "optima.csv")
    cols = [
        "param",
        "x_col",
        "N",
        "D",
        "width",
        "x",
        "ci_lo",
        "ci_hi",
        "se_log",
        "curvature",
        "loss",
        "loss_se",
        "n_seeds",
        "n_rows",
        "n_boot",
        "edge",
        "ok",
    ]
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
    return res["files"]
