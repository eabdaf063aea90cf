"""Where a step's time goes, for the GPU paths that miss their byte model (benchmarks/RESULTS.md,
"Measured on an H100"): the Triton AdamW step on GPT-2's 148 tensors and the sparse-row step
(exact and lazy, CUDA and Triton) on issue 3's Zipf batch.

For each it prints three numbers per step:
* ``wall``: host clock around the step with a device synchronisation after it;
* ``host``: host clock around the call alone (time to validate, plan and enqueue);
* ``device``: the sum of the step's device kernel times from torch.profiler (CPU: 0);
and the profiler's top operators by self device time and by self host time. If ``host`` is close
to ``wall`` and ``device`` far below it, the device waits on the host (launch overhead, host-side
planning, synchronisations), not on memory. ``--trace DIR`` also writes Chrome traces.

    python benchmarks/profile_gpu.py [--device cuda] [--size small] [--trace DIR]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu  # noqa: E402
from harness import argparser, measure, sync as _sync  # noqa: E402


def _targets(dev, size):
    """(name, step function, per-step setup or None) for every path that is available."""
    import lvopt
    from lvopt import _backend

    out = []
    backends = bench_gpu._backends(dev)
    shapes = bench_gpu.gpt2_small_shapes() if size == "default" else [(300, 257), (4096,), (33, 17)] * 8
    for be in backends:
        fn, why = bench_gpu._lvopt_step(be, shapes, torch.float32, dev, "adamw")
        if fn is not None:
            out.append((f"{be} adamw, {len(shapes)} tensors", fn, None))
    cfg = bench_gpu.SPARSE[size]
    V, d = cfg["V"], cfg["d"]
    gen = torch.Generator().manual_seed(0)
    pool = bench_gpu.zipf_pool(cfg, dev, gen)
    for be in backends:
        if _backend.unavailable_reason(be):
            continue
        for mode in ("exact", "lazy"):
            p = torch.nn.Parameter(torch.randn(V, d, generator=gen).to(dev))
            opt = lvopt.AdamW([p], lr=1e-3, weight_decay=0.1, sparse_mode=mode, backend=be)

            def setup(i, p=p):
                p.grad = pool[i % len(pool)]

            out.append((f"{be} sparse {mode}, raw COO", opt.step, setup))
    return out


def profile(device: str = "cuda", size: str = "default", steps: int = 6, trace=None, file=sys.stdout):
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("profile_gpu: no CUDA device here", file=file)
        return None
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort_dev = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    results = {}
    for name, fn, setup in _targets(dev, size):
        # 3 warm-up calls (compilation, allocator, history tables), then wall and host per call.
        t = measure(fn, steps, 3, before=setup, device=dev, timer="wall")
        with torch_profile(activities=activities) as prof:
            for i in range(steps):
                if setup:
                    setup(i)
                fn()
            _sync(dev)
        events = prof.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0.0) or 0.0 for e in events) if dev.type == "cuda" else 0.0
        r = dict(wall=t.median_ms, host=t.host_ms, device=device_us / 1e3 / steps)
        results[name] = r
        print(
            f"\n== {name}: wall {r['wall']:.3f} ms, host {r['host']:.3f} ms, device {r['device']:.3f} ms per step",
            file=file,
        )
        print(events.table(sort_by=sort_dev, row_limit=12, max_name_column_width=60), file=file)
        if dev.type == "cuda":
            print(events.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60), file=file)
        if trace:
            os.makedirs(trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(trace, name.replace(" ", "_").replace(",", "") + ".json"))
    print("\nsummary (ms per step): wall / host / device", file=file)
    for name, r in results.items():
        print(f"  {name:40s} {r['wall']:8.3f} {r['host']:8.3f} {r['device']:8.3f}", file=file)
    return results


def main(argv=None) -> int:
    ap = argparser(__doc__, device="cuda")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--trace", default=None, help="directory for Chrome traces")
    args = ap.parse_args(argv)
    profile(args.device, args.size, args.steps, args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
