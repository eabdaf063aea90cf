"""lvopt.transfer on synthetic sweeps drawn from known laws (docs/transfer.md has the formulas).

Every sweep comes from a fixed numpy seed. Loss of a run:
    L = E + A·(N/N0)^(−α) + k·(ln lr − ln lr*(N, D))² + seed offset + run noise
with ln lr*(N, D) = c0 + cN·u + cD·v + qN·u² + qD·v², u = ln(N/N0), v = ln(D/D0), on a grid
of LRs a factor √2 apart.
"""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from lvopt import transfer as T

NS = (1e7, 3e7, 1e8, 3e8, 1e9, 3e9)
GRID = np.exp(np.arange(-11.0, -1.99, np.log(2) / 2))  # 4.5e-5 .. 0.14


def gmean(x):
    return float(np.exp(np.mean(np.log(x))))


def true_log_lr(N, D, Ns, Ds, c0=math.log(3e-3), cN=-0.3, cD=0.0, qN=0.0, qD=0.0):
    u, v = math.log(N / gmean(Ns)), math.log(D / gmean(Ds))
    return c0 + cN * u + cD * v + qN * u * u + qD * v * v


def make_sweep(
    rng,
    Ns=NS,
    Ds=(1e9,),
    law=None,
    k=0.05,
    noise=0.003,
    seeds=4,
    param="default",
    E=2.0,
    A=1.0,
    alpha=0.3,
    eff_slope=None,
    grid=GRID,
):
    """Rows of a sweep; with ``eff_slope``, an ``eff_lr`` column = lr·(N/N0)^eff_slope·jitter."""
    law = law or {}
    rows = []
    for N in Ns:
        for D in Ds:
            ustar = true_log_lr(N, D, Ns, Ds, **law)
            Lmin = E + A * (N / gmean(Ns)) ** (-alpha)
            for s in range(seeds):
                off = rng.normal(0, noise)
                for lr in grid:
                    r = {
                        "param": param,
                        "N": N,
                        "D": D,
                        "width": round(math.sqrt(N / 288)),
                        "seed": s,
                        "lr": lr,
                        "loss": Lmin + off + k * (math.log(lr) - ustar) ** 2 + rng.normal(0, noise),
                    }
                    if eff_slope is not None:
                        r["eff_lr"] = lr * (N / gmean(Ns)) ** eff_slope * math.exp(rng.normal(0, 0.01))
                    rows.append(r)
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def inside(ci, x):
    return ci[0] <= x <= ci[1]


# ------------------------------------------------------------------ optimal LR per configuration


def test_optimal_lr_and_bootstrap_interval_cover_the_truth():
    hits, total, widths, curv, errs = 0, 0, [], [], []
    for r in range(6):
        opts = T.optimal_lrs(make_sweep(np.random.default_rng(10 + r), noise=0.01), n_boot=100, seed=r)
        assert len(opts) == len(NS)
        for o in opts:
            t = true_log_lr(o.N, o.D, NS, (1e9,))
            assert o.usable and o.n_seeds == 4
            errs.append(abs(o.log_x - t) / o.se_log)
            hits += inside(o.ci, math.exp(t))
            total += 1
            widths.append(math.log(o.ci[1] / o.ci[0]))
            curv.append(o.curvature)
            assert abs(o.loss - (2.0 + (o.N / gmean(NS)) ** -0.3)) < 0.02
    # 95% intervals with 4 seeds cover ~88% (docs/transfer.md); they must not be vacuous either
    assert hits / total >= 0.75, hits / total
    assert np.median(widths) < 0.5
    # the error in units of the bootstrap standard deviation: |z| has median 0.67 if calibrated
    assert 0.3 < np.median(errs) < 1.2, np.median(errs)
    assert abs(np.mean(curv) - 0.05) < 0.005


def test_bootstrap_interval_narrows_with_more_seeds():
    def width(seeds):
        opts = T.optimal_lrs(make_sweep(np.random.default_rng(3), noise=0.01, seeds=seeds), n_boot=100)
        return np.median([math.log(o.ci[1] / o.ci[0]) for o in opts])

    assert width(16) < 0.7 * width(3)


def test_edge_optimum_is_flagged_and_left_out_of_the_law():
    rows = make_sweep(np.random.default_rng(4), grid=GRID[GRID < 4e-3], seeds=2)
    opts = T.optimal_lrs(rows, n_boot=20)
    edge = {o.N: o.edge for o in opts}
    # the grid now ends at 3.0e-3: lr*(1e7) ≈ 7.1e-3 and lr*(3e7) ≈ 5.0e-3 lie above it,
    # lr*(1e9) ≈ 1.8e-3 and lr*(3e9) ≈ 1.3e-3 well inside
    assert edge[1e7] and edge[3e7] and not edge[1e9] and not edge[3e9]
    law = T.fit_lr_law(opts, "linear")
    assert len(law.y) == sum(not e for e in edge.values())


