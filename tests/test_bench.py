"""The bench entry point runs end to end (small sizes, one round): tables, JSON, PNG, claims."""
import json

import pytest

from conftest import needs_native


@needs_native
def test_bench_small(tmp_path, capsys):
    from lvopt import bench

    rc = bench.main(["--size", "small", "--rounds", "1", "--only", "adamw_bf16,adamh",
                     "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "lvopt AdamH" in out and "eager PyTorch AdamH" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    names = {(r["case"], r["name"]) for r in data["results"] if "ms" in r}
    assert ("adamh", "lvopt AdamH") in names and ("adamw_bf16", "torch AdamW fused bf16") in names
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in data["results"] if "ms" in r)
    assert {c["claim"] for c in data["claims"]} >= {"AdamH: >= 3x eager PyTorch AdamH", "bf16: >= 1.15x faster than fp32"}
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_help_and_unknown_command(capsys):
    from lvopt.__main__ import main

    assert main(["--help"]) == 0
    assert main(["nonsense"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--size", "huge"])
