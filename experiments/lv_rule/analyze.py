"""Analysis of the LV-rule sweep (runs.csv from run.py) through lvopt.transfer.

Per (optimizer, V, width): the optimal embedding LR with its seed-bootstrap interval
(``lvopt.transfer.optimal_lrs``). Per (optimizer, V): the slope s of
log2(optimal embedding LR / hidden LR) against log2(width), OLS over widths, with a t interval
from the residuals and a parametric-bootstrap interval that propagates each optimum's
bootstrap standard error. LV predicts s = 1/2 for V >> width, muP s = 1 for small V.

    python experiments/lv_rule/analyze.py [runs.csv] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from lvopt import transfer  # noqa: E402


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:   # one transfer "parametrization" per (optimizer, V); configs differ in width
        r["param"] = f"{r['optim']}_V{r['V']}"
    keep = ("param", "N", "D", "seed", "loss", "lr_embedding", "lr_hidden", "width")
    return transfer.load_sweep([{k: r[k] for k in keep} for r in rows]), rows


def slope(widths, log2_ratio, se_log2, conf=0.95, n_mc=2000, seed=0):
    from scipy import stats
    x, y = np.log2(widths), np.asarray(log2_ratio)
    n = len(x)
    if n < 2:
        return dict(s=math.nan, ci_t=[math.nan, math.nan], ci_boot=[math.nan, math.nan], n=n)
    X = np.column_stack([np.ones(n), x - x.mean()])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    s = float(coef[1])
    dof = n - 2
    if dof > 0:
        resid = y - X @ coef
        se = math.sqrt(float(resid @ resid) / dof / float(((x - x.mean()) ** 2).sum()))
        t = float(stats.t.ppf(0.5 + conf / 2, dof))
        ci_t = [s - t * se, s + t * se]
    else:
        se, ci_t = math.nan, [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    se_y = np.where(np.isfinite(se_log2), se_log2, 0.0)
    sims = [np.polyfit(x, y + rng.normal(0, se_y), 1)[0] for _ in range(n_mc)]
    ci_b = [float(np.quantile(sims, (1 - conf) / 2)), float(np.quantile(sims, (1 + conf) / 2))]
    return dict(s=s, se=se, ci_t=ci_t, ci_boot=ci_b, n=n)


def analyze(csv_path, out_dir, n_boot=200, plots=True):
    sweep, rows = load(csv_path)
    optima = transfer.optimal_lrs(sweep, x_col="lr_embedding", lr_col="lr_embedding", n_boot=n_boot)
    hidden = {(r["param"], float(r["width"])): float(r["lr_hidden"]) for r in rows}
    table = []
    for o in optima:
        h = hidden[(o.param, o.width)]
        se2 = o.se_log / math.log(2) if math.isfinite(o.se_log) else math.nan
        optim, V = o.param.split("_V")
        table.append(dict(optim=optim, V=int(V), width=int(o.width), opt_lr_embedding=o.x,
                          ci=list(o.ci), lr_hidden=h, log2_ratio=math.log2(o.x / h) if o.x > 0 else math.nan,
                          se_log2=se2, loss=o.loss, edge=o.edge, ok=o.ok, usable=o.usable,
                          n_seeds=o.n_seeds))
    fits = []
    for param in sorted({o.param for o in optima}):
        t = [r for r in table if f"{r['optim']}_V{r['V']}" == param]
        for which, sel in (("usable", [r for r in t if r["usable"]]), ("all", t)):
            sel = [r for r in sel if math.isfinite(r["log2_ratio"])]
            f = slope([r["width"] for r in sel], [r["log2_ratio"] for r in sel], [r["se_log2"] for r in sel])
            fits.append(dict(optim=t[0]["optim"], V=t[0]["V"], configs=which,
                             widths=[r["width"] for r in sel], **f))
    os.makedirs(out_dir, exist_ok=True)
    res = dict(optima=table, slopes=fits)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    md = ["| optim | V | width | opt emb LR [95% CI] | hidden LR | log2(ratio) ± se | val loss | edge |",
          "|---|---|---|---|---|---|---|---|"]
    for r in table:
        md.append(f"| {r['optim']} | {r['V']} | {r['width']} | {r['opt_lr_embedding']:.3g} "
                  f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}] | {r['lr_hidden']:.3g} | "
                  f"{r['log2_ratio']:.2f} ± {r['se_log2']:.2f} | {r['loss']:.3f} | {'yes' if r['edge'] else 'no'} |")
    md += ["", "| optim | V | configs | widths | s | 95% CI (t, residuals) | 95% CI (bootstrap se) |",
           "|---|---|---|---|---|---|---|"]
    for f_ in fits:
        md.append(f"| {f_['optim']} | {f_['V']} | {f_['configs']} | {f_['widths']} | {f_['s']:.2f} | "
                  f"[{f_['ci_t'][0]:.2f}, {f_['ci_t'][1]:.2f}] | [{f_['ci_boot'][0]:.2f}, {f_['ci_boot'][1]:.2f}] |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    if plots:
        _plots(sweep, optima, table, fits, out_dir)
    print("\n".join(md))
    return res


def _plots(sweep, optima, table, fits, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = sorted({o.param for o in optima})
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    for ax, p in zip(axes[0], params):
        sel = sweep["param"] == p
        for w in sorted(set(sweep["width"][sel])):
            m = sel & (sweep["width"] == w)
            lrs = np.unique(sweep["lr_embedding"][m])
            mean = [sweep["loss"][m & (sweep["lr_embedding"] == lr)].mean() for lr in lrs]
            ax.plot(lrs, mean, "o-", label=f"width {int(w)}")
        for o in (o for o in optima if o.param == p):
            ax.axvline(o.x, ls=":", lw=0.8, color="k")
        ax.set_xscale("log", base=2)
        ax.set_title(p)
        ax.set_xlabel("embedding LR")
        ax.set_ylabel("val loss (seed mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_vs_emb_lr.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for p in params:
        t = [r for r in table if f"{r['optim']}_V{r['V']}" == p]
        w = np.array([r["width"] for r in t])
        y = np.array([r["log2_ratio"] for r in t])
        e = np.array([r["se_log2"] for r in t])
        f_ = next(f for f in fits if f"{f['optim']}_V{f['V']}" == p and f["configs"] == "all")
        line = ax.errorbar(w, y, yerr=np.nan_to_num(e), fmt="o", capsize=3,
                           label=f"{p}: s={f_['s']:.2f}", mfc=["none" if r["edge"] else None for r in t][0])
        if math.isfinite(f_["s"]):
            xx = np.log2(w)
            ax.plot(w, y.mean() + f_["s"] * (xx - xx.mean()), "-", color=line[0].get_color())
    x0 = np.array([min(r["width"] for r in table), max(r["width"] for r in table)])
    for s_, ls in ((0.5, "--"), (1.0, ":")):
        ax.plot(x0, s_ * np.log2(x0 / x0[0]) + min(r["log2_ratio"] for r in table), ls, color="gray",
                label=f"slope {s_} ({'LV' if s_ == 0.5 else 'muP'})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("log2(opt emb LR / hidden LR)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ratio_vs_width.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="?", default=os.path.join(HERE, "runs.csv"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    analyze(a.csv, a.out, a.n_boot, not a.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
