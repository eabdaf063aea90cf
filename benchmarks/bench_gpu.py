"""GPU benchmark of every lvopt op: the CUDA and Triton AdamW/AdamH steps against
torch.optim.AdamW(fused=True) and torch's foreach AdamW (the apex-style multi-tensor baseline),
and the sparse-row steps (exact and lazy, on nn.Embedding(sparse=True)'s raw COO gradient and
on lvopt.nn.Embedding's merged one) against torch.optim.SparseAdam and fused AdamW on the dense
gradient; each stated as a fraction of the bandwidth a large copy reaches on the same device.

    python benchmarks/bench_gpu.py [--size small] [--device cuda]
    python -m lvopt bench --device cuda

``--device cpu`` runs the same code on the CPU backend (CPU timers; that is how the tests
exercise it without a GPU); ``--device cuda`` on a machine without CUDA says so and exits 0.
"""

from __future__ import annotations

import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import argparser, hyper_table, measure, record  # noqa: E402
from harness import gpt2_small_shapes as _gpt2_shapes  # noqa: E402


def _time_ms(fn, device="cuda", warmup: int = 3, iters: int = 20, before=None) -> float:
    """Median ms of fn() (harness.measure: CUDA events on a GPU, perf_counter on the CPU);
    ``before(i)`` runs untimed before each call (e.g. to set the next batch's gradient)."""
    return measure(fn, iters, warmup, before=before, device=device).median_ms


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a copy on ``device`` (read + write counted), the roof we state results against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def gpt2_small_shapes():
    """GPT-2 small's 148 tensors in Hugging Face's Conv1D layout (harness.gpt2_small_shapes)."""
    return _gpt2_shapes(conv1d=True)


CASES = {
    "64M fp32": ([(64 * 2**20,)], torch.float32),
    "64M bf16": ([(64 * 2**20,)], torch.bfloat16),
    "GPT-2 small fp32": (gpt2_small_shapes(), torch.float32),
    "GPT-2 small bf16": (gpt2_small_shapes(), torch.bfloat16),
}
SMALL_CASES = {
    "1M fp32": ([(1024, 1024)], torch.float32),
    "mixed bf16": ([(300, 257), (4096,), (33, 17)], torch.bfloat16),
}
# The sparse-row case of issue 3 (V = 262,144, d = 1,024, 16,384 Zipf(1.1) ids per batch).
SPARSE = {"default": dict(V=262144, d=1024, n=16384, pool=6), "small": dict(V=16384, d=128, n=2048, pool=4)}


def _state(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    ps = [torch.randn(s, device=device, generator=g).to(dtype) for s in shapes]
    gs = [torch.randn(s, device=device, generator=g).to(dtype) for s in shapes]
    ms = [torch.zeros(s, device=device) for s in shapes]
    vs = [torch.zeros(s, device=device) for s in shapes]
    return ps, gs, ms, vs


def _lvopt_step(backend, shapes, dtype, device, algo):
    import lvopt  # noqa: F401  (loads the extension: registers torch.ops.lvopt)
    from lvopt import _backend

    if _backend.unavailable_reason(backend):
        return None, _backend.unavailable_reason(backend)
    fns = _backend.ops(backend)
    ps, gs, ms, vs = _state(shapes, dtype, device)
    if algo == "adamh":
        keep = [i for i, s in enumerate(shapes) if len(s) >= 2]
        ps, gs, ms, vs = ([x[i] for i in keep] for x in (ps, gs, ms, vs))
    n = len(ps)
    # Device-resident step counters and hyper table: the graph-capturable configuration.
    steps = [torch.zeros((), device=device) for _ in range(n)]
    hyper = hyper_table(n, lr=1e-3, weight_decay=0.0 if algo == "adamh" else 0.01, device=device)
    if algo == "adamh":
        radii = [torch.linalg.vector_norm(p, dtype=torch.float64) for p in ps]
        return (lambda: fns.fused_adamh_(ps, gs, ms, vs, steps, radii, hyper)), None
    return (lambda: fns.fused_adamw_(ps, gs, ms, vs, steps, hyper)), None


def _torch_step(shapes, dtype, device, fused: bool):
    ps, gs, _, _ = _state(shapes, dtype, device)
    params = [torch.nn.Parameter(p) for p in ps]
    for p, g in zip(params, gs):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused, foreach=not fused)
    return opt.step


