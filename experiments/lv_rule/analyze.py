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


def cells(rows, min_ks=3):
    """{(optim, V, width, lr_hidden): dict(lr_hidden, nominal, ks, seeds, L (seeds x ks), lr)} for
    every hidden LR that has an embedding-LR grid of at least ``min_ks`` points."""
    out = {}
    groups = defaultdict(list)
    for r in rows:
        groups[(r["optim"], r["V"], r["width"], round(r["lr_hidden"], 12))].append(r)
    for (o, V, w, h), sel in sorted(groups.items()):
        ks = sorted({r["k"] for r in sel})
        seeds = sorted({r["seed"] for r in sel})
        if len(ks) < min_ks:
            continue
        L = np.full((len(seeds), len(ks)), np.nan)
        lr = {}
        for r in sel:
            L[seeds.index(r["seed"]), ks.index(r["k"])] = r["loss"] if math.isfinite(r["loss"]) else 1e9
            lr[r["k"]] = r["lr_embedding"]
        ok = ~np.isnan(L).any(0)  # keep grid points that every seed has
        ks = [k for k, m in zip(ks, ok) if m]
        if len(ks) < min_ks:
            continue
        out[(o, V, w, h)] = dict(
            lr_hidden=h,
            nominal=abs(h / nominal_hidden(rows, o, w) - 1) < 1e-6,
            ks=ks,
            seeds=seeds,
            L=L[:, ok],
            lr=[lr[k] for k in ks],
        )
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


def _cell_optimum(c, rng, n_boot):
    m = c["L"].mean(0)
    x, br, i = optimum(c["ks"], c["lr"], m)
    # Noise of the seed-mean curve: the seed x LR interaction (a seed's common offset, shared by
    # its whole curve since its batches are the same at every LR, does not move the optimum).
    # Parametric bootstrap: observed means + N(0, sigma^2 / S) per grid point.
    S, L = len(c["seeds"]), c["L"]
    r = L - L.mean(1, keepdims=True) - L.mean(0, keepdims=True) + L.mean()
    dof = (S - 1) * (L.shape[1] - 1)
    sig = math.sqrt(float((r**2).sum()) / dof / S) if dof > 0 else 0.0
    c["boot"] = np.asarray([optimum(c["ks"], c["lr"], m + rng.normal(0.0, sig, m.shape))[0] for _ in range(n_boot)])
    c["opt"], c["bracketed"], c["best_loss"] = x, br, float(m[i])
    c["best_loss_se"] = float(L[:, i].std(ddof=1) / math.sqrt(S)) if S > 1 else math.nan


def _row(o, V, w, c, series):
    return dict(
        series=series,
        optim=o,
        V=V,
        width=w,
        opt_lr_embedding=2 ** c["opt"],
        ci=[2 ** float(np.quantile(c["boot"], 0.025)), 2 ** float(np.quantile(c["boot"], 0.975))],
        lr_hidden=c["lr_hidden"],
        log2_ratio=c["opt"] - math.log2(c["lr_hidden"]),
        bracketed=c["bracketed"],
        best_loss=c["best_loss"],
        best_loss_se=c["best_loss_se"],
        n_seeds=len(c["seeds"]),
        grid=[c["ks"][0], c["ks"][-1]],
        n_grid=len(c["ks"]),
    )


