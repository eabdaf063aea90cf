"""Issue 21's GPU claims in one run (under 2 minutes on an H100/H200):

* the Triton dense AdamW step as a fraction of a device copy, on one 64M-element fp32 tensor and
  on GPT-2 small's 148 fp32 tensors (target: >= 85%), next to the CUDA kernel, eager (timed
  alone, synchronised after each step: its host time before the last launch counts), eager
  back to back (a training loop's steady state: the host queues ahead) and replayed from a
  CUDA graph (the kernels' time without the Python host path), with the host time of one
  Triton opt.step() (no synchronisation: the optimizer's Python and Triton's launcher);
* a whole lvopt.AdamW(backend="cuda").step() on GPT-2 small captured in a CUDA graph and
  replayed, as a fraction of copy (target: >= 90%), next to the same step eager and to
  torch.optim.AdamW(fused=True, capturable=True) captured the same way;
* the sparse step of issue 15's standard batch in a capturable group (exact mode's history on
  the device), eager and replayed from a CUDA graph, on both backends, next to the default
  exact step (the ratio eager/captured is the host time a graph removes).

"% of copy" divides the bytes the step must move (28 B/param for fp32 AdamW: read p, g, m, v;
write p, m, v) by the median time and by the bandwidth of a 1 GiB device copy measured in the
same run (read + write counted). Results go to stdout and to "${OUT:-gpu-out}/bench_gpu_capture.json".

    python benchmarks/bench_gpu_capture.py                      # on a GPU
    TRITON_INTERPRET=1 python benchmarks/bench_gpu_capture.py --device cpu --size tiny   # plumbing check
On the CPU (--device cpu) the "captured" rows are eager steps of the CPU backend (no CUDA
graphs), and Triton runs only under TRITON_INTERPRET=1: a check that the script runs, not a
measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import _time_ms, copy_bandwidth, gpt2_small_shapes  # noqa: E402
from harness import measure, sync as _sync  # noqa: E402

BYTES_PER_PARAM = 28  # fp32 AdamW


def _sizes(size: str):
    if size == "tiny":
        return {"64M": [(4096,)], "GPT-2 small": [(64, 32), (32,), (128, 32), (96,)]}
    return {"64M": [(64 * 2**20,)], "GPT-2 small": gpt2_small_shapes()}


def _params(shapes, device, gen):
    ps = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    return ps


def _step_ms(opt, device, iters):
    return _time_ms(opt.step, device, warmup=3, iters=iters)


def _back_to_back_ms(fn, device, iters):
    """ms per call of ``iters`` calls queued back to back, one synchronisation at the end: the
    step time of a training loop whose host keeps ahead of the device (_time_ms synchronises
    after every call, so its eager rows add the host time before the last launch)."""
    return measure(fn, iters, 3, device=device, timer="queued").median_ms


def _host_ms(fn, device, iters):
    """Median host time of one call, no synchronisation: what the step costs the Python thread
    (on a GPU: the optimizer's Python and Triton's launcher; the queue never fills at 20 steps)."""
    return measure(fn, iters, 1, device=device, timer="host").median_ms


def _captured_ms(opt, device, iters):
    """Median ms of replays of one captured opt.step() (eager on the CPU)."""
    if torch.device(device).type != "cuda":
        return _step_ms(opt, device, iters)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return _time_ms(graph.replay, device, warmup=3, iters=iters)


def run(device: str = "cuda", size: str = "default", iters: int = 20, file=sys.stdout, only: str = "all") -> list[dict]:
    import lvopt
    from lvopt import _backend

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    bw = copy_bandwidth(dev, (1 << 30) if size == "default" else (1 << 20))
    print(
        f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; "
        f"copy bandwidth {bw / 1e9:.1f} GB/s",
        file=file,
    )
    rows = []
    host_ms = {}

    def row(case, label, ms, n):
        nbytes = BYTES_PER_PARAM * n
        r = dict(case=case, label=label, ms=ms, bytes=nbytes, frac=nbytes / (ms * 1e-3) / bw)
        print(f"  {case:12s} {label:48s} {ms:8.3f} ms  {r['frac']:6.1%} of copy", file=file)
        rows.append(r)

    native = "cuda" if dev.type == "cuda" else "cpu"
    if dev.type == "cuda" and only in ("all", "sparse"):
        # First: the sparse step's captured exact mode is the newer claim (issue 15).
        rows += run_sparse_capture(dev, bw, size, iters, file)
    for case, shapes in _sizes(size).items() if only in ("all", "dense") else ():
        n = sum(torch.Size(s).numel() for s in shapes)
        for backend in (native, "triton"):
            why = _backend.unavailable_reason(backend)
            if why is not None or not _backend.device_ok(backend, dev):
                print(f"  {case:12s} lvopt {backend}: skipped ({why or 'not for this device'})", file=file)
                continue
            ps = _params(shapes, dev, gen)
            opt = lvopt.AdamW(ps, lr=1e-3, weight_decay=0.01, backend=backend)
            row(case, f"lvopt {backend} step (eager)", _step_ms(opt, dev, iters), n)
            if backend == "triton":
                row(case, "lvopt triton step (eager, back to back)", _back_to_back_ms(opt.step, dev, iters), n)
                host = _host_ms(opt.step, dev, iters)
                host_ms[case] = host
                print(f"  {case:12s} {'lvopt triton opt.step() host time (no sync)':48s} {host:8.3f} ms", file=file)
            if backend == "triton" and dev.type == "cuda":
                # Replayed from a CUDA graph, the step's host work (Python checks, tables, launch
                # arguments) is gone: what is left is the kernels' own time.
                row(case, "lvopt triton step, captured (device time only)", _captured_ms(opt, dev, iters), n)
            del opt, ps
        if case == "GPT-2 small":
            ps = _params(shapes, dev, gen)
            lr = torch.tensor(1e-3, device=dev)
            opt = lvopt.AdamW(ps, lr=lr, weight_decay=0.01, backend=native, capturable=True)
            row(
                case,
                f"lvopt {native} step, captured (tensor lr)"
                if dev.type == "cuda"
                else f"lvopt {native} step (no graphs on the CPU)",
                _captured_ms(opt, dev, iters),
                n,
            )
            del opt
            if dev.type == "cuda":
                t = torch.optim.AdamW(ps, lr=lr, weight_decay=0.01, fused=True, capturable=True)
                row(case, "torch AdamW(fused, capturable), captured", _captured_ms(t, dev, iters), n)
                del t
            del ps
        _sync(dev)
    out = os.path.join(os.environ.get("OUT", "gpu-out"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_gpu_capture.json"), "w") as f:
        json.dump(dict(device=str(dev), size=size, copy_bandwidth=bw, rows=rows, triton_host_ms=host_ms), f, indent=1)
    return rows


def run_sparse_capture(dev, bw, size, iters, file=sys.stdout) -> list[dict]:
    """The sparse step of issue 15's standard batch (V = 262,144, d = 1,024, 16,384 Zipf ids,
    raw COO) in a capturable group (capturable=True: the exact history on the device,
    lvopt/sparse.py RingClock), eager and replayed from a CUDA graph, per backend and mode,
    next to the default (host-history) exact step. Each call gets the next batch of a pool,
    copied untimed into the static gradient the graph reads."""
    import lvopt
    from lvopt import _backend
    from bench_gpu import SPARSE, zipf_pool

    cfg = SPARSE["default" if size == "default" else "small"]
    V, d = cfg["V"], cfg["d"]
    gen = torch.Generator().manual_seed(0)
    pool = zipf_pool(cfg, dev, gen)
    U = sum(g.coalesce()._nnz() for g in pool) / len(pool)
    nbytes = int(4 * cfg["n"] * d + 24 * U * d)
    name = f"sparse V={V} d={d} n={cfg['n']}"
    print(f"\n{name} ({U:.0f} distinct), raw COO; byte model {nbytes / 1e9:.3f} GB", file=file)
    rows = []
    for backend in ("cuda", "triton"):
        if _backend.unavailable_reason(backend) is not None:
            print(f"  lvopt {backend}: unavailable", file=file)
            continue
        for mode, capturable in (("exact", False), ("exact", True), ("lazy", True)):
            p = torch.nn.Parameter(torch.randn(V, d, generator=gen).to(dev))
            p.grad = torch.sparse_coo_tensor(
                pool[0]._indices().clone(), pool[0]._values().clone(), (V, d), check_invariants=False
            )
            ids, vals = p.grad._indices(), p.grad._values()  # the static gradient the graph reads
            opt = lvopt.AdamW(
                [{"params": [p], "sparse_mode": mode, "capturable": capturable}],
                lr=1e-3,
                weight_decay=0.1,
                backend=backend,
            )

            def refill(i, ids=ids, vals=vals):
                g = pool[i % len(pool)]
                ids.copy_(g._indices())
                vals.copy_(g._values())

            tag = f"lvopt {backend} {mode}{' capturable' if capturable else ''}"
            eager = _time_ms(opt.step, dev, warmup=2 * len(pool), iters=iters, before=refill)
            r = dict(case=name, label=f"{tag} (eager)", ms=eager, bytes=nbytes, frac=nbytes / (eager * 1e-3) / bw)
            rows.append(r)
            print(f"  {r['label']:44s} {eager:8.3f} ms  {r['frac']:6.1%} of copy", file=file)
            if capturable and dev.type == "cuda":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    opt.step()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    opt.step()
                ms = _time_ms(graph.replay, dev, warmup=2 * len(pool), iters=iters, before=refill)
                r = dict(
                    case=name,
                    label=f"{tag}, captured",
                    ms=ms,
                    bytes=nbytes,
                    frac=nbytes / (ms * 1e-3) / bw,
                    eager_over_captured=eager / ms,
                )
                rows.append(r)
                print(
                    f"  {r['label']:44s} {ms:8.3f} ms  {r['frac']:6.1%} of copy  (eager {eager / ms:.2f}x)", file=file
                )
                err = opt._rows._errors[id(p)][1].word.tolist()
                if err[0]:
                    print(f"  {tag}: error word {err} after the replays (a failed replay)", file=file)
                del graph
            del opt, p
            _sync(dev)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Triton and captured CUDA AdamW steps against a device copy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="default", choices=("default", "tiny"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", default="all", choices=("all", "dense", "sparse"))
    args = ap.parse_args(argv)
    run(args.device, args.size, args.iters, only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
