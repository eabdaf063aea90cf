"""AdamH on FSDP2 shards against unsharded AdamH, on one machine with gloo.

Starts WORLD processes (default 2, localhost, one thread each). Every process holds the same
model twice: once fully_shard-ed (FSDP2, Shard(0) or Shard(1)) and stepped by lvopt.AdamH on its
local shards, once whole and stepped by lvopt.AdamH as one process would (the DDP layout: every
rank steps the full matrices). The two optimizer steps are timed round-robin (one of each per
round; the median over rounds), after the same backward, so that the machine's noise falls on
both alike. The optimizer's communication is counted by wrapping torch.distributed.all_reduce
during opt.step() (FSDP2's own all-gather and reduce-scatter run in forward and backward and
are not the optimizer's).

Byte model: one all-reduce per step of the [n, 3] fp64 sums (||u||^2, <W,u>, ||W||^2) of the n
sharded matrices, 24*n bytes of payload (a ring all-reduce sends and receives about 2*(P-1)/P
times the payload per rank); plus, at the matrices' first step only, one all-reduce of n fp64
radii (8*n bytes). Unsharded AdamH communicates nothing.

Caveat: on one machine gloo's all-reduce is a loopback exchange between processes that share
the CPU cores and memory bandwidth; it says nothing about a network's latency, and the step
time of P ranks on P cores is not P GPUs'. The ratio that transfers is the local work: a
sharded step moves 1/P of the bytes of an unsharded one, plus one small collective.

    python benchmarks/bench_distributed_adamh.py [--world 2] [--layers 8] [--width 1024]
        [--shard-dim 0] [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import torch
from torch import nn


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    import lvopt
    from harness import measure

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    mesh = init_device_mesh("cpu", (args.world,))
    sharded, whole = _model(args.layers, args.width), _model(args.layers, args.width)
    placement = (lambda p: Shard(args.shard_dim) if p.dim() == 2 else None) if args.shard_dim else None
    for layer in sharded:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(sharded, mesh=mesh, shard_placement_fn=placement)
    opt_s = lvopt.AdamH(sharded.parameters(), lr=1e-3)
    opt_w = lvopt.AdamH(whole.parameters(), lr=1e-3)
    x = torch.randn(16, args.width, generator=torch.Generator().manual_seed(1))
    sharded(x).square().mean().backward()
    whole(x).square().mean().backward()

    calls: list = []
    orig = dist.all_reduce

    def counted(t, *a, **k):
        calls.append(t.numel() * t.element_size())
        return orig(t, *a, **k)

    def counting(step):
        """``step`` with the optimizer's all-reduces counted while it runs."""

        def run():
            dist.all_reduce = counted
            try:
                step()
            finally:
                dist.all_reduce = orig

        return run

    def barrier(i):
        dist.barrier()

    first_calls = []
    dist.all_reduce = counted
    opt_s.step()  # the first step: radii and sums
    dist.all_reduce = orig
    first_calls, calls[:] = list(calls), []
    opt_w.step()
    # Round-robin (harness.measure), a barrier before every step.
    t = measure({"sharded": counting(opt_s.step), "whole": opt_w.step}, args.rounds, before=barrier)
    n = sum(1 for p in sharded.parameters() if p.dim() >= 2)
    # The collective alone: what the sharded step adds beyond its local work.
    bare = measure(lambda: dist.all_reduce(torch.zeros(n, 3, dtype=torch.float64)), args.rounds, before=barrier)
    numel = sum(p.numel() for p in whole.parameters())
    local = sum(p.to_local().numel() for p in sharded.parameters())
    per_step = calls[: len(calls) // args.rounds]
    out = [
        rank,
        t["sharded"].median_s,
        t["whole"].median_s,
        first_calls,
        per_step,
        n,
        numel,
        local,
        bare.median_s,
    ]
    gathered = [None] * args.world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        print(
            f"{args.world} gloo processes on one machine, {args.layers} matrices {args.width}x{args.width} fp32 "
            f"({numel / 1e6:.1f} M parameters), Shard({args.shard_dim}), {args.rounds} rounds, medians:"
        )
        print("rank  sharded AdamH step  unsharded AdamH step  ratio  local elements  bare all-reduce of the sums")
        for r, s, w, _, _, _, _, loc, b in gathered:
            print(
                f"{r:>4}  {s * 1e3:>15.2f} ms  {w * 1e3:>17.2f} ms  {w / s:>5.2f}x  {loc:>8d} of {numel}"
                f"  {b * 1e3:>8.3f} ms"
            )
        print(f"optimizer all-reduces, first step: {first_calls} bytes (radii 8*n = {8 * n}, sums 24*n = {24 * n})")
        print(
            f"optimizer all-reduces per later step: {per_step} bytes (model: one call, 24*n = {24 * n}); "
            f"unsharded AdamH: none"
        )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--shard-dim", type=int, default=0, choices=(0, 1))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--world",
        str(args.world),
        "--layers",
        str(args.layers),
        "--width",
        str(args.width),
        "--shard-dim",
        str(args.shard_dim),
        "--rounds",
        str(args.rounds),
    ]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(args.world)]
    rcs = [p.wait() for p in procs]
    if any(rcs):
        raise SystemExit(f"a worker failed: exit codes {rcs}")


if __name__ == "__main__":
    main()
