"""The bench entry point runs end to end (small sizes, one round): tables, JSON, PNG, claims."""

import json

import pytest

from conftest import needs_native


@needs_native
def test_bench_small(tmp_path, capsys):
    from lvopt import bench

    rc = bench.main(
        ["--size", "small", "--rounds", "1", "--only", "adamw_bf16,adamh", "--out", str(tmp_path), "--no-progress"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "lvopt AdamH" in out and "eager PyTorch AdamH" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["stream_gbps"] > 0 and data["copy_gbps"] > 0
    names = {(r["case"], r["name"]) for r in data["results"] if "ms" in r}
    assert ("adamh", "lvopt AdamH") in names and ("adamw_bf16", "torch AdamW fused bf16") in names
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in data["results"] if "ms" in r)
    assert {c["claim"] for c in data["claims"]} >= {
        "AdamH: >= 3x eager PyTorch AdamH",
        "bf16: >= 1.15x faster than fp32",
    }
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_help_and_unknown_command(capsys):
    from lvopt.__main__ import main

    assert main(["--help"]) == 0
    assert main(["nonsense"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--size", "huge"])


@pytest.mark.parametrize(
    "case,subject,other,ratio,met",
    [
        ("adamh", "lvopt AdamH", "lvopt AdamW (same matrix)", 2.0, False),
        ("adamh", "lvopt AdamH", "lvopt AdamW (same matrix)", 1.5, True),
        ("sparse_rows", "lvopt exact", "lvopt lazy", 1.72, False),
        ("sparse_rows", "lvopt exact", "lvopt lazy", 1.4, True),
        ("adamw_1x", "lvopt AdamW track=True", "lvopt AdamW", 1.06, False),
        ("adamw_1x", "lvopt AdamW track=True", "lvopt AdamW", 1.03, True),
        ("adamw_1x", "lvopt AdamW", "torch AdamW fused", 1 / 1.02, False),
        ("adamw_1x", "lvopt AdamW", "torch AdamW fused", 1 / 1.10, True),
    ],
)
def test_claims_are_checked_in_the_right_direction(case, subject, other, ratio, met):
    """ms(subject) = ratio * ms(other): "at most 1.6x slower" claims must miss at 2x (a tuple
    with the contenders swapped would pass it), "at least 1.05x faster" must miss at 1.02x."""
    from lvopt.bench import check_claims

    rows = [dict(case=case, name=subject, ms=100.0 * ratio), dict(case=case, name=other, ms=100.0)]
    claims = [c for c in check_claims(rows)]
    assert claims and all(c["met"] is met for c in claims), claims


@needs_native
def test_gpu_bench_runs_on_cpu_paths_and_without_a_gpu(capsys):
    """benchmarks/bench_gpu.py times every op (dense AdamW/AdamH, sparse exact/lazy on raw and
    merged gradients) against its baselines; --device cpu runs that code here. `python -m lvopt
    bench --device cuda` without a GPU says so and succeeds."""
    import os
    import sys

    import torch
    from lvopt import bench

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_gpu

    rows = bench_gpu.run("cpu", "small")
    impls = {(r["case"].split(":")[0].split(" V=")[0], r["impl"]) for r in rows}
    for be_mode in ("exact", "lazy"):
        for kind in ("raw COO", "merged"):
            assert ("sparse rows", f"lvopt cpu {be_mode} ({kind})") in impls
    assert {
        ("sparse rows", "torch SparseAdam (raw COO)"),
        ("sparse rows", "torch fused AdamW (dense V x d grad)"),
        ("1M fp32", "lvopt cpu adamh"),
        ("mixed bf16", "torch foreach AdamW"),
    } <= impls
    assert all(r["ms"] > 0 and 0 < r["frac"] for r in rows)
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert bench.main(["--device", "cuda", "--size", "small"]) == 0
        assert "no CUDA device here" in capsys.readouterr().out


def test_floor_kernels_move_the_steps_bytes(capsys):
    """benchmarks/studies/floor_sparse_rows.py's floor is only a floor of *this* step if its kernels do
    the step's traffic: every distinct row's gradient rows summed and its p, m, v rows read and
    written, nothing else. One add per element makes that checkable: m and v gain the coalesced
    gradient on the batch's rows and on no other row, for both orders (grouped by row, streamed)."""
    import os
    import sys

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "studies"))
    import floor_sparse_rows as floor

    mod = floor._module()
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    V, d, n = 300, 40, 500
    ids = torch.randint(0, 60, (n,), generator=gen) ** 2 % V  # duplicates and untouched rows
    vals = torch.randn(n, d, generator=gen)
    summed = torch.zeros(V, d, dtype=torch.float64).index_add_(0, ids, vals.double())
    touched = torch.zeros(V, dtype=torch.bool)
    touched[ids] = True
    rows, offsets, perm = floor.plan(ids)
    slot = torch.unique(ids, sorted=True, return_inverse=True)[1]
    for name, call in [
        ("touch", lambda p, m, v: mod.touch(rows, offsets, perm, vals, p, m, v, 2)),
        (
            "touch_streamed",
            lambda p, m, v: mod.touch_streamed(rows, slot, vals, torch.empty(rows.numel(), d), p, m, v, 2),
        ),
    ]:
        p, m, v = (torch.randn(V, d, generator=gen) for _ in range(3))
        p0, m0, v0 = p.clone(), m.clone(), v.clone()
        call(p, m, v)
        for after, before in ((m, m0), (v, v0)):
            gained = (after - before).double()
            assert torch.allclose(gained, summed, atol=1e-4), name
        assert torch.equal(p[~touched], p0[~touched]) and torch.equal(m[~touched], m0[~touched]), name
    floor.run(reps=1, size="small")
    out = capsys.readouterr().out
    assert "touch zipf" in out and "fused AdamW / floor time" in out


def test_gpu_profile_runs_on_cpu_paths(capsys):
    """benchmarks/profile_gpu.py (the next GPU lease's first look at where the Triton and sparse
    steps spend their time) runs its code on the CPU backend: every target, a sane summary."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import profile_gpu

    res = profile_gpu.profile("cpu", "small", steps=2)
    assert set(res) == {"cpu adamw, 24 tensors", "cpu sparse exact, raw COO", "cpu sparse lazy, raw COO"}
    assert all(0 < r["host"] <= r["wall"] * 1.5 and r["device"] == 0.0 for r in res.values())
    assert "summary (ms per step)" in capsys.readouterr().out


@needs_native
def test_cpu_cost_study_times_real_steps(capsys):
    """benchmarks/studies/cpu_cost_per_element.py's in-cache column passes one small state ``copies``
    times in one op call and divides by ``copies``: that is only the cost of one element's step if
    the op really steps the state ``copies`` times. With one thread (the column's setting), one
    call on 3 copies must leave m and v as three calls on one copy do, for every row; then the
    script runs end to end at a tiny size and prints every row at every vector level."""
    import os
    import sys

    import torch

    import lvopt

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "studies"))
    import cpu_cost_per_element as study

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 1000 + int(torch.randint(0, 1000, ()))
        once, thrice = study.rows(n, 3), study.rows(n, 1)
        for name in once:
            once[name]()
            for _ in range(3):
                thrice[name]()
        for name in once:
            a, b = study.state_of(once[name]), study.state_of(thrice[name])
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{name}")
            assert not torch.equal(a[0], study.state_of(study.rows(n, 1)[name])[0]), name  # m was stepped
    finally:
        torch.set_num_threads(threads)
    study.main(["--rounds", "1", "--big", "4096"])
    out = capsys.readouterr().out
    for level in lvopt.cpu_isa_levels():
        if level != "baseline":
            assert f"\n{level}:" in out
    assert all(out.count(row) == len([x for x in lvopt.cpu_isa_levels() if x != "baseline"]) for row in once)