def _backends(device) -> tuple:
    return ("cuda", "triton") if torch.device(device).type == "cuda" else ("cpu",)


def run_dense(dev, bw, cases, file) -> list[dict]:
    rows = []
    for name, (shapes, dtype) in cases.items():
        numel = sum(math.prod(s) for s in shapes)
        pbytes = 2 if dtype == torch.bfloat16 else 4
        # AdamW: read p, g, m, v, write p, m, v. AdamH: pass 1 reads W, g, m, v and writes m, v;
        # pass 2 reads W, m, v and writes W.
        per_param = {"adamw": 3 * pbytes + 16, "adamh": 4 * pbytes + 24}
        contenders = [
            ("torch fused AdamW", "adamw", lambda: (_torch_step(shapes, dtype, dev, True), None)),
            ("torch foreach AdamW", "adamw", lambda: (_torch_step(shapes, dtype, dev, False), None)),
        ]
        for be in _backends(dev):
            for algo in ("adamw", "adamh"):
                contenders.append(
                    (f"lvopt {be} {algo}", algo, lambda be=be, algo=algo: _lvopt_step(be, shapes, dtype, dev, algo))
                )
        print(f"\n{name}: {numel / 1e6:.1f}M params", file=file)
        for label, algo, make in contenders:
            fn, why = make()
            if fn is None:
                print(f"  {label:40s} unavailable: {why}", file=file)
                continue
            # AdamH steps the matrices only (docs/design.md section 2.2): count their elements.
            count = numel if algo == "adamw" else sum(math.prod(s) for s in shapes if len(s) >= 2)
            if count == 0:
                print(f"  {label:40s} no matrices in this case", file=file)
                continue
            ms = _time_ms(fn, dev)
            rows.append(_row(name, label, ms, per_param[algo] * count, bw, file))
    return rows


def _row(case, label, ms, nbytes, bw, file) -> dict:
    """harness.record of one timing, with ``frac`` (of the copy bandwidth) and ``impl`` (the
    contender's name, the key this script's rows have always had)."""
    row = record(case, label, ms, nbytes, impl=label, frac=nbytes / (ms * 1e-3) / bw)
    print(f"  {label:40s} {ms:8.3f} ms  {row['gbps']:7.1f} GB/s  {row['frac']:6.1%} of copy", file=file)
    return row


def zipf_pool(cfg, dev, gen) -> list:
    """cfg["pool"] raw COO gradients of a V x d embedding (SPARSE[size]), n Zipf(1.1) ids each,
    as nn.Embedding(sparse=True) gives them (duplicates not summed), on ``dev``."""
    from bench_sparse_rows import zipf_ids

    V, d, n = cfg["V"], cfg["d"], cfg["n"]
    out = []
    for _ in range(cfg["pool"]):
        ids = zipf_ids(n, V, gen).to(dev)
        vals = torch.randn(n, d, generator=gen).to(dev)
        out.append(torch.sparse_coo_tensor(ids[None], vals, (V, d), check_invariants=False))
    return out


def run_sparse(dev, bw, size, file) -> list[dict]:
    """One optimizer step of a V x d embedding on a Zipf batch's row-sparse gradient (a
    different batch each step). Bytes: 4*N*d gradient rows read + 24*U*d for p, m, v of the U
    distinct rows (raw COO); 28*U*d on the merged gradient."""
    import lvopt
    from lvopt import _backend

    cfg = SPARSE[size]
    V, d, n = cfg["V"], cfg["d"], cfg["n"]
    gen = torch.Generator().manual_seed(0)
    raw = zipf_pool(cfg, dev, gen)
    merged = [g.coalesce() for g in raw]
    U = statistics.mean(g._nnz() for g in merged)
    raw_bytes, merged_bytes = int(4 * n * d + 24 * U * d), int(28 * U * d)
    name = f"sparse rows V={V} d={d}, {n} Zipf ids ({U:.0f} distinct)"
    print(f"\n{name}", file=file)
    rows = []

    def time_opt(label, make, grads, nbytes, dense=False):
        p = torch.nn.Parameter(torch.randn(V, d, generator=gen).to(dev))
        opt = make([p])
        pool = [g.to_dense() for g in grads] if dense else grads

        def set_grad(i):
            p.grad = pool[i % len(pool)]

        rows.append(
            _row(
                name, label, _time_ms(opt.step, dev, warmup=2 * len(pool), iters=12, before=set_grad), nbytes, bw, file
            )
        )
        del p, opt, pool

    for be in _backends(dev):
        why = _backend.unavailable_reason(be)
        if why:
            print(f"  lvopt {be:34s} unavailable: {why}", file=file)
            continue
        for mode in ("exact", "lazy"):
            for grads, kind, nbytes in ((raw, "raw COO", raw_bytes), (merged, "merged", merged_bytes)):
                time_opt(
                    f"lvopt {be} {mode} ({kind})",
                    lambda ps, mode=mode, be=be: lvopt.AdamW(
                        ps, lr=1e-3, weight_decay=0.1, sparse_mode=mode, backend=be
                    ),
                    grads,
                    nbytes,
                )
    time_opt("torch SparseAdam (raw COO)", lambda ps: torch.optim.SparseAdam(ps, lr=1e-3), raw, raw_bytes)
    time_opt(
        "torch fused AdamW (dense V x d grad)",
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
        raw[:2],
        28 * V * d,
        dense=True,
    )
    return rows


