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


def test_synthetic_sweep_smoke_is_resumable(tmp_path):
    run = _load("run")
    out = tmp_path / "runs.csv"
    assert run.main(["--preset", "smoke", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert list(rows[0]) == run.FIELDS
    assert run.main(["--preset", "smoke", "--out", str(out)]) == 0    # resumed: nothing appended
    assert len(list(csv.DictReader(open(out)))) == 2


def test_synthetic_task_does_not_change_with_V():
    """The Bayes loss is the same at every V, and the sampled next classes follow T."""
    run = _load("run")
    small, large = run.Task(16), run.Task(4096)
    assert small.bayes == large.bayes
    import torch
    x, row, y = large.sample(200_000, torch.Generator().manual_seed(0))
    assert int(x.max()) < 4096 and torch.equal(x[:, 0] % run.K * run.K + x[:, 1] % run.K, row)
    assert x.unique().numel() > 1000      # a batch has many more distinct tokens than a width
    emp = torch.bincount(row * run.K + y, minlength=run.K ** 3).reshape(run.K ** 2, run.K).double()
    emp = emp / emp.sum(1, keepdim=True).clamp_min(1)
    err = (emp - large.T).abs().mean()
    assert err < 0.01 and err < 0.3 * (emp - large.T[torch.randperm(run.K ** 2)]).abs().mean()


def test_gpu_lm_smoke_on_cpu(tmp_path, monkeypatch):
    """experiments/lv_rule/gpu_lm.py runs on the CPU at a tiny size and streams to $OUT."""
    gpu = _load("gpu_lm")
    monkeypatch.setenv("OUT", str(tmp_path / "gpu-out"))
    assert gpu.main(["--preset", "smoke", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "gpu-out" / "runs.csv")))
    assert len(rows) == 4 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert {int(r["V"]) for r in rows} == {32, 256}
    assert "Bayes loss" in (tmp_path / "gpu-out" / "gpu_lm.log").read_text()
    lang = gpu.Language(32, __import__("torch").device("cpu"))
    assert lang.bayes < math.log(32)


def test_corpus_runner_micro_sweep_is_resumable(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog while options buffers windows and help text".split()
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"f{i}.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(40)))
    run = _load("corpus")
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
    rng = np.random.default_rng(0)
    for V, s_true in ((16, 1.0), (65536, 0.5)):
        for w in (32, 64, 128, 256):
            h = 1e-2 * 32 / w
            opt = h * 2 ** (3 + s_true * math.log2(w / 32))
            for seed in (0, 1, 2):
                for k in range(-3, 4):
                    lr = opt * 2 ** (k / 2 + 0.1)
                    loss = 3 + 0.05 * math.log(lr / opt) ** 2 + 0.01 * seed + 0.0005 * rng.normal()
                    rows.append(dict(optim="adamw", width=w, V=V, seed=seed, k=k, lr_embedding=lr,
                                     lr_hidden=h, N=w * V, D=1000, steps=10, train_loss=loss,
                                     loss=loss - 0.01 * math.log2(w), seconds=0))
    p = tmp_path / "runs.csv"
    with open(p, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    res = an.analyze(str(p), str(tmp_path / "res"), n_boot=200, plots=False)
    got = {f["V"]: f for f in res["slopes"]}
    assert got[16]["s"] == pytest.approx(1.0, abs=0.05) and got[65536]["s"] == pytest.approx(0.5, abs=0.05)
    assert got[65536]["e"] == pytest.approx(-0.5, abs=0.05)
    assert got[16]["ci_boot"][0] < 1.0 < got[16]["ci_boot"][1]
    assert all(f["all_bracketed"] and f["wider_is_better"] for f in got.values())
    (d,) = res["delta_s"]
    assert d["ds"] == pytest.approx(0.5, abs=0.07) and d["ci_boot"][0] < 0.5 < d["ci_boot"][1]
    assert os.path.exists(tmp_path / "res" / "results.md")
