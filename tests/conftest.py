import math
import os
import subprocess
import sys

import pytest
import torch

import lvopt
from lvopt._layout import HYPER_COLS

NATIVE = lvopt.build_info()["native"]
needs_native = pytest.mark.skipif(not NATIVE, reason="lvopt._C not built")
IN_TRITON_CHILD = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "triton: the Triton backend's case of a per-op-family test; without a GPU "
        "it runs in a child pytest under TRITON_INTERPRET=1 (run_triton_child)",
    )


class Backend:
    """One backend of the per-op-family tests (tests/test_<op>.py): its name, the device its
    kernels are tested on, and its ops. ``cpu``: the native CPU kernels (torch.ops.lvopt) on CPU
    tensors. ``triton``: lvopt.triton's ops (torch.ops.lvopt_triton) on CUDA tensors, or on CPU
    tensors in the interpreter child. ``cuda``: the native CUDA kernels on CUDA tensors."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device

    def __repr__(self):
        return f"Backend({self.name!r}, {self.device})"

    @property
    def ops(self):
        """The op functions: ``backend.ops.fused_adamw_(...)``."""
        if self.name == "triton":
            import lvopt.triton

            return lvopt.triton
        return torch.ops.lvopt

    def op(self, name: str):
        """The op's OpOverload, for torch.library.opcheck."""
        namespace = torch.ops.lvopt_triton if self.name == "triton" else torch.ops.lvopt
        if self.name == "triton":
            import lvopt.triton  # noqa: F401  (registers torch.ops.lvopt_triton.*)
        return getattr(namespace, name).default

    def to(self, lists):
        """Lists of tensors moved to the backend's device."""
        return [[t.to(self.device) for t in lst] for lst in lists]


def _cuda_kernels() -> bool:
    return torch.cuda.is_available() and bool(lvopt.build_info()["cuda"])


needs_cuda_kernels = pytest.mark.skipif(not _cuda_kernels(), reason="needs a CUDA device")


def cuda_built() -> bool:
    """lvopt._C has the CUDA kernels (a device or not): the fake-CUDA host-path tests need them registered."""
    from lvopt import _backend

    return _backend.unavailable_reason("cuda") is None


def triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


needs_cuda_build = pytest.mark.skipif(
    not cuda_built(), reason="this build has no CUDA kernels (LVOPT_NO_CUDA or no nvcc)"
)
needs_triton_installed = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")


@pytest.fixture(params=["cpu", pytest.param("triton", marks=pytest.mark.triton), "cuda"])
def backend(request):
    """The backend a per-op-family test runs on (torchao's style: one test body, every backend).
    Without a GPU the Triton case is skipped here and run by the file's run_triton_child test in
    a child pytest under the interpreter (`-m triton`), where only the Triton cases are selected."""
    return _backend_named(request.param)


@pytest.fixture(params=[pytest.param("triton", marks=pytest.mark.triton)])
def triton_backend(request):
    """The Triton backend alone, for tests of its own machinery (launch tables, its Python checks)."""
    return _backend_named(request.param)


def _backend_named(name: str) -> Backend:
    if name == "cpu":
        if not NATIVE:
            pytest.skip("lvopt._C not built")
        return Backend("cpu", torch.device("cpu"))
    if name == "cuda":
        if not _cuda_kernels():
            pytest.skip("needs a CUDA device")
        return Backend("cuda", torch.device("cuda"))
    if IN_TRITON_CHILD:
        return Backend("triton", torch.device("cpu"))
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no GPU: the Triton case runs in the interpreter child (test_triton_in_interpreter_child)")
    return Backend("triton", torch.device("cuda"))


def run_triton_child(path):
    """Runs the Triton cases (marker ``triton``) of the test file ``path`` in a child pytest under
    TRITON_INTERPRET=1, on CPU tensors: the interpreter must be chosen before triton is imported,
    and this process has imported it already. Nothing to do where a GPU runs them here."""
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the Triton cases in this process")
    run_under_interpreter(path, "-m", "triton")