def _slopes(table, C, series):
    """s, e and their intervals per (optim, V) over the rows of one series; the bootstrap draws."""
    fits, draws, groups = [], {}, defaultdict(list)
    for t in table:
        if t["series"] == series:
            groups[(t["optim"], t["V"])].append(t)
    for (o, V), ts in sorted(groups.items()):
        ts.sort(key=lambda t: t["width"])
        if len(ts) < 2:
            continue
        ws = [t["width"] for t in ts]
        lx = np.log2(ws)
        xc = lx - lx.mean()
        s, ci_t = ols(lx, [t["log2_ratio"] for t in ts])
        e, _ = ols(lx, [math.log2(t["opt_lr_embedding"]) for t in ts])
        B = np.stack([C[t["_key"]]["boot"] - math.log2(t["lr_hidden"]) for t in ts], 1)
        sb = (B - B.mean(1, keepdims=True)) @ xc / float(xc @ xc)
        draws[(o, V)] = dict(zip(ws, B.T))
        losses = [t["best_loss"] for t in ts]
        fits.append(
            dict(
                series=series,
                optim=o,
                V=V,
                widths=ws,
                s=s,
                ci_t=ci_t,
                ci_boot=[float(np.quantile(sb, 0.025)), float(np.quantile(sb, 0.975))],
                e=e,
                all_bracketed=all(t["bracketed"] for t in ts),
                wider_is_better=all(a > b for a, b in zip(losses, losses[1:])),
                best_losses=losses,
                log2_lr_hidden=[math.log2(t["lr_hidden"]) for t in ts],
            )
        )
    diffs = []
    for o in sorted({k[0] for k in draws}):
        Vs = sorted(V for (oo, V) in draws if oo == o)
        for Vl in Vs[1:]:
            common = sorted(set(draws[(o, Vs[0])]) & set(draws[(o, Vl)]))
            if len(common) < 2:
                continue
            lx = np.log2(common)
            xc = lx - lx.mean()

            def sl(V):
                ts = {t["width"]: t for t in table if (t["series"], t["optim"], t["V"]) == (series, o, V)}
                y = np.array([ts[w]["log2_ratio"] for w in common])
                B = np.stack([draws[(o, V)][w] for w in common], 1)
                return float((y - y.mean()) @ xc / float(xc @ xc)), (B - B.mean(1, keepdims=True)) @ xc / float(xc @ xc)

            s0, b0 = sl(Vs[0])
            s1, b1 = sl(Vl)
            d = b0 - b1
            diffs.append(
                dict(
                    series=series,
                    optim=o,
                    V_small=Vs[0],
                    V_large=Vl,
                    widths=common,
                    ds=s0 - s1,
                    ci_boot=[float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))],
                )
            )
    return fits, diffs


def hidden_grid(rows, C):
    """Per (optim, V, width): seed-mean loss against the hidden LR at the best embedding grid
    point of the muP-hidden grid, and the vertex of a quadratic in log2(hidden LR)."""
    out = []
    for (o, V, w, h), c in C.items():
        if not c["nominal"]:
            continue
        k0 = c["ks"][int(np.argmin(c["L"].mean(0)))]
        by = defaultdict(list)
        for r in rows:
            if (r["optim"], r["V"], r["width"], r["k"]) == (o, V, w, k0):
                by[round(r["lr_hidden"] / h, 6)].append(r["loss"])
        fs = sorted(f for f in by if len(by[f]) == len(c["seeds"]))
        if len(fs) < 3:
            continue
        m = np.array([np.mean(by[f]) for f in fs])
        x, br, i = optimum(None, [h * f for f in fs], m)
        out.append(
            dict(
                optim=o,
                V=V,
                width=w,
                k=k0,
                factors=fs,
                loss=[float(v) for v in m],
                best=fs[i],
                vertex_factor=2**x / h,
                opt_lr_hidden=2**x,
                bracketed=i > 0 and i < len(fs) - 1,
            )
        )
    return out