def test_role_lrs_follow_the_swept_lr_or_stay_fixed():
    rows = make_sweep(np.random.default_rng(5), Ns=NS[:3], seeds=2)
    for r in rows:
        r["lr_embedding"] = 4 * r["lr"]
        r["lr_vector"] = 1e-3
    for o in T.optimal_lrs(rows, n_boot=10):
        assert o.roles["embedding"] == pytest.approx(4 * o.x)
        assert o.roles["vector"] == pytest.approx(1e-3)


def test_inputs_rows_columns_and_csv_agree_and_diverged_runs_are_dropped(tmp_path):
    rows = make_sweep(np.random.default_rng(21), Ns=NS[:3], seeds=2)
    for r in rows:
        if r["lr"] > 0.05:
            r["loss"] = math.inf if r["seed"] == 0 else math.nan  # diverged runs
    write_csv(tmp_path / "s.csv", rows)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    a, b, c = (T.optimal_lrs(x, n_boot=10) for x in (rows, cols, str(tmp_path / "s.csv")))
    n_kept = sum(math.isfinite(r["loss"]) for r in rows) // 3
    assert n_kept < len(rows) // 3 and [o.n_rows for o in a] == [n_kept] * 3
    assert [o.log_x for o in a] == [o.log_x for o in b] == pytest.approx([o.log_x for o in c], abs=1e-12)
    assert [o.ci for o in a] == [o.ci for o in b]


# ------------------------------------------------------------------ LR scaling laws


def test_linear_law_recovers_known_coefficients_in_n_and_d():
    Ds = (1e9, 4e9, 1.6e10)
    law_true = {"c0": math.log(3e-3), "cN": -0.3, "cD": -0.12}
    opts = T.optimal_lrs(make_sweep(np.random.default_rng(6), Ds=Ds, law=law_true, noise=0.01), n_boot=20)
    law = T.fit_lr_law(opts, "linear", ("N", "D"), refs={"N": gmean(NS), "D": gmean(Ds)})
    assert law.names == ["c0", "cN", "cD"]
    for name, value in law_true.items():
        assert inside(law.ci[name], value), (name, law.ci[name], value)
        assert abs(law.coef[law.names.index(name)] - value) < 0.05
    assert law.r2 > 0.99
    # the interval is informative: it excludes a slope 0.1 away
    assert not inside(law.ci["cN"], -0.2) and not inside(law.ci["cD"], -0.02)


def _curved_law(rng, qN, noise=0.003):
    opts = T.optimal_lrs(make_sweep(rng, law={"qN": qN}, noise=noise), n_boot=5)
    lin = T.fit_lr_law(opts, "linear")
    quad = T.fit_lr_law(opts, "quadratic")
    return lin, quad, T.curvature_test(lin, quad)


def test_curvature_detected_when_present():
    covered = 0
    for r in range(8):
        lin, quad, ct = _curved_law(np.random.default_rng(20 + r), qN=0.05)
        assert quad.names == ["c0", "cN", "qN"]
        assert ct["curved"] and ct["excludes_zero"] == ["qN"] and ct["p"] < 0.01
        assert abs(quad.coef[2] - 0.05) < 0.01
        covered += inside(quad.ci["qN"], 0.05) + inside(quad.ci["cN"], -0.3)
    assert covered >= 14  # of 16 95% intervals


def test_curvature_not_detected_when_absent():
    flagged = 0
    for r in range(8):
        lin, quad, ct = _curved_law(np.random.default_rng(40 + r), qN=0.0)
        flagged += ct["curved"]
        assert abs(quad.coef[2]) < 0.01
    # 95% intervals: about 0.4 false alarms expected in 8; 2 or more would be a broken interval
    assert flagged <= 1


def test_effective_lr_law_has_its_own_slope():
    # eff = lr·(N/N0)^(−0.5): the optimal effective LR scales with slope cN − 0.5
    opts = T.optimal_lrs(make_sweep(np.random.default_rng(7), noise=0.01, eff_slope=-0.5), x_col="eff_lr", n_boot=5)
    assert opts[0].x_col == "eff_lr"
    law = T.fit_lr_law(opts, "linear")
    assert inside(law.ci["cN"], -0.8) and not inside(law.ci["cN"], -0.3)
    # eff = lr·(N/N0)^(+0.3) cancels the raw slope: the optimal effective LR transfers unchanged
    rows = make_sweep(np.random.default_rng(8), noise=0.01, eff_slope=0.3)
    raw = T.fit_lr_law(T.optimal_lrs(rows, n_boot=5), "linear")
    eff = T.fit_lr_law(T.optimal_lrs(rows, x_col="eff_lr", n_boot=5), "linear")
    assert not inside(raw.ci["cN"], 0.0) and inside(eff.ci["cN"], 0.0)


