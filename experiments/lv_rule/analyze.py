"""Analysis of the LV-rule sweep (runs.csv from run.py).

Per (optimizer, V, width), on the runs at the nominal hidden LR: the optimal embedding LR, the
vertex of a quadratic in log2(LR) fitted to the seed-mean losses at the best grid point and two
points on each side (``bracketed``: the best point has two grid points on each side). Per
(optimizer, V): the slope s of log2(optimal embedding LR / hidden LR) against log2(width) (OLS
over widths) and e = the slope of log2(optimal embedding LR) alone; Δs = s(smallest V) -
s(largest V). Intervals: 95% percentile intervals of a parametric bootstrap (each cell's
seed-mean loss curve redrawn with the noise measured by its seed x LR interaction, every
optimum and slope refitted; with three seeds a bootstrap over seeds would have ten distinct
draws), and for s the t interval from the OLS residuals (how far the optima are from a power
law in width). Predictions (AdamW): muP s = 1,
e = 0 at every V; LV s = 1/2, e = -1/2 when V >> width, so Δs = 1/2. AdamH (hyperball hidden LR
~ width^-1/2): muP s = 1/2, LV s = 0, Δs again 1/2.

    python experiments/lv_rule/analyze.py [runs.csv] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("width", "V", "seed", "k", "steps", "N", "D"):
            r[k] = int(r[k])
        for k in ("lr_embedding", "lr_hidden", "train_loss", "loss", "seconds"):
            r[k] = float(r[k])
    return rows


def nominal_hidden(rows, optim, width):
    """The hidden LR of the main grid: the most common one for (optim, width)."""
    c = defaultdict(int)
    for r in rows:
        if r["optim"] == optim and r["width"] == width:
            c[round(r["lr_hidden"], 12)] += 1
    return max(c, key=c.get)


def cells(rows):
    """{(optim, V, width): dict(lr_hidden, ks, seeds, L (seeds x ks) loss matrix, lr(k))}"""
    out = {}
    keys = sorted({(r["optim"], r["V"], r["width"]) for r in rows})
    for o, V, w in keys:
        h = nominal_hidden(rows, o, w)
        sel = [r for r in rows if (r["optim"], r["V"], r["width"]) == (o, V, w) and abs(r["lr_hidden"] / h - 1) < 1e-6]
        ks = sorted({r["k"] for r in sel})
        seeds = sorted({r["seed"] for r in sel})
        L = np.full((len(seeds), len(ks)), np.nan)
        lr = {}
        for r in sel:
            L[seeds.index(r["seed"]), ks.index(r["k"])] = r["loss"] if math.isfinite(r["loss"]) else 1e9
            lr[r["k"]] = r["lr_embedding"]
        ok = ~np.isnan(L).any(0)          # keep grid points that every seed has
        ks = [k for k, m in zip(ks, ok) if m]
        out[(o, V, w)] = dict(lr_hidden=h, ks=ks, seeds=seeds, L=L[:, ok], lr=[lr[k] for k in ks])
    return out


def optimum(ks, lr, mean_loss, half=2):
    """log2 of the optimal LR: vertex of a quadratic over the best grid point +- half points."""
    x = np.log2(np.asarray(lr))
    i = int(np.argmin(mean_loss))
    lo, hi = max(0, i - half), min(len(x), i + half + 1)
    bracketed = i - 0 >= half and len(x) - 1 - i >= half
    xs, ys = x[lo:hi], np.asarray(mean_loss[lo:hi])
    if len(xs) >= 3:
        a, b, _ = np.polyfit(xs, ys, 2)
        if a > 0:
            v = -b / (2 * a)
            return float(np.clip(v, xs[0], xs[-1])), bracketed, i
    return float(x[i]), bracketed, i


def ols(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    X = np.column_stack([np.ones_like(x), x - x.mean()])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    n = len(x)
    if n > 2:
        from scipy import stats
        res = y - X @ coef
        se = math.sqrt(float(res @ res) / (n - 2) / float(((x - x.mean()) ** 2).sum()))
        t = float(stats.t.ppf(0.975, n - 2))
        return float(coef[1]), [float(coef[1] - t * se), float(coef[1] + t * se)]
    return float(coef[1]), [math.nan, math.nan]


def analyze(csv_path, out_dir, n_boot=2000, plots=True, seed=0):
    rows = load(csv_path)
    C = cells(rows)
    rng = np.random.default_rng(seed)
    table = []
    for (o, V, w), c in C.items():
        if len(c["ks"]) < 3:
            continue
        m = c["L"].mean(0)
        x, br, i = optimum(c["ks"], c["lr"], m)
        # Noise of the seed-mean curve: the seed x LR interaction (a seed's common offset, shared
        # by its whole curve since its batches are the same at every LR, does not move the
        # optimum). Parametric bootstrap: observed means + N(0, sigma^2 / S) per grid point.
        S = len(c["seeds"])
        L = c["L"]
        r = L - L.mean(1, keepdims=True) - L.mean(0, keepdims=True) + L.mean()
        dof = (S - 1) * (L.shape[1] - 1)
        sig = math.sqrt(float((r ** 2).sum()) / dof / S) if dof > 0 else 0.0
        boots = [optimum(c["ks"], c["lr"], m + rng.normal(0.0, sig, m.shape))[0] for _ in range(n_boot)]
        c["boot"] = np.asarray(boots)
        c["opt"] = x
        table.append(dict(optim=o, V=V, width=w, opt_lr_embedding=2 ** x, ci=[2 ** float(np.quantile(boots, 0.025)),
                          2 ** float(np.quantile(boots, 0.975))], lr_hidden=c["lr_hidden"],
                          log2_ratio=x - math.log2(c["lr_hidden"]), bracketed=br, best_loss=float(m[i]),
                          best_loss_se=float(c["L"][:, i].std(ddof=1) / math.sqrt(S)) if S > 1 else math.nan,
                          n_seeds=S, grid=[c["ks"][0], c["ks"][-1]], n_grid=len(c["ks"])))
    # slopes per (optim, V), with the seed bootstrap shared across V for the difference
    fits, groups = [], defaultdict(list)
    for t in table:
        groups[(t["optim"], t["V"])].append(t)
    boot_s = {}
    for (o, V), ts in sorted(groups.items()):
        ts.sort(key=lambda t: t["width"])
        ws = [t["width"] for t in ts]
        if len(ws) < 2:
            continue
        lx = np.log2(ws)
        y = [t["log2_ratio"] for t in ts]
        s, ci_t = ols(lx, y)
        e, _ = ols(lx, [math.log2(t["opt_lr_embedding"]) for t in ts])
        B = np.stack([C[(o, V, w)]["boot"] - math.log2(C[(o, V, w)]["lr_hidden"]) for w in ws], 1)  # n_boot x W
        xc = lx - lx.mean()
        sb = (B - B.mean(1, keepdims=True)) @ xc / float(xc @ xc)
        boot_s[(o, V)] = (ws, sb)
        losses = [t["best_loss"] for t in ts]
        fits.append(dict(optim=o, V=V, widths=ws, s=s, ci_t=ci_t,
                         ci_boot=[float(np.quantile(sb, 0.025)), float(np.quantile(sb, 0.975))],
                         e=e, all_bracketed=all(t["bracketed"] for t in ts),
                         wider_is_better=all(a > b for a, b in zip(losses, losses[1:])),
                         best_losses=losses))
    def s_over(o, V, ws):
        lx = np.log2(ws)
        xc = lx - lx.mean()
        y = np.array([C[(o, V, w)]["opt"] - math.log2(C[(o, V, w)]["lr_hidden"]) for w in ws])
        B = np.stack([C[(o, V, w)]["boot"] - math.log2(C[(o, V, w)]["lr_hidden"]) for w in ws], 1)
        return float((y - y.mean()) @ xc / float(xc @ xc)), (B - B.mean(1, keepdims=True)) @ xc / float(xc @ xc)

    diffs = []
    for o in sorted({k[0] for k in boot_s}):
        Vs = sorted(V for (oo, V) in boot_s if oo == o)
        for Vl in Vs[1:]:
            common = sorted(set(boot_s[(o, Vs[0])][0]) & set(boot_s[(o, Vl)][0]))
            if len(common) < 2:
                continue
            s0, b0 = s_over(o, Vs[0], common)
            s1, b1 = s_over(o, Vl, common)
            d = b0 - b1
            diffs.append(dict(optim=o, V_small=Vs[0], V_large=Vl, widths=common, ds=s0 - s1,
                              ci_boot=[float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]))
    hidden = hidden_check(rows, C, table)
    os.makedirs(out_dir, exist_ok=True)
    res = dict(optima=table, slopes=fits, delta_s=diffs, hidden_check=hidden)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    md = ["| optim | V | width | opt emb LR [95% CI] | hidden LR | log2(ratio) | bracketed | grid k | best loss ± se |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        md.append(f"| {r['optim']} | {r['V']} | {r['width']} | {r['opt_lr_embedding']:.3g} "
                  f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}] | {r['lr_hidden']:.3g} | {r['log2_ratio']:.2f} | "
                  f"{'yes' if r['bracketed'] else 'NO'} | {r['grid'][0]}..{r['grid'][1]} | "
                  f"{r['best_loss']:.4f} ± {r['best_loss_se']:.4f} |")
    md += ["", "| optim | V | widths | s | 95% CI (bootstrap) | 95% CI (t, residuals) | e = slope of opt emb LR | all bracketed | wider better |",
           "|---|---|---|---|---|---|---|---|---|"]
    for f_ in fits:
        md.append(f"| {f_['optim']} | {f_['V']} | {f_['widths']} | {f_['s']:.2f} | [{f_['ci_boot'][0]:.2f}, "
                  f"{f_['ci_boot'][1]:.2f}] | [{f_['ci_t'][0]:.2f}, {f_['ci_t'][1]:.2f}] | {f_['e']:.2f} | "
                  f"{'yes' if f_['all_bracketed'] else 'NO'} | {'yes' if f_['wider_is_better'] else 'NO'} |")
    md += ["", "| optim | V small | V large | widths | Δs | 95% CI (bootstrap) |", "|---|---|---|---|---|---|"]
    for d in diffs:
        md.append(f"| {d['optim']} | {d['V_small']} | {d['V_large']} | {d['widths']} | {d['ds']:.2f} | "
                  f"[{d['ci_boot'][0]:.2f}, {d['ci_boot'][1]:.2f}] |")
    if hidden:
        md += ["", "Hidden-LR check (seed-mean loss at the best embedding grid point, hidden LR x 1/2, x 1, x 2):", "",
               "| optim | V | width | k | loss x1/2 | loss x1 | loss x2 | best |", "|---|---|---|---|---|---|---|---|"]
        for h in hidden:
            md.append(f"| {h['optim']} | {h['V']} | {h['width']} | {h['k']} | {h['loss'][0]:.4f} | {h['loss'][1]:.4f} | "
                      f"{h['loss'][2]:.4f} | x{h['best']:g} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    if plots:
        _plots(C, table, fits, out_dir)
    print("\n".join(md))
    return res


def hidden_check(rows, C, table):
    out = []
    for t in table:
        o, V, w = t["optim"], t["V"], t["width"]
        c = C[(o, V, w)]
        h = c["lr_hidden"]
        by = defaultdict(dict)
        for r in rows:
            if (r["optim"], r["V"], r["width"]) == (o, V, w):
                f = round(r["lr_hidden"] / h, 6)
                by[(r["k"], f)][r["seed"]] = r["loss"]
        ks = {k for (k, f) in by if f in (0.5, 2.0)}
        for k in sorted(ks):
            if all((k, f) in by for f in (0.5, 1.0, 2.0)):
                ls = [float(np.mean(list(by[(k, f)].values()))) for f in (0.5, 1.0, 2.0)]
                out.append(dict(optim=o, V=V, width=w, k=k, loss=ls, best=(0.5, 1.0, 2.0)[int(np.argmin(ls))]))
    return out


def _plots(C, table, fits, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = sorted({(t["optim"], t["V"]) for t in table})
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.3), squeeze=False)
    for ax, (o, V) in zip(axes[0], params):
        for t in sorted((t for t in table if (t["optim"], t["V"]) == (o, V)), key=lambda t: t["width"]):
            c = C[(o, V, t["width"])]
            line, = ax.plot(c["lr"], c["L"].mean(0), "o-", ms=3, label=f"width {t['width']}")
            ax.axvline(t["opt_lr_embedding"], ls=":", lw=0.8, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_title(f"{o}, V={V}", fontsize=9)
        ax.set_xlabel("embedding LR")
        ax.set_ylabel("loss (seed mean)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_vs_emb_lr.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for (o, V) in params:
        ts = sorted((t for t in table if (t["optim"], t["V"]) == (o, V)), key=lambda t: t["width"])
        f_ = next((f for f in fits if (f["optim"], f["V"]) == (o, V)), None)
        if f_ is None:
            continue
        w = np.array([t["width"] for t in ts])
        y = np.array([math.log2(t["opt_lr_embedding"]) for t in ts])
        lo = y - np.log2([t["ci"][0] for t in ts])
        hi = np.log2([t["ci"][1] for t in ts]) - y
        ax.errorbar(w, y, yerr=[lo, hi], fmt="o-" if o == "adamw" else "s--", capsize=3, ms=4,
                    label=f"{o} V={V}: e={f_['e']:.2f}, s={f_['s']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("log2 optimal embedding LR")
    ax.set_title("muP predicts a flat line (e = 0); LV e = -1/2 at V >> width", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "opt_emb_lr_vs_width.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="?", default=os.path.join(HERE, "runs.csv"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    analyze(a.csv, a.out, a.n_boot, not a.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
