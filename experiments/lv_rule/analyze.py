"""Analysis of the LV-rule sweep through lvopt.transfer: the optimal embedding LR per
(optimizer, V, width) with a bootstrap interval over seeds, and per (optimizer, V) the slope s
of ln(optimal embedding LR / hidden LR) against ln(width), with an interval.

    python experiments/lv_rule/analyze.py [--out DIR]

The LV claim (Hayou & Liu 2025) predicts s ~ 1/2 when V >> width and s -> 1 (muP) when V is
small. Writes <out>/optima.csv, <out>/slopes.json, <out>/slopes.md and PNGs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os

import numpy as np

from lvopt import transfer

HERE = os.path.dirname(os.path.abspath(__file__))


def slope_fit(points, n_boot=2000, conf=0.9, seed=0):
    """points: (ln width, ln ratio, se of ln ratio). Weighted least squares slope; interval from
    a parametric bootstrap of each optimum within its standard error (the seeds' spread that
    lvopt.transfer measured), refitting the slope each time."""
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    se = np.array([max(p[2], 0.05) for p in points])  # floor: the grid step is ln(2)/2 = 0.35
    w = 1.0 / se**2

    def fit(yy):
        xm, ym = np.sum(w * x) / np.sum(w), np.sum(w * yy) / np.sum(w)
        return np.sum(w * (x - xm) * (yy - ym)) / np.sum(w * (x - xm) ** 2)

    s = float(fit(y))
    rng = np.random.default_rng(seed)
    boot = np.array([fit(y + rng.normal(0.0, se)) for _ in range(n_boot)])
    lo, hi = np.quantile(boot, [(1 - conf) / 2, (1 + conf) / 2])
    return dict(slope=s, ci=(float(lo), float(hi)), conf=conf, n_widths=len(points))


def analyze(runs_csv: str, out: str, n_boot: int = 200) -> dict:
    os.makedirs(out, exist_ok=True)
    # lvopt.transfer's sweep table: numeric columns plus `param` (here "<optimizer>-V<V>").
    rows = list(csv.DictReader(open(runs_csv)))
    table_path = os.path.join(out, "sweep_table.csv")
    keep = ["param", "N", "D", "width", "seed", "loss", "lr_embedding", "lr_hidden", "lr_output"]
    with open(table_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keep)
        wr.writeheader()
        wr.writerows({k: r[k] for k in keep} for r in rows)
    sweep = transfer.load_sweep(table_path)
    optima = transfer.optimal_lrs(sweep, lr_col="lr_embedding", x_col="lr_embedding", n_boot=n_boot)
    hidden = {}
    for r in rows:
        hidden[(r["param"], int(r["width"]))] = float(r["lr_hidden"])
    table, by_param = [], {}
    for o in optima:
        h = hidden[(o.param, int(o.width))]
        rec = dict(param=o.param, width=int(o.width), opt_lr_embedding=o.x, ci_low=o.ci[0], ci_high=o.ci[1],
                   se_log=o.se_log, lr_hidden=h, ratio=o.x / h, loss=o.loss, edge=o.edge, usable=o.usable)
        table.append(rec)
        by_param.setdefault(o.param, []).append(rec)
    with open(os.path.join(out, "optima.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(table[0]))
        wr.writeheader()
        wr.writerows(table)
    slopes = {}
    for param, recs in sorted(by_param.items()):
        pts = [(math.log(r["width"]), math.log(r["ratio"]), r["se_log"]) for r in recs
               if r["usable"] and math.isfinite(r["se_log"])]
        res = dict(points=len(pts), edge_widths=[r["width"] for r in recs if r["edge"]])
        if len(pts) >= 2:
            res.update(slope_fit(pts))
        slopes[param] = res
    with open(os.path.join(out, "slopes.json"), "w") as f:
        json.dump(dict(slopes=slopes, optima=table), f, indent=1)
    lines = ["| optimizer-V | widths used | slope s of ln(emb LR*/hidden LR) vs ln width | 90% interval | optima at grid edge |",
             "|---|---|---|---|---|"]
    for param, r in slopes.items():
        s = f"{r['slope']:.2f}" if "slope" in r else "n/a"
        ci = f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if "ci" in r else "n/a"
        lines.append(f"| {param} | {r['points']} | {s} | {ci} | {r['edge_widths'] or '-'} |")
    open(os.path.join(out, "slopes.md"), "w").write("\n".join(lines) + "\n")
    _plots(sweep, optima, by_param, slopes, out)
    return slopes


def _plots(sweep, optima, by_param, slopes, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    transfer.plot_loss_vs_lr(sweep, optima, os.path.join(out, "loss_vs_emb_lr.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for param, recs in sorted(by_param.items()):
        recs = sorted(recs, key=lambda r: r["width"])
        wv = np.array([r["width"] for r in recs], dtype=float)
        rv = np.array([r["ratio"] for r in recs])
        line = ax.plot(wv, rv, "o", label=f"{param} (s={slopes[param].get('slope', float('nan')):.2f})")[0]
        if "slope" in slopes[param]:
            c = np.exp(np.mean(np.log(rv)) - slopes[param]["slope"] * np.mean(np.log(wv)))
            ax.plot(wv, c * wv ** slopes[param]["slope"], "-", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("optimal embedding LR / hidden LR")
    ax.set_title("LV rule: s = 1/2 (V >> width), s = 1 (muP)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratio_vs_width.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args(argv)
    slopes = analyze(os.path.join(args.out, "runs.csv"), args.out, args.n_boot)
    print(open(os.path.join(args.out, "slopes.md")).read())
    return 0 if slopes else 1


if __name__ == "__main__":
    raise SystemExit(main())