# The sparse step's targets (issue 15) on the standard batch, raw COO gradients: CUDA exact
# at <= 0.15 ms and >= 40% of the byte model (the "of copy" column: bytes / time / copy
# bandwidth), >= 8x torch.optim.SparseAdam, exact <= 1.3x lazy, Triton exact <= 1.5x CUDA.
SPARSE_CLAIMS = (
    ("CUDA exact step <= 0.15 ms", lambda t: t["cuda exact"]["ms"], "<=", 0.15),
    ("CUDA exact >= 40% of the byte model", lambda t: t["cuda exact"]["frac"], ">=", 0.40),
    ("CUDA exact >= 8x SparseAdam", lambda t: t["sparseadam"]["ms"] / t["cuda exact"]["ms"], ">=", 8.0),
    ("CUDA exact <= 1.3x lazy", lambda t: t["cuda exact"]["ms"] / t["cuda lazy"]["ms"], "<=", 1.3),
    ("Triton exact <= 1.5x CUDA exact", lambda t: t["triton exact"]["ms"] / t["cuda exact"]["ms"], "<=", 1.5),
    ("Triton lazy <= 1.5x CUDA lazy", lambda t: t["triton lazy"]["ms"] / t["cuda lazy"]["ms"], "<=", 1.5),
)


def check_sparse_claims(rows, file=sys.stdout) -> list:
    """PASS/FAIL of SPARSE_CLAIMS from run_sparse's rows (raw COO cases); returns the lines."""
    table = {}
    for r in rows:
        impl = r["impl"]
        if impl.startswith("lvopt ") and impl.endswith("(raw COO)"):
            _, be, mode, *_ = impl.split()
            table[f"{be} {mode}"] = r
        elif impl.startswith("torch SparseAdam"):
            table["sparseadam"] = r
    lines = []
    for name, value, op, bound in SPARSE_CLAIMS:
        try:
            x = value(table)
        except KeyError as e:
            lines.append(f"  {name:42s} not measured ({e.args[0]} missing)")
            continue
        ok = x <= bound if op == "<=" else x >= bound
        lines.append(f"  {name:42s} {x:8.3f} {op} {bound:<6g} {'PASS' if ok else 'FAIL'}")
    print("\nsparse-step claims (raw COO, standard batch):", file=file)
    for line in lines:
        print(line, file=file)
    return lines


def run(device: str = "cuda", size: str = "default", cases=None, file=sys.stdout):
    """Prints one table per case: ms per step, effective GB/s and fraction of copy bandwidth.
    Returns the rows, or None where CUDA was asked for and there is no CUDA device."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device here; GPU timings skipped (see benchmarks/RESULTS.md for "
            "the static SASS evidence and the predicted times)",
            file=file,
        )
        return None
    dev = torch.device(device)
    bw = copy_bandwidth(dev, (1 << 30) if size == "default" else (64 << 20))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {where}; copy bandwidth {bw / 1e9:.0f} GB/s", file=file)
    dense = {k: CASES[k] for k in cases} if cases else (CASES if size == "default" else SMALL_CASES)
    rows = run_dense(dev, bw, dense, file)
    sparse = run_sparse(dev, bw, size, file)
    check_sparse_claims(sparse, file)
    rows += sparse
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = argparser(__doc__, device="cuda").parse_args(argv)
    run(args.device, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
