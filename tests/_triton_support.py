"""Shared by the Triton-only test files (tests/test_triton_capturable.py,
tests/test_triton_fast_step.py, tests/test_sparse_capture.py; the per-op-family files use
conftest's ``backend`` fixture and run_triton_child). The
Triton tests run where the kernels can run: on CUDA tensors when a GPU is present, and on CPU
tensors under the interpreter otherwise. The interpreter must be chosen before triton is
imported, and this pytest process has already imported it (lvopt.build_info()), so without a GPU
each test file re-runs itself in a child pytest with TRITON_INTERPRET=1 (one child per file, a
few seconds of start-up)."""

import os

import torch

from conftest import run_under_interpreter

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"


def triton_device():
    """The device the Triton kernels are tested on in this process, or None."""
    if IN_CHILD:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return None


def run_file_under_interpreter(path):
    run_under_interpreter(path)
