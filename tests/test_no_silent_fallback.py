"""Nothing falls back silently: each place that once picked another path than asked for now
raises or warns, and says how to get the path that was wanted (docs/design.md, "Conventions")."""

import types
import warnings

import pytest
import torch

import lvopt
from lvopt import _backend, _ops
from conftest import needs_native


def _no_native_cuda(monkeypatch):
    monkeypatch.setattr(_backend, "_REASONS", {})  # the per-process answers of unavailable_reason
    monkeypatch.setattr(_backend, "_native_cuda", lambda: False)


def _native_cuda(monkeypatch):
    monkeypatch.setattr(_backend, "_REASONS", {})
    monkeypatch.setattr(_backend, "_native_cuda", lambda: True)
    monkeypatch.setattr(_ops, "native_available", lambda: True)


def test_cuda_default_without_native_cuda_kernels_raises(monkeypatch):
    """A CPU-only build on a GPU machine must not run the Triton kernels unasked."""
    _no_native_cuda(monkeypatch)
    with pytest.raises(RuntimeError, match=r"no native kernels for cuda.*make dev.*LVOPT_NO_CUDA.*backend='triton'"):
        _backend.default_for(torch.device("cuda"))
    p = torch.nn.Parameter(torch.randn(3))
    opt = lvopt.AdamW([p])  # the default is resolved per device at step time
    with pytest.raises(RuntimeError, match="no native kernels for cuda"):
        opt._backend_for(torch.device("cuda"))
    assert _backend.default_for(torch.device("cpu")) == "cpu"


def test_cuda_default_with_native_cuda_kernels(monkeypatch):
    _native_cuda(monkeypatch)
    assert _backend.default_for(torch.device("cuda")) == "cuda"


@pytest.mark.parametrize("device", [False, True])
def test_build_info_says_compiled_no_device(monkeypatch, device):
    _native_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device)
    status = lvopt.build_info()["backends"]["cuda"]
    assert status == ("available" if device else "compiled, no device")
    assert ("cuda" in _backend.available()) is device


def test_build_info_without_cuda_kernels(monkeypatch):
    _no_native_cuda(monkeypatch)
    monkeypatch.setattr(_ops, "native_available", lambda: True)
    assert "built without CUDA kernels" in lvopt.build_info()["backends"]["cuda"]


def _embedding_grad(dtype):
    torch.manual_seed(0)
    emb = lvopt.nn.Embedding(10, 4, dtype=dtype)
    ids = torch.tensor([[3, 1, 3], [7, 1, 3]])
    emb(ids).pow(2).sum().backward()
    return emb.weight.grad, emb.weight, ids


def test_embedding_backward_warns_once_on_the_reference_path():
    """fp64 has no native coalesce_rows kernel: the reference sums, with one warning that says
    why; the gradient is still the right one."""
    lvopt.nn._reference_coalesce_warned.clear()
    with pytest.warns(lvopt.nn.ReferenceCoalesceWarning, match="float64"):
        grad, w, ids = _embedding_grad(torch.float64)
    expect = torch.zeros_like(w)
    expect.index_add_(0, ids.reshape(-1), 2 * w.detach()[ids.reshape(-1)])
    assert torch.allclose(grad.to_dense(), expect)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _embedding_grad(torch.float64)  # once only


@needs_native
def test_embedding_backward_native_path_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad, w, ids = _embedding_grad(torch.float32)
    assert grad._indices().tolist() == [[1, 3, 7]]


def test_embedding_backward_warns_without_native_extension(monkeypatch):
    lvopt.nn._reference_coalesce_warned.clear()
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name: "lvopt._C did not load (test)")
    with pytest.warns(lvopt.nn.ReferenceCoalesceWarning, match=r"lvopt._C did not load \(test\)"):
        _embedding_grad(torch.float32)


@pytest.mark.parametrize(
    "want,active,warns",
    [
        ("avx12", "avx512", "not one of"),
        ("avx512", "avx2", "asks for more"),
        ("avx2", "avx2", None),
        ("", "avx512", None),
    ],
)
def test_cpu_isa_request_that_is_not_honoured_warns(monkeypatch, want, active, warns):
    fake = types.SimpleNamespace(
        build_info=lambda: dict(cpu_isa_active=active, cpu_isa_hardware=active, cpu_isa_compiled="baseline,avx2,avx512")
    )
    monkeypatch.setattr(_ops, "_C", fake)
    monkeypatch.setenv("LVOPT_CPU_ISA", want)
    if warns is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _ops.check_cpu_isa_env() is None
    else:
        with pytest.warns(RuntimeWarning, match=warns):
            assert f"use {active!r}" in _ops.check_cpu_isa_env()
