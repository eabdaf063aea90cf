"""``lvopt transfer`` (also ``python -m lvopt transfer``): the analysis of a sweep CSV, printed
and written to a directory."""

from __future__ import annotations

import argparse
import sys

from .analysis import analyze
from .sweep import VARIABLES


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
    ap = argparse.ArgumentParser(
        prog="lvopt transfer",
        description=(
            "Optimal-LR fits, LR scaling laws and transfer metrics over a sweep CSV "
            "(columns N, D, seed, loss, lr or lr_<role>; optional eff_lr, param, width). "
            "Formulas: docs/transfer.md."
        ),
    )
    ap.add_argument("sweep", help="sweep table (CSV)")
    ap.add_argument("--out", default="transfer_out", help="output directory (default %(default)s)")
    ap.add_argument("--target", type=_parse_target, help="extrapolation target, e.g. N=1e9,D=2e10")
    ap.add_argument(
        "--axis",
        choices=("auto", "N", "D", "ND"),
        default="auto",
        help="extrapolate along N, D or both (auto: the one the target leaves the sweep along)",
    )
    ap.add_argument("--lr-col", help="the swept LR column (default: lr, else the first lr_<role>)")
    ap.add_argument(
        "--eff-col", default="auto", help="effective-LR column, 'none' to skip (default: eff_lr if present)"
    )
    ap.add_argument(
        "--half-width", type=int, default=2, help="grid points each side of the best LR in the quadratic fit"
    )
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples over seeds")
    ap.add_argument("--conf", type=float, default=0.95, help="interval level")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    ap.add_argument("--loss-var", choices=VARIABLES, default="N", help="scale variable of the loss law")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = analyze(
            a.sweep,
            a.target,
            a.axis,
            a.lr_col,
            None if a.eff_col == "none" else a.eff_col,
            a.half_width,
            a.bootstrap,
            a.conf,
            a.seed,
            a.loss_var,
            a.out,
            not a.no_plots,
        )
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
                line = f"  {kind}: R2={_fmt(law['r2'])} LOSO={_fmt(law['loso'])} " + " ".join(
                    f"{k}={_fmt(v)}" for k, v in law["coef"].items()
                )
                if "target" in law:
                    t, r = law["target"], law["robustness"]
                    line += (
                        f" | target {xc}*={_fmt(t['x'])} PI=[{_fmt(t['pi'][0])}, {_fmt(t['pi'][1])}]"
                        f" penalty={_fmt(r['penalty'])}"
                    )
                print(line)
            if "curvature_test" in e:
                ct = e["curvature_test"]
                print(f"  curvature: p={_fmt(ct['p'])} curved={ct['curved']}")
    for p, d in res.get("asymptotic_penalty", {}).items():
        print(
            f"[{p}] asymptotic penalty dE={_fmt(d['dE'])} CI=[{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]"
            f" vs {d['reference']}"
        )
    print(f"wrote {len(res['files'])} files to {a.out}")
    return 0
