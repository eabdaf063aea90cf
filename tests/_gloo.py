"""Starts gloo worker processes for the distributed tests (test_distributed, test_fsdp_adamh,
test_sharded_embedding): one launcher instead of a copy in each file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

import lvopt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, code: str, out_dir, timeout: float = 150) -> list:
    """Runs ``code`` in ``world`` processes (RANK, WORLD_SIZE, MASTER_ADDR/PORT set for gloo on
    localhost, one thread each) and returns each rank's results, loaded from
    ``out_dir/rank{r}.pt``, which ``code`` must write. The children import the test modules and
    this checkout's lvopt (the tests' folder and the checkout's root go first on their path).
    Fails naming the rank that failed first, not one that lost its peer afterwards."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(lvopt.__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(
        os.environ,
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=path,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(r, log) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
    failed.sort(key=lambda rl: "closed by peer" in rl[1])
    assert not failed, "\n".join(f"rank {r} of {world} failed:\n{log[-4000:]}" for r, log in failed[:2])
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
