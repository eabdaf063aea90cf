"""Sparse embedding rows: one optimizer step of a V x d embedding with a Zipf batch's row-sparse
gradient, lvopt exact / lazy against torch.optim.SparseAdam and torch.optim.AdamW(fused=True) on
the dense gradient; lvopt's dense AdamW kernel on a 64M tensor gives the bandwidth reference.

Bytes a row-sparse step must move (docs/design.md section 4): the gradient rows as given (N x d,
read) plus p, m, v of the U distinct rows read and written: 4*N*d + 24*U*d (fp32). Each timed
step gets a different batch (a pool of pre-generated batches, cycled after a warm-up), so exact
mode's rows lag as they do in training. `python benchmarks/bench_sparse_rows.py` prints the
table; `pytest benchmarks/bench_sparse_rows.py` runs the pytest-benchmark version.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys

import torch

import lvopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import argparser, measure, record  # noqa: E402

CASE = "sparse_rows"
SIZES = {
    "small": dict(V=16384, d=256, n=2048, dense_n=4 << 20, pool=4, warmup=8, reps=8),
    "default": dict(V=262144, d=1024, n=16384, dense_n=64 << 20, pool=6, warmup=24, reps=12),
}


def zipf_ids(n: int, V: int, gen: torch.Generator, a: float = 1.1) -> torch.Tensor:
    w = torch.arange(1, V + 1, dtype=torch.float64) ** -a
    return torch.multinomial(w, n, replacement=True, generator=gen)


def _batches(cfg, gen):
    out = []
    for _ in range(cfg["pool"]):
        ids = zipf_ids(cfg["n"], cfg["V"], gen)
        vals = torch.randn(cfg["n"], cfg["d"], generator=gen)
        out.append(torch.sparse_coo_tensor(ids[None], vals, (cfg["V"], cfg["d"]), check_invariants=False))
    return out


def _time_steps(opt, p, grads, warmup, reps):
    """Median ms of opt.step(), the i-th call (warm-up first) on the gradient grads[i % len]."""

    def set_grad(i):
        p.grad = grads[i % len(grads)]

    return measure(opt.step, reps, warmup, before=set_grad).median_ms


def run(size: str = "default", isa_levels: list[str] | None = None) -> list[dict]:
    """Rows of the side-by-side table: name, ms (median step), gbps (effective), bytes.
    ``isa_levels``: time each lvopt row once per CPU ISA level (named "name [level]", the levels
    of one row back to back on the same batches); the anchors once."""
    cfg = SIZES[size]
    V, d = cfg["V"], cfg["d"]
    gen = torch.Generator().manual_seed(0)
    grads = _batches(cfg, gen)
    distinct = [g.coalesce()._nnz() for g in grads]
    U = statistics.mean(distinct)
    sparse_bytes = int(4 * cfg["n"] * d + 24 * U * d)
    rows = []

    def add(name, ms, nbytes, **extra):
        rows.append(record(CASE, name, ms, nbytes, **extra))

    def levels(name):
        """(row name, ISA level or None) for each timing of ``name``."""
        if isa_levels is None or not name.startswith("lvopt"):
            return [(name, None)]
        return [(f"{name} [{lv}]", lv) for lv in isa_levels]

    def timed(opt, p, batches, warmup, reps, level):
        if level is None:
            return _time_steps(opt, p, batches, warmup, reps)
        with lvopt.set_cpu_isa(level):
            return _time_steps(opt, p, batches, warmup, reps)

    for base, make in [
        ("lvopt exact", lambda ps: lvopt.AdamW(ps, lr=1e-3, weight_decay=0.1)),
        ("lvopt lazy", lambda ps: lvopt.AdamW(ps, lr=1e-3, weight_decay=0.1, sparse_mode="lazy")),
        ("torch SparseAdam", lambda ps: torch.optim.SparseAdam(ps, lr=1e-3)),
    ]:
        for name, level in levels(base):
            p = torch.nn.Parameter(torch.randn(V, d, generator=gen))
            opt = make([p])
            ms = timed(opt, p, grads, cfg["warmup"], cfg["reps"], level)
            add(name, ms, sparse_bytes, distinct_rows=U)
            del p, opt
            gc.collect()

    # The same steps on the gradients lvopt.nn.Embedding produces: duplicates already summed in
    # its backward (U rows instead of N), so the step reads 4*U*d gradient bytes, not 4*N*d.
    merged = [
        torch.sparse_coo_tensor(*(lambda c: (c._indices(), c._values()))(g.coalesce()), (V, d), is_coalesced=True)
        for g in grads
    ]
    merged_bytes = int(28 * U * d)
    for base, make in [
        ("lvopt exact (lvopt.nn.Embedding grad)", lambda ps: lvopt.AdamW(ps, lr=1e-3, weight_decay=0.1)),
        (
            "lvopt lazy (lvopt.nn.Embedding grad)",
            lambda ps: lvopt.AdamW(ps, lr=1e-3, weight_decay=0.1, sparse_mode="lazy"),
        ),
    ]:
        for name, level in levels(base):
            p = torch.nn.Parameter(torch.randn(V, d, generator=gen))
            opt = make([p])
            add(name, timed(opt, p, merged, cfg["warmup"], cfg["reps"], level), merged_bytes, distinct_rows=U)
            del p, opt
            gc.collect()
    del merged

    # Dense AdamW on the dense gradient of the same batch: 28 B x V x d.
    p = torch.nn.Parameter(torch.randn(V, d, generator=gen))
    dense_grads = [grads[0].to_dense()]
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1, fused=True)
    add("torch AdamW fused (dense grad)", _time_steps(opt, p, dense_grads, 2, max(3, cfg["reps"] // 3)), 28 * V * d)
    del p, opt, dense_grads
    gc.collect()

    # The dense lvopt AdamW kernel on a flat tensor: the bandwidth reference.
    n = cfg["dense_n"]
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    dense_grad = [torch.randn(n, generator=gen)]
    for name, level in levels(f"lvopt AdamW dense ({n >> 20}M fp32, reference bandwidth)"):
        opt = lvopt.AdamW([p], lr=1e-3, weight_decay=0.1)
        add(name, timed(opt, p, dense_grad, 2, max(3, cfg["reps"] // 2), level), 28 * n)
        del opt
    return rows


def table(rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    lines = [f"{'contender':58s} {'ms':>9s} {'GB/s':>7s} {'MB moved':>9s}"]
    for r in rows:
        lines.append(f"{r['name']:58s} {r['ms']:9.2f} {r['gbps']:7.1f} {r['bytes'] / 1e6:9.1f}")
    e, z, s, f = (by[k] for k in ("lvopt exact", "lvopt lazy", "torch SparseAdam", "torch AdamW fused (dense grad)"))
    dense = rows[-1]
    lines.append(f"distinct rows per batch (mean): {e['distinct_rows']:.0f}")
    for r in (e, z):
        lines.append(
            f"{r['name']}: {s['ms'] / r['ms']:.1f}x SparseAdam, {f['ms'] / r['ms']:.1f}x fused AdamW (dense), "
            f"bandwidth {r['gbps'] / dense['gbps'] * 100:.0f}% of the dense kernel's"
        )
    for r in (by.get("lvopt exact (lvopt.nn.Embedding grad)"), by.get("lvopt lazy (lvopt.nn.Embedding grad)")):
        if r is not None:
            lines.append(
                f"{r['name']}: {s['ms'] / r['ms']:.1f}x SparseAdam, {f['ms'] / r['ms']:.1f}x fused AdamW "
                f"(dense), bandwidth {r['gbps'] / dense['gbps'] * 100:.0f}% of the dense kernel's"
            )
    lines.append(f"exact / lazy: {e['ms'] / z['ms']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = argparser(__doc__.split("\n")[0], sizes=list(SIZES)[::-1]).parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, isa {lvopt.build_info()['cpu_isa_active']}")
    print(table(run(args.size)))
    return 0


def test_sparse_rows_step(benchmark):
    """pytest-benchmark: the exact-mode step on the small configuration."""
    cfg = SIZES[os.environ.get("LVOPT_BENCH_SIZE", "small")]
    gen = torch.Generator().manual_seed(0)
    grads = _batches(cfg, gen)
    p = torch.nn.Parameter(torch.randn(cfg["V"], cfg["d"], generator=gen))
    opt = lvopt.AdamW([p], lr=1e-3, weight_decay=0.1)
    state = {"i": 0}

    def step():
        p.grad = grads[state["i"] % len(grads)]
        state["i"] += 1
        opt.step()

    benchmark(step)


if __name__ == "__main__":
    raise SystemExit(main())
