"""lvopt.nn.ShardedEmbedding against DistributedDataParallel with a full table, on P gloo
processes on this machine (it starts them itself).

Measured, per rank:
- bytes sent to other ranks per step (the module's own count, ``bytes_sent``), against the
  byte model of docs/distributed.md: 32(P-1) of counts, then per distinct id of the rank's batch
  owned elsewhere 8 (its id) + 4d (its gradient row), and 4d per row sent back to a rank that
  asked for it. DDP's sparse all-reduce (gloo: an all-gather of each rank's coalesced gradient)
  sends U(8 + 4d) to each of the P - 1 others (the model; DDP has no counter);
- peak memory (the peak resident set, ``ru_maxrss``, above the resident set after a warm-up
  with a small table through the same code), each configuration in its own processes, against the table and
  optimizer state (weight, exp_avg, exp_avg_sq fp32 and exact mode's int64 last_step a row);
- the step time (forward, backward, lvopt.AdamW exact step), both configurations built in the
  same processes and stepped alternately, median over the steps after a warm-up.

One machine: the "network" is loopback TCP through gloo and the ranks share the CPU cores, so
the times say what the CPU work and gloo's copies cost here, not what an interconnect costs.

    python benchmarks/bench_sharded_embedding.py [--world 2] [--rows 262144] [--dim 64] [--ids 8192]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile

import torch


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _batch(args, rank: int, step: int, dist_name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    if dist_name == "uniform":
        return torch.randint(0, args.rows, (args.ids,), generator=g)
    # Zipf(1.1) over a frequency-sorted vocabulary: id k has weight (k+1)^-1.1, so the hot rows are
    # the first ones, all on rank 0 (sampled by inverting the CDF of a table built once).
    cdf = _zipf_cdf(args.rows)
    return torch.searchsorted(cdf, torch.rand(args.ids, generator=g, dtype=torch.float64)).clamp_max(args.rows - 1)


_CDF: dict = {}


def _zipf_cdf(v: int) -> torch.Tensor:
    if v not in _CDF:
        w = torch.arange(1, v + 1, dtype=torch.float64) ** -1.1
        _CDF[v] = torch.cumsum(w / w.sum(), 0)
    return _CDF[v]


def _build(which: str, args):
    import lvopt
    from torch.nn.parallel import DistributedDataParallel as DDP

    if which == "sharded":
        emb = lvopt.nn.ShardedEmbedding(args.rows, args.dim, seed=0)
        return emb, emb, lvopt.AdamW([emb.weight], lr=1e-3, weight_decay=0.1, sparse_mode="exact")
    emb = lvopt.nn.Embedding(args.rows, args.dim)
    return emb, DDP(emb), lvopt.AdamW([emb.weight], lr=1e-3, weight_decay=0.1, sparse_mode="exact")


def _step(model, opt, ids, target):
    opt.zero_grad()
    (model(ids) * target).sum().backward()
    opt.step()


def worker(args) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    try:
        if args.task == "memory":
            # A small table through the same code first (steps, flush), so that the baseline
            # holds what the first use of each op pages in (libtorch's code, gloo's buffers),
            # not only the imports: what is measured is then what grows with the table.
            small = argparse.Namespace(**{**vars(args), "rows": 4096, "ids": 256})
            _, model, opt = _build(args.which, small)
            for t in range(3):
                _step(model, opt, _batch(small, rank, t, "uniform"), torch.ones(small.ids, args.dim))
            opt.flush()
            del model, opt
            base = _rss_kb()
            emb, model, opt = _build(args.which, args)
            for t in range(args.steps):
                _step(model, opt, _batch(args, rank, t, "uniform"), torch.ones(args.ids, args.dim))
            opt.flush()
            out["peak_mb"] = (_peak_kb() - base) / 1024
        else:
            from harness import measure

            built = {w: _build(w, args) for w in ("sharded", "ddp")}
            emb = built["sharded"][0]
            for dist_name in ("uniform", "zipf"):
                sent0 = dict(emb.bytes_sent)
                seen = dict(t=-1, distinct=0, off=0)

                def before(t, dist_name=dist_name, seen=seen):
                    """Step t's batch (made once, for both configurations), then a barrier."""
                    if t != seen["t"]:
                        seen["t"], seen["ids"] = t, _batch(args, rank, t, dist_name)
                        u = torch.unique(seen["ids"])
                        seen["distinct"] += u.numel()
                        seen["off"] += int(((u < emb.row_start) | (u >= emb.row_end)).sum())
                        seen["target"] = torch.ones(args.ids, args.dim)
                    dist.barrier()

                def stepper(model, opt, seen=seen):
                    return lambda: _step(model, opt, seen["ids"], seen["target"])

                # Both configurations stepped alternately on the same batch (harness.measure,
                # round-robin); the first fifth of the steps is the warm-up, left out of the median.
                times = measure(
                    {w: stepper(model, opt) for w, (_, model, opt) in built.items()}, args.steps, before=before
                )
                distinct, off = seen["distinct"], seen["off"]
                warm = args.steps // 5
                sent = {k: (v - sent0[k]) / args.steps for k, v in emb.bytes_sent.items()}
                out[dist_name] = dict(
                    ms={w: 1e3 * statistics.median(x.samples[warm:]) for w, x in times.items()},
                    sent=sent,
                    distinct=distinct / args.steps,
                    off=off / args.steps,
                )
        path = os.path.join(args.out, f"{args.task}-{args.which}-{rank}.pt")
        torch.save(out, path)
    finally:
        dist.destroy_process_group()


