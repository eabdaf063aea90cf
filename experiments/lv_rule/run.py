"""LV-rule sweep on a controlled synthetic task in which the vocabulary changes and the task does not.

The task: K = 8 hidden classes follow a fixed Markov chain (transition matrix T, the same for
every V). Class c emits one of V/K tokens with Zipf(1) frequencies. The model sees one token
and predicts the class of the next one, so the best achievable loss is the mean entropy of
T's rows whatever V is; V changes only how many embedding rows must be learned and how
rarely each is seen. The model is a muP MLP: token embedding (N(0, 1), sparse rows,
``lvopt.nn.Embedding``) -> two hidden d x d matrices (N(0, 1/d), ReLU) -> a zero-initialised
K x d read-out, no output multiplier. LRs come from ``lvopt.scaling.from_model(...,
rule="mup", base_width=32)``: hidden and output x 32/width (AdamW) or, for AdamH's hyperball
matrices, x (32/width)^(1/2); the embedding LR is swept on a sqrt(2) grid, extended until
every optimum has two grid points on each side. At the best embedding LR the hidden LR is
then moved by 2^(+-1) (the hidden-LR check per width) and, for AdamW, swept on a sqrt(2) grid
until its best point is interior, with the embedding-LR grid redone at that hidden LR (the
refinement: the optimal ratio of the two optima, not only of the embedding optimum at muP's
hidden LR).

Resumable: every finished run is appended to ``runs.csv`` and skipped next time; the grid
extensions are decided from the rows already there, so a restarted sweep continues where it
stopped.

    python experiments/lv_rule/run.py                 # default sweep (~60-75 min, one core)
    python experiments/lv_rule/run.py --preset smoke  # a few seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the worktree's lvopt first
import lvopt  # noqa: E402
from lvopt.scaling import from_model  # noqa: E402
import sweep  # noqa: E402
from sweep import FIELDS  # noqa: E402,F401  (the columns of runs.csv: run.FIELDS)

K = 16  # hidden classes
ZIPF = 1.0  # within-class token frequencies ~ 1 / rank**ZIPF
TASK_SEED = 20261130  # the Markov chain: fixed, shared by every V, width and seed
BASE_WIDTH = 32
EMB_LR0 = 0.01  # embedding LR grid: EMB_LR0 * 2**(k/2)
HIDDEN_LR0 = {"adamw": 1.6e-2, "adamh": 0.02}  # hidden and output LR at BASE_WIDTH
OUTPUT_LR0 = 8e-3
EVAL_N = 8192

PRESETS = {
    # parts are done in order; within a part, config by config (all seeds), so that a partial
    # sweep holds complete configurations.
    "default": dict(
        steps=300,
        batch=1024,
        seeds=[0, 1, 2],
        parts=[
            dict(optims=["adamw"], vocabs=[16, 65536], widths=[32, 64, 128, 256]),
            dict(optims=["adamw"], vocabs=[16, 65536], widths=[32, 64, 128, 256], hidden_check=True),
            dict(optims=["adamh"], vocabs=[16, 65536], widths=[32, 64, 128, 256]),
            dict(optims=["adamw"], vocabs=[16, 65536], widths=[32, 64, 128, 256], refine=True),
            dict(optims=["adamw"], vocabs=[1024], widths=[32, 64, 128, 256], refine=True),
            dict(optims=["adamh"], vocabs=[16, 65536], widths=[32, 64, 128, 256], hidden_check=True),
            dict(optims=["adamh"], vocabs=[16, 65536], widths=[32, 64, 128, 256], refine="hidden"),
        ],
    ),
    "smoke": dict(
        steps=6,
        batch=64,
        seeds=[0],
        parts=[
            dict(optims=["adamw"], vocabs=[16], widths=[16], ks=[0, 2]),
        ],
    ),
}


# ---------------------------------------------------------------------------- task


class Task:
    """The synthetic language at vocabulary ``V`` (a multiple of K)."""

    def __init__(self, V: int):
        if V % K:
            raise ValueError(f"V must be a multiple of K={K}, got {V}")
        self.V, self.per = V, V // K
        g = torch.Generator().manual_seed(TASK_SEED)
        # Rows of T: squared Exp(1) draws, normalised; the same for every V.
        x = -torch.log(torch.rand(K * K, K, generator=g, dtype=torch.float64))  # Exp(1) = Gamma(1)
        x = x**2  # sharper rows
        self.T = x / x.sum(1, keepdim=True)  # row c1 * K + c2: next class after classes c1, c2
        self.bayes = float(-(self.T * self.T.log()).sum(1).mean())  # classes uniform
        p = 1.0 / torch.arange(1, self.per + 1, dtype=torch.float64) ** ZIPF
        self.cdf = (p / p.sum()).cumsum(0)
        self.cdf[-1] = 1.0
        self.T32, self.Tcdf = self.T.float(), self.T.cumsum(1)
        self.Tcdf[:, -1] = 1.0

    def sample(self, n: int, g: torch.Generator):
        """(tokens (n, 2), context rows of T (n,), next classes (n,)) of n independent draws:
        two classes, one token of each, then the next class. Token id = class + K * rank."""
        c = torch.randint(0, K, (n, 2), generator=g)
        r = torch.searchsorted(self.cdf, torch.rand(n, 2, generator=g, dtype=torch.float64))
        r = r.clamp_max(self.per - 1)
        row = c[:, 0] * K + c[:, 1]
        y = torch.searchsorted(self.Tcdf[row], torch.rand(n, 1, generator=g, dtype=torch.float64)).squeeze(1)
        return c + K * r, row, y.clamp_max(K - 1)

    def eval_set(self):
        g = torch.Generator().manual_seed(999)
        x, c, _ = self.sample(EVAL_N, g)
        return x, self.T32[c]  # exact next-class distributions: the loss is Bayes + KL


class MLP(nn.Module):
    def __init__(self, V: int, d: int):
        super().__init__()
        self.embedding = lvopt.nn.Embedding(V, d)
        self.fc1 = nn.Linear(2 * d, d, bias=False)
        self.fc2 = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, K, bias=False)
        nn.init.normal_(self.embedding.weight, std=1.0)
        nn.init.normal_(self.fc1.weight, std=(2 * d) ** -0.5)
        nn.init.normal_(self.fc2.weight, std=(2.0 / d) ** 0.5)  # after a ReLU
        nn.init.zeros_(self.head.weight)

    def forward(self, x):
        h = torch.relu(self.fc1(self.embedding(x).flatten(-2)))
        return self.head(torch.relu(self.fc2(h)))


def make_optimizer(model, optim, lr_e, hidden_factor=1.0, rule="mup"):
    opt_cls = lvopt.AdamH if optim == "adamh" else lvopt.AdamW
    lrs = {"embedding": lr_e, "hidden": HIDDEN_LR0[optim] * hidden_factor, "output": OUTPUT_LR0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # V < width at V = 16: the warning is the point of the V axis
        return from_model(
            opt_cls,
            model,
            lr=lrs,
            base_width=BASE_WIDTH,
            rule=rule,
            weight_decay=0.0,
            overrides={"head.weight": "output"},
            allow_smaller_width=True,
        )


# ---------------------------------------------------------------------------- one run


def run_one(task, ev, optim, width, seed, k, steps, batch, hidden_factor=1.0):
    torch.manual_seed(seed)
    model = MLP(task.V, width)
    lr_e = EMB_LR0 * 2 ** (k / 2)
    opt = make_optimizer(model, optim, lr_e, hidden_factor)
    plan = opt.scaling_plan
    lr_h = plan.role_lr("hidden")
    alpha_h = 0.5 if optim == "adamh" else 1.0  # the corrected rule (lvopt.scaling.HYPERBALL_HIDDEN)
    assert abs(lr_h - HIDDEN_LR0[optim] * hidden_factor * (BASE_WIDTH / width) ** alpha_h) < 1e-12 * lr_h
    assert plan.role_lr("embedding") == lr_e
    base = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(1000 + seed)  # the batches depend on the seed only
    ce = nn.functional.cross_entropy
    t0 = time.time()
    tl = []
    for s in range(steps):
        f = sweep.lr_factor(s, steps)
        for grp, b in zip(opt.param_groups, base):
            grp["lr"] = b * f
        x, _, y = task.sample(batch, g)
        if not sweep.train_step(opt, ce(model(x), y), tl):
            break
    with torch.no_grad():
        ex, et = ev
        val = float(-(et * torch.log_softmax(model(ex), 1)).sum(1).mean())
    if not all(math.isfinite(v) for v in tl):
        val = math.nan
    N = sum(p.numel() for p in model.parameters())
    return dict(
        optim=optim,
        width=width,
        V=task.V,
        seed=seed,
        k=k,
        lr_embedding=lr_e,
        lr_hidden=lr_h,
        N=N,
        D=steps * batch,
        steps=steps,
        train_loss=float(np.mean(tl[-max(1, steps // 10) :])),
        loss=val,
        seconds=round(time.time() - t0, 2),
    )


# ---------------------------------------------------------------------------- sweep


def centre_k(width: int) -> int:
    """First guess of the best k: half-way between muP (no drift) and LV (lr_emb ~ width^-1/2)."""
    return 10 - round(0.5 * math.log2(width / BASE_WIDTH))


def nominal_hidden(optim, width):
    return sweep.nominal_hidden(HIDDEN_LR0, BASE_WIDTH, optim, width)


class Sweep(sweep.Sweep):
    def __init__(self, out, P):
        super().__init__(out, P["steps"], nominal_hidden)
        self.P = P
        self.tasks, self.evs = {}, {}

    def task(self, V):
        if V not in self.tasks:
            self.tasks[V] = Task(V)
            self.evs[V] = self.tasks[V].eval_set()
        return self.tasks[V], self.evs[V]

    def run(self, optim, width, V, seed, k, hf):
        task, ev = self.task(V)
        r = run_one(task, ev, optim, width, seed, k, self.P["steps"], self.P["batch"], hf)
        return r, f"loss={r['loss']:.4f} (bayes {task.bayes:.4f})"

    def config(self, optim, width, V, seeds, ks=None, hidden_check=False, refine=False):
        """The embedding-LR optimum at the muP hidden LR (bracketed); then optionally the hidden-LR
        check (x 2^-1, x 2 at the best embedding point) or the refinement: the hidden LR on a
        sqrt(2) grid at the best embedding point, extended until its best point is interior, and
        the embedding-LR grid again at that hidden LR."""
        if ks is not None:
            for k in ks:
                self.mean_loss(optim, width, V, k, seeds)
            return
        grid = self.emb_grid(optim, width, V, seeds, centre_k(width))
        best = min(grid, key=grid.get)
        if hidden_check:
            for hf in (0.5, 2.0):
                self.mean_loss(optim, width, V, best, seeds, hf)
        if refine:
            hg = {j: self.mean_loss(optim, width, V, best, seeds, 2 ** (j / 2)) for j in range(-2, 3)}
            for _ in range(6):
                jb = min(hg, key=hg.get)
                if jb == min(hg):
                    hg[jb - 1] = self.mean_loss(optim, width, V, best, seeds, 2 ** ((jb - 1) / 2))
                elif jb == max(hg):
                    hg[jb + 1] = self.mean_loss(optim, width, V, best, seeds, 2 ** ((jb + 1) / 2))
                else:
                    break
            jb = min(hg, key=hg.get)
            if jb != 0 and refine != "hidden":  # "hidden": the hidden-LR grid only
                self.emb_grid(optim, width, V, seeds, best, 2 ** (jb / 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    sweep.add_arguments(ap, os.path.join(HERE, "runs.csv"))
    a = ap.parse_args(argv)
    P = PRESETS[a.preset]
    sw = Sweep(a.out, P)
    print(f"lv_rule: {len(sw.rows)} runs already in {a.out}", flush=True)
    sweep.for_each_config(
        P,
        a.parts,
        a.threads,
        lambda part, o, V, w: sw.config(
            o, w, V, P["seeds"], part.get("ks"), part.get("hidden_check", False), part.get("refine", False)
        ),
    )
    print(f"lv_rule: done, {sw.n_new} new runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