def test_extrapolation_interval_covers_the_true_optimum():
    target = 3e10  # 10x beyond the largest sweep scale
    truth = true_log_lr(target, 1e9, NS, (1e9,))
    hits = 0
    for r in range(6):
        opts = T.optimal_lrs(make_sweep(np.random.default_rng(60 + r), noise=0.01), n_boot=5)
        law = T.fit_lr_law(opts, "linear")
        p = law.predict(target, 1e9)
        hits += inside(p["pi"], math.exp(truth))
        assert p["pi"][0] < p["ci"][0] <= p["x"] <= p["ci"][1] < p["pi"][1]
        assert abs(p["log_x"] - truth) < 3 * p["se_pred"]
    assert hits >= 5


def test_choose_axis_and_slices():
    Ds = (1e9, 4e9, 1.6e10)
    opts = T.optimal_lrs(make_sweep(np.random.default_rng(9), Ds=Ds, law={"cD": -0.1}, seeds=2), n_boot=5)
    assert T.choose_axis(opts, 3e10, 4e9) == "N"
    assert T.choose_axis(opts, 1e8, 1e12) == "D"
    assert T.choose_axis(opts, 3e10, 1e12) == "ND"
    assert T.choose_axis(opts, 1e8, 4e9) == "ND"
    one_d = [o for o in opts if o.D == 1e9]
    assert T.choose_axis(one_d, 1e8, 1e12) == "N"
    assert {o.D for o in T.select_slice(opts, "D", 1.2e10)} == {1.6e10}
    law = T._law_for_axis(opts, "N", 3e10, 1.2e10, "linear", 0.95)
    assert law.variables == ("N",) and set(law.D) == {1.6e10}
    law = T._law_for_axis(opts, "D", 2e8, 1e12, "linear", 0.95)
    assert law.variables == ("D",) and set(law.N) == {3e8}
    assert inside(law.ci["cD"], -0.1)


def test_unidentified_law_is_an_error():
    opts = T.optimal_lrs(make_sweep(np.random.default_rng(11), Ns=NS[:2], seeds=2), n_boot=5)
    with pytest.raises(ValueError, match="not identified"):
        T.fit_lr_law(opts, "quadratic")


# ------------------------------------------------------------------ metrics


def test_fit_quality_metrics_move_in_the_documented_direction():
    lin, quad, _ = _curved_law(np.random.default_rng(12), qN=0.05, noise=0.003)
    assert quad.r2 > lin.r2 and quad.loso < 0.5 * lin.loso
    clean = T.fit_lr_law(T.optimal_lrs(make_sweep(np.random.default_rng(13), noise=0.002), n_boot=5))
    noisy = T.fit_lr_law(T.optimal_lrs(make_sweep(np.random.default_rng(13), noise=0.03), n_boot=5))
    assert clean.r2 > noisy.r2 and clean.loso < noisy.loso
    assert clean.loso_n == len(NS)


def test_robustness_penalty_formula_and_direction():
    opts = T.optimal_lrs(make_sweep(np.random.default_rng(14), noise=0.01), n_boot=5)
    law = T.fit_lr_law(opts)
    near = T.extrapolation_penalty(law, opts, 6e9, 1e9)
    far = T.extrapolation_penalty(law, opts, 1e11, 1e9)
    c3e9 = [o.curvature for o in opts if o.N == 3e9][0]
    assert near["curvature"] == far["curvature"] == c3e9
    assert near["penalty"] == pytest.approx(c3e9 * law.predict(6e9, 1e9)["se_pred"] ** 2)
    assert near["penalty_loso"] == pytest.approx(c3e9 * law.loso**2)
    assert far["penalty"] > near["penalty"]  # farther extrapolation, larger expected error
    sharp = [dataclasses.replace(o, curvature=3 * o.curvature) for o in opts]
    assert T.extrapolation_penalty(law, sharp, 6e9, 1e9)["penalty"] == pytest.approx(3 * near["penalty"])
    noisy_opts = T.optimal_lrs(make_sweep(np.random.default_rng(14), noise=0.04), n_boot=5)
    noisy = T.extrapolation_penalty(T.fit_lr_law(noisy_opts), noisy_opts, 6e9, 1e9)
    assert noisy["penalty"] > near["penalty"]  # noisier optima, less robust extrapolation


