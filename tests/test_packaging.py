"""The package's seams: one version string, an import error that names both torches, and
`lvopt bench` finding its suite (or saying what to do). The built wheel itself is checked by
.ci/check_wheel.py (metadata, installed `lvopt bench`)."""

import os
import re

import pytest
import torch

import lvopt
from lvopt import _ops, bench


def test_one_version_string():
    from lvopt._version import __version__ as base

    assert re.fullmatch(r"\d+\.\d+\.\d+", base)
    assert lvopt.__version__.split("+")[0] == base
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py")) as f:
        setup_py = f.read()
    assert "version=VERSION" in setup_py and re.search(r"\d+\.\d+\.\d+", setup_py.split("setup(", 1)[1]) is None


def test_import_error_names_both_torches():
    built = dict(version="0.1.0+cu128torch2.13.0", torch="2.13.0+cu128", cuda="12.8")
    msg = _ops.native_error_message(ImportError("undefined symbol: _ZN3c10..."), built)
    assert "undefined symbol" in msg
    assert "built for torch 2.13.0+cu128" in msg and f"this is torch {torch.__version__}" in msg
    assert "install torch==2.13.0" in msg
    unknown = _ops.native_error_message(ImportError("x"), {})
    assert "built for torch unknown" in unknown and torch.__version__ in unknown


def test_bench_suite_found_in_checkout():
    d = bench.suite_dir()
    assert os.path.exists(os.path.join(d, "claims.py"))
    assert bench.check_claims([]) == []


def test_bench_without_suite_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "SUITE_DIRS", (str(tmp_path / "a"), str(tmp_path / "b")))
    with pytest.raises(SystemExit, match=r"make wheel.*python -m lvopt bench"):
        bench.suite_dir()
