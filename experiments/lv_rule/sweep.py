"""What the LV-rule sweeps share (run.py: the synthetic task, corpus.py: the real corpus, gpu_lm.py:
the language model for one GPU): the columns of a run, the LR schedule of a run, the resumable
csv of finished runs, and the adaptive embedding-LR grid.

A sweep appends every finished run to its csv and skips it next time; its grid extensions are
decided from the rows already there, so a restarted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import math
import os
import time

import numpy as np
import torch

# The columns of a run, the same in runs.csv, runs_corpus.csv and gpu_lm's runs.csv (analyze.py
# reads all three).
FIELDS = [
    "optim",
    "width",
    "V",
    "seed",
    "k",
    "lr_embedding",
    "lr_hidden",
    "N",
    "D",
    "steps",
    "train_loss",
    "loss",
    "seconds",
]


def lr_factor(s: int, steps: int) -> float:
    """The LR multiplier at step ``s`` of ``steps``: a linear warm-up over the first tenth, then a
    cosine from 1 down to 0.1."""
    warm = max(1, steps // 10)
    return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))


def train_step(opt, loss, losses: list) -> bool:
    """One optimizer step on ``loss`` (gradients set to None first); appends its value to
    ``losses``; False when that value is not finite (the run has diverged)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    return math.isfinite(losses[-1])


def add_arguments(ap, out: str) -> None:
    """The command line a sweep shares: --out (its csv, default ``out``), --threads, --parts."""
    ap.add_argument("--out", default=out)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--parts",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="only these parts of the preset (0-based)",
    )


def for_each_config(P: dict, parts, threads: int, config) -> None:
    """``config(part, optim, V, width)`` for every configuration of the preset ``P``'s parts (only
    the indices in ``parts`` when given), part by part, with torch at ``threads`` threads; the
    caller's thread count is restored after (tests call the sweeps' main)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, part in enumerate(P["parts"]):
            if parts is not None and i not in parts:
                continue
            for o in part["optims"]:
                for V in part["vocabs"]:
                    for w in part["widths"]:
                        config(part, o, V, w)
    finally:
        torch.set_num_threads(saved)


def read_rows(path: str) -> list[dict]:
    """The finished runs of ``path`` (a missing or empty file: none), as csv strings."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return []


def append_row(path: str, row: dict) -> None:
    """Appends one run to ``path``, writing the header first when the file is new or empty."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            wr.writeheader()
        wr.writerow(row)


def nominal_hidden(hidden_lr0: dict, base_width: int, optim: str, width: int) -> float:
    """The muP hidden LR at ``width``: AdamW x base_width/width, AdamH's hyperball matrices x
    (base_width/width)^(1/2) (lvopt.scaling.HYPERBALL_HIDDEN)."""
    return hidden_lr0[optim] * (base_width / width) ** (0.5 if optim == "adamh" else 1.0)


class Sweep:
    """Runs on demand: :meth:`ensure` returns a finished run's loss from the csv, or runs it
    (:meth:`run`, given by the sweep) and appends it. ``steps``: the run length the csv rows must
    match; ``hidden``: (optim, width) -> the nominal hidden LR, to tell hidden-LR factors apart."""

    def __init__(self, out: str, steps: int, hidden):
        self.out, self.steps, self.hidden = out, steps, hidden
        self.rows = read_rows(out)
        self.t_start, self.n_new = time.time(), 0

    def run(self, optim, width, V, seed, k, hf) -> tuple[dict, str]:
        """One run: (its row, the tail of its progress line)."""
        raise NotImplementedError

    def find(self, optim, width, V, seed, k, hf):
        lr_h = self.hidden(optim, width) * hf
        for r in self.rows:
            if (r["optim"], int(r["width"]), int(r["V"]), int(r["seed"]), int(r["k"]), int(r["steps"])) == (
                optim,
                width,
                V,
                seed,
                k,
                self.steps,
            ) and abs(float(r["lr_hidden"]) / lr_h - 1) < 1e-6:
                return r
        return None

    def ensure(self, optim, width, V, seed, k, hf=1.0):
        r = self.find(optim, width, V, seed, k, hf)
        if r is not None:
            return float(r["loss"])
        r, tail = self.run(optim, width, V, seed, k, hf)
        append_row(self.out, r)
        self.rows.append({k_: str(v) for k_, v in r.items()})
        self.n_new += 1
        el = time.time() - self.t_start
        print(
            f"[{self.n_new}] {optim} width={width} V={V} seed={seed} k={k} lr_emb={r['lr_embedding']:.4g} "
            f"lr_hid={r['lr_hidden']:.3g} {tail} ({r['seconds']:.1f}s, elapsed {el / 60:.1f} min)",
            flush=True,
        )
        return float(r["loss"])

    def mean_loss(self, optim, width, V, k, seeds, hf=1.0):
        ls = [self.ensure(optim, width, V, s, k, hf) for s in seeds]
        return float(np.mean([x if math.isfinite(x) else 1e9 for x in ls]))

    def emb_grid(self, optim, width, V, seeds, centre, hf=1.0, first_seed_first=False):
        """The embedding-LR grid at hidden factor ``hf`` (k = centre-2 .. centre+2 to start),
        extended one point at a time until the best seed-mean loss has two grid points on each
        side; returns {k: mean loss}. ``first_seed_first``: bracket on the first seed alone
        (cheap while the first guess is off), then on the mean of all seeds from its best point."""
        passes = ([seeds[0]], seeds) if first_seed_first and len(seeds) > 1 else (seeds,)
        for ss in passes:
            grid = {k: self.mean_loss(optim, width, V, k, ss, hf) for k in range(centre - 2, centre + 3)}
            for _ in range(12):
                best = min(grid, key=grid.get)
                lo, hi = min(grid), max(grid)
                if best - lo < 2:
                    grid[lo - 1] = self.mean_loss(optim, width, V, lo - 1, ss, hf)
                elif hi - best < 2:
                    grid[hi + 1] = self.mean_loss(optim, width, V, hi + 1, ss, hf)
                else:
                    break
            centre = min(grid, key=grid.get)  # the all-seed pass starts at the first seed's best +- 2
        return grid
