"""The GPU sparse step reads nothing from the device on the host, makes no blocking copy and
launches the same kernels for every batch of N ids, proven without a GPU:

* the optimizer's host path (lvopt/optim.py, lvopt/sparse.py, lvopt/nn.py) with the "cuda" and
  "triton" backends runs on fake CUDA tensors (FakeTensorMode): a host read of device memory
  raises DataDependentOutputException there, a data-dependent shape
  DynamicOutputShapeException, and a dispatch recorder (tests/_host_traffic.py) sees every
  copy from the host;
* the Triton ops' bodies run on fake CUDA tensors with their launches recorded: the list of
  kernels and grids is the same for two batches of N ids with different numbers of distinct
  rows (the CUDA op's launches are listed in the header of csrc/cuda/sparse_rows.cu);
* a static scan of csrc/cuda/ fails on a host read, a blocking copy or a synchronisation
  outside the sites marked "host read:" or "host copy:" (the raising paths of direct op calls).

On a GPU, tests/test_sparse_rows_optimizer.py also runs the steps under
torch.cuda.set_sync_debug_mode("error") and captures them in a CUDA graph.
"""

import re
from pathlib import Path

import pytest
import torch

import lvopt
from _host_traffic import HostTraffic, fake_embedding_step
from conftest import needs_cuda_build, needs_native, needs_triton_installed

ROOT = Path(__file__).resolve().parents[1]


def _fake_training(backend, mode, dtype, steps=4):
    """Trains an embedding and a dense layer on fake CUDA tensors through lvopt.nn.Embedding's
    forward (catch-up) and backward, and the optimizer's step and flush; returns the recorder
    of steps 2.. (the first step creates the state: a one-time upload of the step counter is
    allowed there). Autograd's engine needs a real device, so the backward function is called
    directly, as the engine would."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        V, d, N = 50, 16, 24
        emb = lvopt.nn.Embedding(V, d, padding_idx=3, device="cuda", dtype=dtype)
        lin = torch.nn.Linear(d, 3, device="cuda", dtype=dtype)
        opt = lvopt.AdamW(
            [{"params": [emb.weight], "sparse_mode": mode}, {"params": list(lin.parameters())}],
            lr=1e-2,
            backend=backend,
        )
        rec = HostTraffic()

        def one_step():
            fake_embedding_step(emb, lin, opt, V, N)

        with rec:
            one_step()
            rec.reset()
            for _ in range(steps - 1):
                one_step()
            opt.flush()
    return rec


@needs_native
@needs_cuda_build
@pytest.mark.parametrize("mode", ["exact", "lazy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_step_is_host_read_free(mode, dtype):
    rec = _fake_training("cuda", mode, dtype)
    assert rec.downloads == [] and rec.blocking_uploads == [], (rec.downloads, rec.blocking_uploads)
    assert "sparse_adamw_" in rec.ops and (mode == "lazy" or "sparse_catchup_" in rec.ops)
    assert not {"unique", "unique_consecutive", "nonzero", "masked_select"} & set(rec.ops)


@needs_native
@needs_triton_installed
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_triton_backend_step_is_host_read_free(mode, monkeypatch):
    # The backend check asks for a GPU or the interpreter; the ops themselves are not run here
    # (their fake kernels are): the interpreter setting only opens the backend. lvopt.triton is
    # imported before it is set: triton.jit reads it when a kernel is defined, and this process
    # must keep compiled kernels (tests/test_sass.py compiles them).
    import lvopt.triton  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rec = _fake_training("triton", mode, torch.float32)
    assert rec.downloads == [] and rec.blocking_uploads == [], (rec.downloads, rec.blocking_uploads)
    assert not {"unique", "unique_consecutive", "nonzero", "masked_select"} & set(rec.ops)


def test_a_host_read_is_caught():
    """The harness catches what it must: a .item() on a fake CUDA tensor is recorded and raises,
    blocking uploads (pageable memory, or pinned without non_blocking) and a download are
    recorded, an upload from pinned memory (or a view of it) with non_blocking is not blocking;
    on CPU tensors (tests/test_capturable.py) a read is recorded and is no download."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode():
        x = torch.zeros(4, device="cuda")
        rec = HostTraffic()
        with rec:
            with pytest.raises(DataDependentOutputException):
                x.sum().item()
            x.copy_(torch.ones(4))
            x.cpu()
            x.copy_(torch.ones(4), non_blocking=True)  # from pageable memory: blocking too
            pinned = torch.ones(8).pin_memory()
            x.copy_(pinned[:4], non_blocking=True)
            x.to(torch.float64).copy_(pinned[4:], non_blocking=True)
            x.copy_(pinned[4:])  # pinned but blocking
        assert rec.reads == ["_local_scalar_dense"] and rec.downloads == ["_local_scalar_dense", "_to_copy"]
        assert rec.blocking_uploads == ["copy_", "copy_", "copy_"]
        assert [kind for _, _, kind in rec.uploads] == ["blocking", "blocking", "async", "async", "blocking"]
        assert "sum" in rec.ops and "_pin_memory" not in rec.ops
        rec.reset()
        assert (rec.reads, rec.downloads, rec.uploads, rec.ops) == ([], [], [], [])
    with HostTraffic() as rec:
        a = torch.ones(3)
        float(a.sum()), bool(a[0] > 0), a.tolist(), torch.equal(a, a)
    assert rec.reads == ["_local_scalar_dense"] * 2 + ["tolist", "equal"] and rec.downloads == [] and rec.uploads == []


