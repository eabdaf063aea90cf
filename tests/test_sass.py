"""Static evidence from the sm_90 SASS (benchmarks/sass_report.py): every streaming kernel,
CUDA and Triton, moves data with 128-bit global loads and stores, and no kernel spills to
local memory. Needs nvcc (or a CUDA-built lvopt._C) and Triton's cuobjdump; no GPU."""

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _why_not():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (its cuobjdump and compiler are needed)"
    import sass_report

    try:
        sass_report.tool("cuobjdump")
    except FileNotFoundError as e:
        return str(e)
    if not (sass_report.nvcc() or sass_report._extension_so()):
        return "no nvcc and no CUDA-built lvopt._C: the CUDA kernels cannot be compiled here"
    return None


def test_sass_has_128bit_access_and_no_spills():
    why = _why_not()
    if why:
        pytest.skip(why)
    import sass_report

    kernels, _ = sass_report.collect()
    names = {(k["origin"], k["name"]) for k in kernels}
    for origin, name in [
        ("CUDA", "adamw_kernel<float>"),
        ("CUDA", "adamw_kernel<bf16>"),
        ("CUDA", "adamh_reduce_kernel<float>"),
        ("CUDA", "adamh_apply_kernel<bf16>"),
        ("Triton", "adamw_kernel<fp32>"),
        ("Triton", "adamh_reduce_kernel<bf16>"),
    ]:
        assert (origin, name) in names, sorted(names)
    assert sass_report.check(kernels) == []
    for k in kernels:
        assert k["regs"] and k["regs"] <= 128, k