def _launch(args, task: str, which: str) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        WORLD_SIZE=str(args.world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--task",
        task,
        "--which",
        which,
        "--out",
        args.out,
        "--world",
        str(args.world),
        "--rows",
        str(args.rows),
        "--dim",
        str(args.dim),
        "--ids",
        str(args.ids),
        "--steps",
        str(args.steps),
    ]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(args.world)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker of {task}/{which} failed")
    return [torch.load(os.path.join(args.out, f"{task}-{which}-{r}.pt")) for r in range(args.world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ids", type=int, default=8192, help="ids per rank per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--task", default="time", help=argparse.SUPPRESS)
    ap.add_argument("--which", default="both", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    p, v, d = args.world, args.rows, args.dim
    with tempfile.TemporaryDirectory() as tmp:
        args.out = tmp
        mem = {w: _launch(args, "memory", w) for w in ("sharded", "ddp")}
        timed = _launch(args, "time", "both")
    print(
        f"P = {p} gloo processes on one machine; V = {v}, d = {d}, {args.ids} ids per rank per step, "
        f"lvopt.AdamW exact, fp32, {args.steps} steps\n"
    )
    print(
        "| ids | distinct ids per rank | owned elsewhere | sent per rank per step (measured) | byte model | "
        "DDP sparse all-reduce (model) | sharded step | DDP step | sharded / DDP |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("uniform", "zipf"):
        rs = [r[name] for r in timed]
        u = statistics.mean(r["distinct"] for r in rs)
        off = statistics.mean(r["off"] for r in rs)
        sent = statistics.mean(sum(r["sent"].values()) for r in rs)
        # Every row sent back answers an id received: over all ranks, rows sent = ids sent.
        model = 32 * (p - 1) + off * (8 + 4 * d) + off * 4 * d
        ddp = u * (8 + 4 * d) * (p - 1)
        ms_s = statistics.mean(r["ms"]["sharded"] for r in rs)
        ms_d = statistics.mean(r["ms"]["ddp"] for r in rs)
        detail = ", ".join(
            f"{k} {statistics.mean(r['sent'][k] for r in rs) / 1e3:.1f} kB" for k in ("meta", "ids", "rows", "grads")
        )
        each = " / ".join(f"{sum(r['sent'].values()) / 1e6:.3f}" for r in rs)
        print(
            f"| {name} | {u:.0f} | {off:.0f} | {sent / 1e6:.3f} MB (ranks {each}; {detail}) | {model / 1e6:.3f} MB | "
            f"{ddp / 1e6:.3f} MB | {ms_s:.1f} ms | {ms_d:.1f} ms | {ms_s / ms_d:.2f} |"
        )
    state_full = v * d * 12 + v * 8
    rows_local = -(-v // p)
    state_local = rows_local * d * 12 + rows_local * 8
    print("\n| per rank | peak memory above baseline (measured, each rank) | table + state (model) |")
    print("| --- | --- | ---: |")
    for w, state in (("ddp", state_full), ("sharded", state_local)):
        peaks = ", ".join(f"{r['peak_mb']:.0f}" for r in mem[w])
        print(f"| {'sharded' if w == 'sharded' else 'DDP, full table'} | {peaks} MB | {state / 2**20:.0f} MB |")
    ratio = statistics.mean(r["peak_mb"] for r in mem["sharded"]) / statistics.mean(r["peak_mb"] for r in mem["ddp"])
    print(f"\nsharded / full per-rank peak: {ratio:.3f} (1/P = {1 / p:.3f})")


if __name__ == "__main__":
    main()
