"""GPU benchmark of the step kernels: lvopt's CUDA and Triton AdamW/AdamH against
torch.optim.AdamW(fused=True) and torch's foreach AdamW, timed with CUDA events, stated as a
fraction of the bandwidth a large device-to-device copy reaches on the same GPU.

    python benchmarks/bench_gpu.py                  # or: python -m lvopt bench --device cuda
Importable anywhere; run() returns None (and says why) where there is no CUDA device.
"""
from __future__ import annotations

import math
import sys

import torch


def _time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the roof we state results against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def gpt2_small_shapes():
    d, v, ctx = 768, 50257, 1024
    shapes = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


CASES = {
    "64M fp32": ([(64 * 2**20,)], torch.float32),
    "64M bf16": ([(64 * 2**20,)], torch.bfloat16),
    "GPT-2 small fp32": (gpt2_small_shapes(), torch.float32),
    "GPT-2 small bf16": (gpt2_small_shapes(), torch.bfloat16),
}


def _state(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    ps = [torch.randn(s, device=device, generator=g).to(dtype) for s in shapes]
    gs = [torch.randn(s, device=device, generator=g).to(dtype) for s in shapes]
    ms = [torch.zeros(s, device=device) for s in shapes]
    vs = [torch.zeros(s, device=device) for s in shapes]
    return ps, gs, ms, vs


def _lvopt_step(backend, shapes, dtype, device, algo):
    import lvopt
    from lvopt import _backend
    from lvopt.reference import HYPER_COLS

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
    row = [1e-3, 0.9, 0.999, 0.0 if algo == "adamh" else 0.01, 1e-8, 0.0]
    hyper = torch.tensor([row] * n, dtype=torch.float64, device=device).reshape(n, HYPER_COLS)
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


def run(device: str = "cuda", cases=None, file=sys.stdout):
    """Prints one table per case: ms per step, effective GB/s and fraction of copy bandwidth.
    Returns the rows, or None where there is no CUDA device."""
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; GPU timings skipped (see benchmarks/RESULTS.md for "
              "the static SASS evidence and the predicted times)", file=file)
        return None
    dev = torch.device(device)
    bw = copy_bandwidth(dev)
    print(f"device: {torch.cuda.get_device_name(dev)}; copy bandwidth {bw / 1e9:.0f} GB/s", file=file)
    rows = []
    for name in cases or CASES:
        shapes, dtype = CASES[name]
        numel = sum(math.prod(s) for s in shapes)
        pbytes = 2 if dtype == torch.bfloat16 else 4
        # AdamW: read p, g, m, v, write p, m, v. AdamH: pass 1 reads W, g, m, v and writes m, v;
        # pass 2 reads W, m, v and writes W.
        per_param = {"adamw": 3 * pbytes + 16, "adamh": 4 * pbytes + 24}
        contenders = [
            ("torch fused AdamW", "adamw", lambda: (_torch_step(shapes, dtype, dev, True), None)),
            ("torch foreach AdamW", "adamw", lambda: (_torch_step(shapes, dtype, dev, False), None)),
        ]
        for be in ("cuda", "triton"):
            for algo in ("adamw", "adamh"):
                contenders.append((f"lvopt {be} {algo}", algo,
                                   lambda be=be, algo=algo: _lvopt_step(be, shapes, dtype, dev, algo)))
        print(f"\n{name}: {numel / 1e6:.1f}M params", file=file)
        for label, algo, make in contenders:
            fn, why = make()
            if fn is None:
                print(f"  {label:24s} unavailable: {why}", file=file)
                continue
            ms = _time_ms(fn)
            nbytes = per_param[algo] * numel
            row = dict(case=name, impl=label, ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, frac=nbytes / (ms * 1e-3) / bw)
            rows.append(row)
            print(f"  {label:24s} {ms:8.3f} ms  {row['gbps']:7.0f} GB/s  {row['frac']:6.1%} of copy", file=file)
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    run()
