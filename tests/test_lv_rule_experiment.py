"""experiments/lv_rule: the sweep runner on a micro configuration (a slice of the corpus, a few
steps) and the analysis on a synthetic sweep whose optimum follows a known width law, so that
the code behind REPORT.md cannot rot. The real sweep is `make experiment` (not in CI)."""
import csv
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments", "lv_rule"))


def test_runner_micro_and_resume(tmp_path):
    import run

    try:
        run.corpus_files()
    except SystemExit as e:
        pytest.skip(str(e))
    out = str(tmp_path)
    assert run.main(["--preset", "micro", "--out", out, "--max-chars", "100000"]) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
    assert len(rows) == 4 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert {float(r["lr_embedding"]) for r in rows} == {3e-3, 6e-3}
    # hidden LR at its muP scaling: base_lr * 32 / width
    assert all(math.isclose(float(r["lr_hidden"]), 3e-3 * 32 / int(r["width"])) for r in rows)
    assert run.main(["--preset", "micro", "--out", out, "--max-chars", "100000"]) == 0  # resumes: nothing to do
    assert len(list(csv.DictReader(open(os.path.join(out, "runs.csv"))))) == 4


@pytest.mark.parametrize("true_slope", [0.5, 1.0])
def test_analysis_recovers_a_known_slope(tmp_path, true_slope):
    """Loss = (ln lr_emb - ln lr*(w))^2 + noise with lr*(w) = lr_hidden(w) * c * w^s."""
    import random

    import analyze

    rnd = random.Random(0)
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["optimizer", "V", "width", "k", "seed", "lr_embedding", "lr_hidden",
                                           "lr_output", "N", "D", "loss", "train_loss", "seconds", "param"])
        wr.writeheader()
        for w in (32, 64, 128, 256):
            hidden = 3e-3 * 32 / w
            opt = hidden * 0.5 * w ** true_slope
            for seed in (0, 1, 2):
                for k in range(-6, 20):
                    lr = 3e-3 * 2 ** (k / 2)
                    loss = 3.0 + 0.2 * (math.log(lr) - math.log(opt)) ** 2 + rnd.gauss(0, 0.002)
                    wr.writerow(dict(optimizer="adamw", V=4096, width=w, k=k, seed=seed, lr_embedding=lr,
                                     lr_hidden=hidden, lr_output=hidden, N=w * 1000, D=1e5, loss=loss,
                                     train_loss=loss, seconds=0, param="adamw-V4096"))
    slopes = analyze.analyze(str(path), str(tmp_path), n_boot=50)
    r = slopes["adamw-V4096"]
    assert r["points"] == 4
    assert r["ci"][0] <= true_slope <= r["ci"][1], r
    assert abs(r["slope"] - true_slope) < 0.1, r
    assert os.path.exists(tmp_path / "ratio_vs_width.png") and os.path.exists(tmp_path / "slopes.md")
