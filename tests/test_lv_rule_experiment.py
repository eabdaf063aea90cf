"""The LV-rule experiment's runner and analysis stay runnable (experiments/lv_rule)."""
import csv
import importlib.util
import math
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "lv_rule")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"lv_rule_{name}", os.path.join(EXP, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runner_micro_sweep_is_resumable(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog while options buffers windows and help text".split()
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"f{i}.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(40)))
    run = _load("run")
    out = tmp_path / "runs.csv"
    args = ["--preset", "smoke", "--corpus", str(corpus), "--out", str(out), "--cache", str(tmp_path / "c"),
            "--max-chars", "100000"]
    assert run.main(args) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert {float(r["lr_embedding"]) for r in rows} == {run.EMB_LR0, run.EMB_LR0 * 2}
    assert run.main(args) == 0                     # resumed: nothing to do, nothing appended
    assert len(list(csv.DictReader(open(out)))) == 2


def test_analysis_recovers_a_known_slope(tmp_path):
    pytest.importorskip("scipy")
    an = _load("analyze")
    rows = []
    for optim in ("adamw",):
        for V, s_true in ((128, 1.0), (8192, 0.5)):
            for w in (32, 64, 128):
                h = 1e-2 * 32 / w
                opt = h * 2 ** (3 + s_true * math.log2(w / 32))
                for seed in (0, 1):
                    for k in range(-3, 4):
                        lr = opt * 2 ** (k / 2)
                        loss = 3 + 0.05 * math.log(lr / opt) ** 2 + 0.001 * np.sin(seed + k)
                        rows.append(dict(optim=optim, width=w, V=V, seed=seed, k=k, lr_embedding=lr,
                                         lr_hidden=h, N=w * V, D=1000, steps=10, train_loss=loss,
                                         loss=loss, seconds=0))
    p = tmp_path / "runs.csv"
    with open(p, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    res = an.analyze(str(p), str(tmp_path / "res"), n_boot=20, plots=False)
    got = {f["V"]: f["s"] for f in res["slopes"] if f["configs"] == "usable"}
    assert got[128] == pytest.approx(1.0, abs=0.05) and got[8192] == pytest.approx(0.5, abs=0.05)
    assert os.path.exists(tmp_path / "res" / "results.md")