# ----- the Triton ops' bodies on fake tensors: the launch list depends on N only -------------------


def _triton_launches(ids_list, exact, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lvopt.sparse import RowClock
    from lvopt.triton import sparse_rows as S

    clock = RowClock(0.9, 0.999, 1e-8, 0)
    for t in range(1, 6):
        clock.append(t, 1e-2, 0.1)
    hist, qpow, base, epoch, window = clock.op_args()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8, 0.0]], dtype=torch.float64)
    lists = []
    for ids in ids_list:
        calls = []
        monkeypatch.setattr(
            S, "launch", lambda kernel, grid, *a, calls=calls, **k: calls.append((kernel.fn.__name__, grid))
        )
        with FakeTensorMode(allow_non_fake_inputs=True):
            V, d = 40, 16
            p = torch.zeros(V, d, device="cuda")
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            step = torch.full((), 5.0, device="cuda")
            last = torch.zeros(V, dtype=torch.int64, device="cuda")
            h, q = hist.to("cuda", non_blocking=True), qpow.to("cuda", non_blocking=True)
            err = torch.zeros(3, dtype=torch.int64, device="cuda")
            stats = torch.zeros(2, dtype=torch.float64, device="cuda")
            idx = torch.tensor(ids).to("cuda", non_blocking=True)
            vals = torch.zeros(len(ids), d, device="cuda")
            S.sparse_adamw_impl(p, idx, vals, m, v, step, last, h, q, hyper, base, epoch, window, exact, stats, err)
            if exact:
                S.sparse_catchup_impl(p, idx, m, v, step, last, h, q, hyper, base, epoch, window, err)
        lists.append(calls)
    return lists


@needs_triton_installed
@pytest.mark.parametrize("exact", [False, True])
def test_triton_launches_depend_on_n_only(exact, monkeypatch):
    few = [7] * 12  # one distinct row
    many = list(range(12))  # twelve
    some = [1, 2, 1, 2, 5, 5, 9, 9, 9, 30, 31, 1]
    a, b, c = _triton_launches([few, many, some], exact, monkeypatch)
    assert a == b == c
    names = [n for n, _ in a]
    assert "sparse_rows_kernel" in names and "_finish_kernel" in names
    assert all(g == (12,) for n, g in a if n in ("sparse_rows_kernel", "_scalars_kernel"))
    # A different N gives different grids (the test can tell).
    (d,) = _triton_launches([[1] * 13], exact, monkeypatch)
    assert d != a


# ----- static scan of the CUDA sources ------------------------------------------------------------

FORBIDDEN = [
    (r"\.item\s*<|\.item\s*\(", "host read (.item)"),
    (r"\.cpu\s*\(", "device-to-host copy (.cpu())"),
    (r"cudaMemcpy(?!Async)|cudaMemcpyDeviceToHost", "cudaMemcpy"),
    (r"(Stream|Device|Event)Synchronize|\.synchronize\s*\(", "synchronisation"),
    (r"\bunique(_consecutive|_dim)?\s*\(", "unique (data-dependent shape)"),
    (r"\bnonzero\s*\(", "nonzero (data-dependent shape)"),
    (r"masked_select\s*\(", "masked_select (data-dependent shape)"),
    (r"repeat_interleave\s*\((?![^;]*output_size)", "repeat_interleave without output_size"),
    (r"\bread_step\s*\(", "host read of the step count"),
    (r"\.to\s*\(", "copy between devices"),
]
ALLOW = re.compile(r"//\s*host (read|copy):")


def scan_sources(paths):
    """(file, line, what) for every forbidden construct not preceded (within three lines, or
    on its line) by a "// host read:" or "// host copy:" comment."""
    found = []
    for path in paths:
        lines = Path(path).read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("//", 1)[0]
            for pattern, what in FORBIDDEN:
                if re.search(pattern, code):
                    window = lines[max(0, i - 3) : i + 1]
                    if not any(ALLOW.search(w) for w in window):
                        found.append((Path(path).name, i + 1, what))
    return found


def test_static_scan_of_cuda_sources():
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
    assert sources
    found = scan_sources(sources)
    assert found == [], "\n".join(f"{f}:{n}: {w}" for f, n, w in found)


def test_static_scan_catches_each_pattern(tmp_path):
    """Each forbidden construct is caught without the comment and allowed with it."""
    bad = [
        "x.item<int64_t>();",
        "auto h = t.cpu();",
        "cudaMemcpy(a, b, n, cudaMemcpyDeviceToHost);",
        "cudaStreamSynchronize(s);",
        "at::unique_consecutive(x);",
        "at::nonzero(x);",
        "at::masked_select(x, m);",
        "at::repeat_interleave(x, r);",
        "read_step(step);",
        "hist.to(dev);",
    ]
    src = tmp_path / "k.cu"
    src.write_text("\n\n\n\n".join(bad))
    assert len(scan_sources([src])) == len(bad)
    src.write_text(
        "\n\n\n\n".join(f"// host read: a test\n{b}" for b in bad)
        + "\nat::repeat_interleave(x, r, 0, /*output_size=*/n);"
    )
    assert scan_sources([src]) == []
