"""Shared by tests/test_triton_*.py. The Triton tests run where the kernels can run: on CUDA
tensors when a GPU is present, and on CPU tensors under the interpreter otherwise. The
interpreter must be chosen before triton is imported, and this pytest process has already
imported it (lvopt.build_info()), so without a GPU each test file re-runs itself in a child
pytest with TRITON_INTERPRET=1 (one child per file, a few seconds of start-up)."""
import os
import subprocess
import sys

import pytest
import torch

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"


def triton_device():
    """The device the Triton kernels are tested on in this process, or None."""
    if IN_CHILD:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return None


def run_file_under_interpreter(path):
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(path), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-3000:]
