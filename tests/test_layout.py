"""lvopt/_layout.py mirrors the native headers: every constant there equals its C++ counterpart
(parsed from csrc/include/lvopt/*.h), and the Python side takes the layout from that one module."""

import pathlib
import re

import pytest

from lvopt import _layout

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADERS = ROOT / "csrc" / "include" / "lvopt"


def _cpp_value(header: str, name: str) -> float:
    text = (HEADERS / header).read_text()
    # An enumerator (`kLr = 0,`) or a constexpr (`constexpr double kSeriesLimit = 1e2;`).
    found = re.findall(rf"\b{name}\s*=\s*([-+0-9.eE]+)\s*[,;]", text)
    assert len(found) == 1, f"{name} is declared {len(found)} times in {header}"
    return float(found[0])


@pytest.mark.parametrize("py_name", sorted(_layout.CPP_NAMES))
def test_constant_matches_header(py_name):
    header, cpp_name = _layout.CPP_NAMES[py_name]
    assert getattr(_layout, py_name) == _cpp_value(header, cpp_name), (py_name, header, cpp_name)


def test_every_layout_constant_is_checked():
    names = {n for n in vars(_layout) if n.isupper() and n != "CPP_NAMES"}
    assert names == set(_layout.CPP_NAMES)


def test_hyper_and_history_columns_are_a_partition():
    hyper = [_layout.LR, _layout.BETA1, _layout.BETA2, _layout.WEIGHT_DECAY, _layout.EPS, _layout.MAXIMIZE]
    assert sorted(hyper) == list(range(_layout.HYPER_COLS))
    hist = [_layout.H_LR, _layout.H_DECAY, _layout.H_LOGPI, _layout.H_U, _layout.H_SQRTBC2]
    assert sorted(hist) == list(range(_layout.H_SERIES))
    assert _layout.H_SERIES + _layout.HIST_SERIES == _layout.HIST_COLS


def test_layout_has_one_home():
    """No module but lvopt/_layout.py assigns a layout constant (the reference, the oracle, and the
    Triton host code import it; nothing declares its own copy)."""
    names = "|".join(sorted(_layout.CPP_NAMES, key=len, reverse=True))
    pattern = re.compile(rf"^\s*(?:{names})(?:\s*,\s*(?:{names}))*\s*=", re.M)
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "lvopt").rglob("*.py"))
        if p.name != "_layout.py" and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_triton_nonfinite_scan_is_not_the_reference():
    from lvopt import reference
    from lvopt.triton import _common

    assert _common.nonfinite_scan_ is not reference.nonfinite_scan_
