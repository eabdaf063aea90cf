import os
import subprocess
import sys

import pytest
import torch

import lvopt
from lvopt.reference import HYPER_COLS

NATIVE = lvopt.build_info()["native"]
needs_native = pytest.mark.skipif(not NATIVE, reason="lvopt._C not built")


def make_hyper(n, lr=1e-2, betas=(0.9, 0.999), wd=0.1, eps=1e-8, maximize=False, gen=None):
    """A per-tensor hyperparameter table; with ``gen``, every row gets its own random values."""
    rows = []
    for _ in range(n):
        if gen is None:
            rows.append([lr, betas[0], betas[1], wd, eps, float(maximize)])
        else:
            u = torch.rand(5, generator=gen, dtype=torch.float64).tolist()
            rows.append([10 ** (-4 + 3 * u[0]), 0.8 + 0.19 * u[1], 0.9 + 0.0999 * u[2], wd * u[3],
                         10 ** (-10 + 4 * u[4]), float(maximize)])
    return torch.tensor(rows, dtype=torch.float64).reshape(n, HYPER_COLS)


def make_state(shapes, dtype, gen, steps=0):
    """Fresh random (never zero) params, grads and plausible moments."""
    ps, gs, ms, vs, ss = [], [], [], [], []
    for s in shapes:
        ps.append(torch.randn(s, generator=gen).to(dtype))
        gs.append(torch.randn(s, generator=gen).to(dtype))
        ms.append(0.1 * torch.randn(s, generator=gen))
        vs.append(0.01 * torch.rand(s, generator=gen) + 1e-6)
        ss.append(torch.tensor(float(steps)))
    return ps, gs, ms, vs, ss


def clone_all(*lists):
    return [[t.clone() for t in lst] for lst in lists]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_python(code, env=None, timeout=240):
    """Runs ``code`` in a fresh interpreter (for thread-count and ISA environment settings)."""
    e = dict(os.environ)
    e.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def gen():
    seed = torch.seed() % (2**31)
    print(f"generator seed: {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)
