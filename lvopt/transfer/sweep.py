"""The sweep table: loading a sweep (CSV, row dicts or columns) into numpy columns, its LR
columns, and its configurations (docs/transfer.md; the columns are in lvopt.transfer's
docstring)."""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from ..roles import ROLES

REQUIRED = ("N", "D", "seed", "loss")
VARIABLES = ("N", "D")


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
            out[k] = np.asarray([float(x) if str(x).strip() != "" else math.nan for x in v], dtype=np.float64)
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
    if isinstance(x, dict) and all(isinstance(v, np.ndarray) for v in x.values()) and "param" in x and "width" in x:
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
    return sorted(
        ((k, np.asarray(v)) for k, v in keys.items()), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])
    )
