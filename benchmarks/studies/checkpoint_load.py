"""What validating a checkpoint costs (lvopt/checkpoint.py, docs/checkpoints.md), side by side
with one optimizer step and with the rest of load_state_dict, in one process.

    python benchmarks/studies/checkpoint_load.py [--numel 25000000] [--tensors 50] [--rounds 5] [--device cpu] [--threads N]

Prints the median of ``--rounds`` timings of: the validation alone (checkpoint.problems), a whole
lvopt load_state_dict (validation included), torch.optim.AdamW's load_state_dict of the same
checkpoint, and one lvopt.AdamW step of the same parameters.
"""

import argparse
import os
import sys

import torch

import lvopt
from lvopt import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import measure  # noqa: E402


def timed(fn, rounds, dev):
    """Median ms of ``rounds`` calls, no warm-up, each a synchronised wall time (harness.measure)."""
    return measure(fn, rounds, device=dev, timer="wall").median_ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=25_000_000, help="parameters in all")
    ap.add_argument("--tensors", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    n = a.numel // a.tensors
    params = [torch.nn.Parameter(torch.randn(n // 256, 256, device=dev)) for _ in range(a.tensors)]
    opt = lvopt.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    fresh = lvopt.AdamW(params)
    tfresh = torch.optim.AdamW(params)
    t_check = timed(lambda: checkpoint.problems(fresh, sd), a.rounds, dev)
    t_load = timed(lambda: fresh.load_state_dict(sd), a.rounds, dev)
    t_torch = timed(lambda: tfresh.load_state_dict(sd), a.rounds, dev)
    t_step = timed(opt.step, a.rounds, dev)
    total = sum(p.numel() for p in params)
    print(
        f"{total / 1e6:.1f}M fp32 parameters in {a.tensors} tensors on {dev} ({torch.get_num_threads()} threads), "
        f"median of {a.rounds}:"
    )
    print(f"  validation (checkpoint.problems)   {t_check:8.1f} ms  ({t_check / t_step:.2f} x one step)")
    print(f"  lvopt load_state_dict (with it)    {t_load:8.1f} ms")
    print(f"  torch.optim.AdamW load_state_dict  {t_torch:8.1f} ms")
    print(f"  one lvopt.AdamW step               {t_step:8.1f} ms")


if __name__ == "__main__":
    main()