def _loss_law(rng, **kw):
    return T.fit_loss_law(T.optimal_lrs(make_sweep(rng, noise=0.003, seeds=2, **kw), n_boot=5))


def test_loss_law_and_asymptotic_penalty():
    a = _loss_law(np.random.default_rng(15), param="a")
    assert inside(a.ci["E"], 2.0) and inside(a.ci["alpha"], 0.3) and abs(a.E - 2.0) < 0.05
    worse = _loss_law(np.random.default_rng(16), param="worse", E=2.08)
    slower = _loss_law(np.random.default_rng(17), param="slower", A=1.3)
    pen = T.asymptotic_penalty({"a": a, "worse": worse, "slower": slower}, at=3e10)
    ref = pen["a"]["reference"]  # a and slower share E = 2: either may fit lower
    assert ref in ("a", "slower") and pen[ref]["dE"] == 0 and pen[ref]["ci"] == (0.0, 0.0)
    assert pen["worse"]["dE"] > 0 and pen["worse"]["ci"][0] > 0 and inside(pen["worse"]["ci"], 0.08)
    # same limit, slower approach: no asymptotic penalty, but a finite-scale gap at the target
    s = T.asymptotic_penalty({"a": a, "slower": slower}, reference="a", at=3e10)["slower"]
    assert inside(s["ci"], 0.0) and s["dL_at"] > 0
    assert pen[ref]["dE"] == 0


def test_loss_law_needs_four_scales():
    opts = T.optimal_lrs(make_sweep(np.random.default_rng(18), Ns=NS[:3], seeds=2), n_boot=5)
    with pytest.raises(ValueError, match="4 or more"):
        T.fit_loss_law(opts)


# ------------------------------------------------------------------ CLI


def _cli_sweep(path):
    rng = np.random.default_rng(19)
    Ds = (1e9, 4e9)
    rows = make_sweep(rng, Ds=Ds, law={"cD": -0.1}, seeds=2, param="mup", eff_slope=-0.5) + make_sweep(
        rng, Ds=Ds, law={"cN": -0.6, "cD": -0.1}, seeds=2, param="sp", E=2.06, eff_slope=-0.5
    )
    write_csv(path, rows)
    return rows


def test_cli_end_to_end(tmp_path, capsys):
    sweep = tmp_path / "sweep.csv"
    _cli_sweep(sweep)
    out = tmp_path / "out"
    rc = T.main([str(sweep), "--out", str(out), "--target", "N=3e10,D=4e9", "--bootstrap", "20"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[mup] lr:" in printed and "[sp] eff_lr:" in printed and "asymptotic penalty" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_col"] == "lr" and summary["eff_col"] == "eff_lr"
    for p, slope in (("mup", -0.3), ("sp", -0.6)):
        e = summary["params"][p]["lr"]
        assert e["axis"] == "N" and len(e["optima"]) == 12 and not e["excluded"]
        lin = e["laws"]["linear"]
        assert lin["variables"] == ["N"] and abs(lin["coef"]["cN"] - slope) < 0.05
        assert {"x", "pi", "ci"} <= set(lin["target"]) and lin["robustness"]["penalty"] > 0
        assert "curvature_test" in e
        assert abs(summary["params"][p]["eff_lr"]["laws"]["linear"]["coef"]["cN"] - (slope - 0.5)) < 0.05
    assert summary["asymptotic_penalty"]["sp"]["dE"] > 0.02
    with open(out / "optima.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 12
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "loss_law.png",
        "loss_vs_lr_mup_eff_lr.png",
        "loss_vs_lr_mup_lr.png",
        "loss_vs_lr_sp_eff_lr.png",
        "loss_vs_lr_sp_lr.png",
        "lr_law_mup_eff_lr.png",
        "lr_law_mup_lr.png",
        "lr_law_sp_eff_lr.png",
        "lr_law_sp_lr.png",
    ]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert sorted(map(os.path.basename, summary["files"])) == sorted(pngs + ["optima.csv", "summary.json"])


def test_cli_bad_input_fails_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    write_csv(bad, [{"N": 1e7, "D": 1e9, "lr": 1e-3, "loss": 3.0}])
    assert T.main([str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main([str(bad), "--target", "N=1e9"])


def test_python_m_lvopt_transfer_dispatches(tmp_path):
    sweep = tmp_path / "sweep.csv"
    _cli_sweep(sweep)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lvopt",
            "transfer",
            str(sweep),
            "--out",
            str(out),
            "--bootstrap",
            "5",
            "--no-plots",
            "--eff-col",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "summary.json").exists() and not list(out.glob("*.png"))
    assert json.loads((out / "summary.json").read_text())["eff_col"] is None
