"""Peak memory of one training step (forward, backward, optimizer step) of an embedding plus a
small model, V = 262,144, d = 1,024: lvopt.nn.Embedding + lvopt.AdamW against a dense
nn.Embedding + lvopt.AdamW. Peak RSS is read from the process (ru_maxrss) in a fresh
interpreter per variant, after a first step (states allocated) and three more.

``--timeline lvopt|dense``: the resident memory (VmRSS, VmHWM in GiB) of one variant at each
phase of three steps, in this process: where the peaks of the two variants come from.

    python benchmarks/studies/memory_sparse_rows.py
    python benchmarks/studies/memory_sparse_rows.py --timeline lvopt
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
V, D = 262144, 1024
KINDS = ("dense", "lvopt")


def build(kind: str):
    """The model of both studies (seed 0): the embedding (lvopt's or torch's), a small head, one
    lvopt.AdamW over both, and the Zipf(1.1) weights of the token ids."""
    import torch
    from torch import nn

    import lvopt

    torch.manual_seed(0)
    emb = lvopt.nn.Embedding(V, D) if kind == "lvopt" else nn.Embedding(V, D)
    head = nn.Sequential(nn.Linear(D, 256), nn.GELU(), nn.Linear(256, 1000))
    opt = lvopt.AdamW(list(emb.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.1)
    w = torch.arange(1, V + 1, dtype=torch.float64) ** -1.1
    return emb, head, opt, w


def batch(w):
    import torch

    return torch.multinomial(w, 16384, replacement=True).reshape(16, 1024)


def peak(kind: str) -> None:
    """Prints the peak RSS after four steps and the one after set-up, in bytes (a child process)."""
    emb, head, opt, w = build(kind)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(4):
        ids = batch(w)
        opt.zero_grad(set_to_none=True)
        loss = head(emb(ids)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base * 1024)


def rss() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in GiB."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmRSS"].split()[0]) / 2**20, int(status["VmHWM"].split()[0]) / 2**20


def timeline(kind: str) -> None:
    emb, head, opt, w = build(kind)
    print("setup", rss())
    for step in range(3):
        ids = batch(w)
        opt.zero_grad(set_to_none=True)
        out = emb(ids)
        print(step, "fwd-emb", rss())
        loss = head(out).logsumexp(-1).mean()
        print(step, "fwd", rss())
        del out
        loss.backward()
        print(step, "bwd", rss())
        opt.step()
        print(step, "step", rss())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeline", choices=KINDS, help="phase-by-phase resident memory of one variant")
    args = ap.parse_args(argv)
    if args.timeline:
        timeline(args.timeline)
        return 0
    peaks = {}
    for kind in KINDS:
        # A fresh interpreter per variant ("-c": it imports lvopt as the caller's would, from the
        # working directory first), so that each peak is its own.
        code = f"import sys; sys.path.insert(1, {HERE!r}); import memory_sparse_rows; memory_sparse_rows.peak({kind!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks[kind] = [int(x) for x in out.stdout.split()]
    for k, (top, before) in peaks.items():
        print(f"{k:6s} peak RSS {top / 2**30:.2f} GiB (after model set-up {before / 2**30:.2f} GiB)")
    diff = peaks["dense"][0] - peaks["lvopt"][0]
    print(
        f"difference {diff / 2**30:.2f} GiB = {diff / (V * D):.2f} x V*d bytes (target >= 4 V*d = {4 * V * D / 2**30:.2f} GiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