def analyze(csv_path, out_dir, n_boot=2000, plots=True, seed=0):
    rows = load(csv_path)
    C = cells(rows)
    rng = np.random.default_rng(seed)
    for c in C.values():
        _cell_optimum(c, rng, n_boot)
    table = []
    for (o, V, w, h), c in C.items():
        if c["nominal"]:
            table.append({**_row(o, V, w, c, "mup_hidden"), "_key": (o, V, w, h)})
    # the refined series: per (optim, V, width) the hidden LR, among those with a full embedding
    # grid (>= 5 points), whose embedding optimum has the lowest loss
    best = {}
    for (o, V, w, h), c in C.items():
        if len(c["ks"]) >= 5 and ((o, V, w) not in best or c["best_loss"] < C[best[(o, V, w)]]["best_loss"]):
            best[(o, V, w)] = (o, V, w, h)
    hidden = hidden_grid(rows, C)
    # refined: the configurations whose hidden LR was swept (>= 5 points, interior best)
    # and that have an embedding grid at the best hidden LR of that sweep (AdamH's hidden LR was
    # swept without one: its hidden optimum is reported, not a refined ratio)
    nom = {k[:3]: k[3] for k, c in C.items() if c["nominal"]}

    def has_grid(o, V, w, f):
        hb = nom[(o, V, w)] * f
        return any(k[:3] == (o, V, w) and abs(k[3] / hb - 1) < 1e-4 and len(c["ks"]) >= 5 for k, c in C.items())

    swept = {(h["optim"], h["V"], h["width"]) for h in hidden if len(h["factors"]) >= 5 and h["bracketed"]}
    # an optimizer/V counts only if every swept width has its embedding grid at the best hidden LR
    complete = {
        (o, V)
        for (o, V, w) in swept
        if all(
            has_grid(h["optim"], h["V"], h["width"], h["best"])
            for h in hidden
            if (h["optim"], h["V"]) == (o, V) and (h["optim"], h["V"], h["width"]) in swept
        )
        and any(not C[k]["nominal"] and k[:2] == (o, V) for k in C if len(C[k]["ks"]) >= 5)
    }
    refined = {k for k in swept if k[:2] in complete}
    for (o, V, w), key in sorted(best.items()):
        if (o, V, w) in refined:
            table.append({**_row(o, V, w, C[key], "refined"), "_key": key})
    fits, diffs = _slopes(table, C, "mup_hidden")
    f2, d2 = _slopes(table, C, "refined")
    fits, diffs = fits + f2, diffs + d2
    # transfer penalty: the embedding LR each rule carries from the narrowest width's optimum
    # (muP: unchanged; LV: x (w/w0)^-1/2), and the seed-mean loss there (linear in log2 LR
    # between grid points; outside the grid: the loss at the nearest end, a lower bound)
    transfer = []
    for t0 in table:
        if t0["series"] != "mup_hidden":
            continue
        ts = sorted(
            (t for t in table if (t["series"], t["optim"], t["V"]) == ("mup_hidden", t0["optim"], t0["V"])),
            key=lambda t: t["width"],
        )
        if t0 is not ts[0]:
            continue
        for t in ts[1:]:
            c = C[t["_key"]]
            x, m = np.log2(c["lr"]), c["L"].mean(0)
            for rule, e in (("mup", 0.0), ("lv", -0.5)):
                lr = t0["opt_lr_embedding"] * (t["width"] / t0["width"]) ** e
                inside = x[0] <= math.log2(lr) <= x[-1]
                transfer.append(
                    dict(
                        optim=t["optim"],
                        V=t["V"],
                        width=t["width"],
                        rule=rule,
                        lr=lr,
                        penalty=float(np.interp(math.log2(lr), x, m)) - t["best_loss"],
                        inside=inside,
                    )
                )
    hfits = []  # slope of the hidden optimum (muP: -1 for AdamW, -1/2 for AdamH's hyperball)
    for o, V in sorted({(h["optim"], h["V"]) for h in hidden}):
        hs = sorted((h for h in hidden if (h["optim"], h["V"]) == (o, V)), key=lambda h: h["width"])
        if len(hs) >= 2:
            sl, ci = ols(np.log2([h["width"] for h in hs]), np.log2([h["opt_lr_hidden"] for h in hs]))
            hfits.append(dict(optim=o, V=V, widths=[h["width"] for h in hs], slope=sl, ci_t=ci))
    os.makedirs(out_dir, exist_ok=True)
    res = dict(
        transfer=transfer,
        optima=[{k: v for k, v in t.items() if k != "_key"} for t in table],
        slopes=fits,
        delta_s=diffs,
        hidden_grid=hidden,
        hidden_slopes=hfits,
    )
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    md = [
        "| series | optim | V | width | opt emb LR [95% CI] | hidden LR | log2(ratio) | bracketed | grid k | best loss ± se |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        md.append(
            f"| {r['series']} | {r['optim']} | {r['V']} | {r['width']} | {r['opt_lr_embedding']:.3g} "
            f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}] | {r['lr_hidden']:.3g} | {r['log2_ratio']:.2f} | "
            f"{'yes' if r['bracketed'] else 'NO'} | {r['grid'][0]}..{r['grid'][1]} | "
            f"{r['best_loss']:.4f} ± {r['best_loss_se']:.4f} |"
        )
    md += [
        "",
        "| series | optim | V | widths | s | 95% CI (bootstrap) | 95% CI (t, residuals) | e = slope of opt emb LR | all bracketed | wider better |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f_ in fits:
        md.append(
            f"| {f_['series']} | {f_['optim']} | {f_['V']} | {f_['widths']} | {f_['s']:.2f} | [{f_['ci_boot'][0]:.2f}, "
            f"{f_['ci_boot'][1]:.2f}] | [{f_['ci_t'][0]:.2f}, {f_['ci_t'][1]:.2f}] | {f_['e']:.2f} | "
            f"{'yes' if f_['all_bracketed'] else 'NO'} | {'yes' if f_['wider_is_better'] else 'NO'} |"
        )
    md += [
        "",
        "| series | optim | V small | V large | widths | Δs | 95% CI (bootstrap) |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in diffs:
        md.append(
            f"| {d['series']} | {d['optim']} | {d['V_small']} | {d['V_large']} | {d['widths']} | {d['ds']:.2f} | "
            f"[{d['ci_boot'][0]:.2f}, {d['ci_boot'][1]:.2f}] |"
        )
    if hidden:
        md += [
            "",
            "Hidden LR at the best embedding grid point of the muP-hidden grid (seed-mean loss per factor "
            "of the muP hidden LR; vertex of a quadratic in log2 LR):",
            "",
            "| optim | V | width | k | factor: loss | best | vertex factor | interior |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for h in hidden:
            fl = ", ".join(f"x{f:.3g}: {loss:.4f}" for f, loss in zip(h["factors"], h["loss"]))
            md.append(
                f"| {h['optim']} | {h['V']} | {h['width']} | {h['k']} | {fl} | x{h['best']:.3g} | "
                f"x{h['vertex_factor']:.2f} | {'yes' if h['bracketed'] else 'NO'} |"
            )
        md += [
            "",
            "| optim | V | widths | slope of log2 optimal hidden LR vs log2 width | 95% CI (t) |",
            "|---|---|---|---|---|",
        ]
        for h in hfits:
            md.append(
                f"| {h['optim']} | {h['V']} | {h['widths']} | {h['slope']:.2f} | [{h['ci_t'][0]:.2f}, {h['ci_t'][1]:.2f}] |"
            )
    if transfer:
        md += [
            "",
            "Transfer penalty: loss at the embedding LR each rule carries from the narrowest width's "
            "optimum, minus the best loss (muP hidden LR; '>=' where that LR is off the grid):",
            "",
            "| optim | V | width | muP: LR, penalty | LV: LR, penalty |",
            "|---|---|---|---|---|",
        ]
        for o, V, w in sorted({(t["optim"], t["V"], t["width"]) for t in transfer}):
            cell = {t["rule"]: t for t in transfer if (t["optim"], t["V"], t["width"]) == (o, V, w)}
            fm = lambda t: f"{t['lr']:.3g}, {'' if t['inside'] else '>= '}{t['penalty']:.4f}"  # noqa: E731
            md.append(f"| {o} | {V} | {w} | {fm(cell['mup'])} | {fm(cell['lv'])} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    if plots:
        _plots(C, table, fits, out_dir)
    print("\n".join(md))
    return res


def _plots(C, table, fits, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({(t["optim"], t["V"]) for t in table})
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.3), squeeze=False)
    for ax, (o, V) in zip(axes[0], params):
        for t in sorted(
            (t for t in table if (t["optim"], t["V"], t["series"]) == (o, V, "mup_hidden")), key=lambda t: t["width"]
        ):
            c = C[t["_key"]]
            (line,) = ax.plot(c["lr"], c["L"].mean(0), "o-", ms=3, label=f"width {t['width']}")
            ax.axvline(t["opt_lr_embedding"], ls=":", lw=0.8, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_title(f"{o}, V={V} (muP hidden LR)", fontsize=8)
        ax.set_xlabel("embedding LR")
        ax.set_ylabel("loss (seed mean)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_vs_emb_lr.png"), dpi=100)
    plt.close(fig)
    for what, ylab, fname in (
        ("e", "log2 optimal embedding LR", "opt_emb_lr_vs_width.png"),
        ("s", "log2(optimal embedding LR / hidden LR)", "ratio_vs_width.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        for f_ in fits:
            ts = sorted(
                (t for t in table if (t["series"], t["optim"], t["V"]) == (f_["series"], f_["optim"], f_["V"])),
                key=lambda t: t["width"],
            )
            w = np.array([t["width"] for t in ts])
            y = np.array([math.log2(t["opt_lr_embedding"]) for t in ts])
            lo = y - np.log2([t["ci"][0] for t in ts])
            hi = np.log2([t["ci"][1] for t in ts]) - y
            if what == "s":
                y = y - np.log2([t["lr_hidden"] for t in ts])
            ax.errorbar(
                w,
                y,
                yerr=[lo, hi],
                fmt=("o-" if f_["optim"] == "adamw" else "s-")
                if f_["series"] == "mup_hidden"
                else ("o--" if f_["optim"] == "adamw" else "s--"),
                capsize=3,
                ms=4,
                label=f"{f_['optim']} V={f_['V']} {f_['series']}: e={f_['e']:.2f}, s={f_['s']:.2f}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel(ylab)
        ax.set_title("AdamW: muP predicts e = 0, s = 1; LV (V >> width) e = -1/2, s = 1/2", fontsize=8)
        ax.legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=100)
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