def run_under_interpreter(path, *pytest_args):
    """Runs the test file ``path`` (with ``pytest_args``) in a child pytest under TRITON_INTERPRET=1
    and asserts that it passed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(path), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args, path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-3000:]


def make_hyper(n, lr=1e-2, betas=(0.9, 0.999), wd=0.1, eps=1e-8, maximize=False, gen=None):
    """A per-tensor hyperparameter table; with ``gen``, every row gets its own random values."""
    rows = []
    for _ in range(n):
        if gen is None:
            rows.append([lr, betas[0], betas[1], wd, eps, float(maximize)])
        else:
            u = torch.rand(5, generator=gen, dtype=torch.float64).tolist()
            rows.append(
                [
                    10 ** (-4 + 3 * u[0]),
                    0.8 + 0.19 * u[1],
                    0.9 + 0.0999 * u[2],
                    wd * u[3],
                    10 ** (-10 + 4 * u[4]),
                    float(maximize),
                ]
            )
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


def assert_unchanged(lists, snapshot):
    """Every tensor of ``lists`` equal to its copy in ``snapshot`` (clone_all's): nothing written."""
    for lst, old in zip(lists, snapshot):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_close_at_list_scale(got, ref, tol, what=""):
    """Every tensor of ``got`` within ``tol`` times the largest |element| of the whole ``ref``
    list. A per-tensor relative error (rel_err) of a one-element tensor whose value cancelled
    to near zero (m = b1*m + (1-b1)*g ~ 3e-4 from terms ~0.1) is a ratio of rounding to a tiny
    number, which fails though every element is within an ulp of its terms (seen in CI: 3.1e-6
    for m of shape (1,)); the list's scale is that of the terms."""
    scale = max((float(r.detach().abs().max()) for r in ref if r.numel()), default=0.0)
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.numel():
            err = float((a.detach().cpu().double() - b.detach().double()).abs().max())
            assert err <= tol * scale, f"{what}[{i}]: max error {err:.3g} > {tol:g} x {scale:.3g}"


def restart_reference_from(ref_params, params):
    """Copies the kernel's parameters into the reference's before a step (for
    assert_bf16_step_close, which compares one step from the same state) and returns a copy of
    them: the state before the step."""
    for q, p in zip(ref_params, params):
        q.copy_(p.cpu())
    return [p.clone() for p in params]


def assert_bf16_step_close(p, q, p_old):
    """A bf16 parameter after one step of a GPU kernel (p) against the reference's step from the
    same bf16 state (q). The GPU compilers contract a*b+c into FMAs, the CPU code does not, so
    the fp32 values before the bf16 rounding differ by a few fp32 ulps of the step's terms
    (|p_old| and the update, both bounded by |p_old| + |q|); rounded to bf16 that is up to one
    bf16 ulp of q (2**-7 relative, 3 allowed) plus those fp32 ulps themselves, which dominate
    where p_old and the update cancel. (Comparing after several steps instead lets a one-ulp
    difference at a large |p| outlive a later crossing of zero: a flaky test.)"""
    p, q, p_old = p.cpu().double(), q.double(), p_old.cpu().double()
    tol = 3 * 2.0**-7 * q.abs() + 2.0**-20 * (p_old.abs() + q.abs())
    bad = (p - q).abs() > tol
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {p.numel()} bf16 elements off: p {p[bad][:4].tolist()}, "
        f"reference {q[bad][:4].tolist()}, before the step {p_old[bad][:4].tolist()}"
    )


def sparse_clock(steps, lr=1e-2, wd=0.1, betas=(0.9, 0.999), eps=1e-8):
    """The host history of the sparse-row ops (lvopt.sparse.RowClock) at steps 1..``steps``, as
    lvopt.optim builds it, and the one-row hyper table of the last step. ``lr``: a number, or
    "schedule" for a cosine schedule (a different lr at every step)."""
    from lvopt.sparse import RowClock

    clock = RowClock(betas[0], betas[1], eps, 0)
    lr_at = (lambda t: 1e-2 * (0.55 + 0.45 * math.cos(t / 37.0))) if lr == "schedule" else (lambda t: lr)
    for t in range(1, steps + 1):
        clock.append(t, lr_at(t), wd)
    hyper = torch.tensor([[lr_at(max(steps, 1)), betas[0], betas[1], wd, eps, 0.0]], dtype=torch.float64)
    return clock, hyper


def single_threaded_on_cpu(backend, fn, *args):
    """fn(*args) with one CPU thread on the CPU backend (the determinism tests compare it with the
    call on every thread), as is on a device."""
    n = torch.get_num_threads()
    try:
        if backend.name == "cpu":
            torch.set_num_threads(1)
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def train_step(model, opt, x):
    """One training step (forward, backward, step, zero_grad): the body the compiled-step tests
    compile whole and run eagerly side by side."""
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run_python(code, env=None, timeout=240):
    """Runs ``code`` in a fresh interpreter (for thread-count and ISA environment settings)."""
    e = dict(os.environ)
    e.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def gen():
    # A fresh seed per test; LVOPT_TEST_SEED=N reruns a failure with the seed it printed.
    seed = int(os.environ.get("LVOPT_TEST_SEED") or torch.seed() % (2**31))
    print(f"generator seed: {seed} (rerun with LVOPT_TEST_SEED={seed})")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)
