"""LV-rule sweep on a real corpus: the second check of issue 16, next to the synthetic sweep
(run.py). Issue 8's version of this sweep (results in issue8/) could not answer: its read-out
was scaled twice (a 32/width logit multiplier and the `output` role's 1/m LR), AdamH's
hyperball matrices took AdamW's hidden exponent 1, a step held 8 x 32 tokens (fewer distinct
tokens than the width), two seeds, a fixed embedding-LR grid and the hidden LR never checked.
This version:

- a pre-LN decoder with untied embedding N(0, 1), hidden matrices N(0, 1/fan_in) and a
  zero-initialised read-out *without* an output multiplier: the read-out is scaled once, by the
  `output` role's LR (x 32/width under muP);
- LRs from ``lvopt.scaling.from_model(rule="mup", base_width=32)``: hidden x 32/width for AdamW,
  x (32/width)^(1/2) for AdamH's hyperball matrices (the corrected exponent), the embedding LR
  (muP exponent 0) swept on a sqrt(2) grid that is extended until the best seed-mean loss has two
  grid points on each side (first on seed 0, then on the mean of all seeds);
- 16 x 64 tokens per step (480-540 distinct tokens per step at V = 4096, more than every width;
  at V = 128 the whole vocabulary appears in every step);
- three seeds; the hidden-LR check (hidden LR x 1/2 and x 2 at the best embedding LR) at the
  widths of the ``hidden_check`` parts.

Resumable: every finished run is appended to ``runs_corpus.csv`` (the columns of runs.csv) and
skipped next time; the grid extensions are decided from the rows already there.

    python experiments/lv_rule/corpus.py                 # the corrected sweep (~65 min, one shared core)
    python experiments/lv_rule/analyze.py experiments/lv_rule/runs_corpus.csv \
        --out experiments/lv_rule/results_corpus
    python experiments/lv_rule/corpus.py --preset smoke  # a few seconds
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the worktree's lvopt first
import lvopt  # noqa: E402
from lvopt.scaling import from_model  # noqa: E402
import sweep  # noqa: E402
from sweep import FIELDS  # noqa: E402,F401  (runs.csv's columns: corpus.FIELDS)

DEFAULT_CORPUS = "/usr/share/vim/vim90/doc"  # Debian package vim-runtime (Vim license)

PRESETS = {
    # The corrected sweep. Parts are done in order, configuration by configuration; a part with
    # ``ks`` runs that fixed grid, otherwise the embedding-LR grid is adaptive (see Sweep.emb_grid).
    # Widths 16-128 (V/width 32-256 at V = 4096, 1-8 at V = 128); a hidden_check part reuses the
    # grid already run and adds the hidden LR x 1/2 and x 2 at its best point. Width 256 and AdamH
    # come last: on a shared 2-core machine the first four parts take about an hour.
    "default": dict(
        seeds=[0, 1, 2],
        steps=160,
        batch=16,
        seq=64,
        layers=2,
        parts=[
            dict(optims=["adamw"], vocabs=[4096], widths=[16, 32, 64, 128]),
            dict(optims=["adamw"], vocabs=[128], widths=[16, 32, 64, 128]),
            dict(optims=["adamw"], vocabs=[4096, 128], widths=[16, 128], hidden_check=True),
            dict(optims=["adamw"], vocabs=[4096, 128], widths=[32, 64], hidden_check=True),
            dict(optims=["adamw"], vocabs=[128], widths=[256]),
            dict(optims=["adamw"], vocabs=[4096], widths=[256]),
            dict(optims=["adamh"], vocabs=[4096, 128], widths=[16, 32, 64, 128]),
        ],
    ),
    # Issue 8's sweep (450 steps x 8 x 32 tokens, two seeds, fixed grids), now with the corrected
    # read-out and AdamH exponent; its results before the corrections are in issue8/.
    "issue8": dict(
        seeds=[0, 1],
        steps=450,
        batch=8,
        seq=32,
        layers=2,
        parts=[
            dict(optims=["adamw"], vocabs=[128, 4096], widths=[32, 64, 128, 256], ks=list(range(8, 17))),
            dict(optims=["adamh"], vocabs=[128, 4096], widths=[32, 64, 128], ks=list(range(8, 17))),
            dict(optims=["adamw"], vocabs=[128], widths=[32, 64, 128, 256], ks=[4, 5, 6, 7]),
            dict(optims=["adamh"], vocabs=[128], widths=[32, 64, 128], ks=[4, 5, 6, 7]),
        ],
    ),
    "smoke": dict(
        seeds=[0],
        steps=4,
        batch=4,
        seq=32,
        layers=1,
        parts=[
            dict(optims=["adamw"], vocabs=[128], widths=[32], ks=[0, 2]),
        ],
    ),
}
# first guess of the best k per V (lr_emb = EMB_LR0 * 2**(k/2)); the grid is extended from there
CENTRE_K = {128: 10, 4096: 15}
BASE_WIDTH = 32
EMB_LR0 = 0.02  # centre of the embedding-LR grid: lr_emb = EMB_LR0 * 2**(k/2)
HIDDEN_LR0 = {"adamw": 1e-2, "adamh": 0.05}  # hidden/output LR at BASE_WIDTH (AdamW x BASE_WIDTH/width,
# AdamH's hyperball x (BASE_WIDTH/width)^(1/2))
EVAL_WINDOWS = 128  # validation windows (fixed, the same for every config of a V)


# ---------------------------------------------------------------------------- data


def read_corpus(corpus_dir: str, max_chars: int | None = None):
    files = sorted(glob.glob(os.path.join(corpus_dir, "*.txt")))
    if not files:
        raise SystemExit(f"no *.txt in {corpus_dir}; install Debian's vim-runtime or pass --corpus")
    train, val = [], []
    for f in files:  # split by file: ~10% of files (by name hash) are validation
        text = open(f, encoding="utf-8", errors="replace").read()
        (val if int(hashlib.md5(os.path.basename(f).encode()).hexdigest(), 16) % 10 == 0 else train).append(text)
    tr, va = "\n".join(train), "\n".join(val)
    if max_chars:
        tr, va = tr[:max_chars], va[: max_chars // 5]
    return tr, va


def tokenize(corpus_dir, V, cache, max_chars=None):
    """BPE (Hugging Face tokenizers, byte level) trained on the training split; ids cached."""
    os.makedirs(cache, exist_ok=True)
    tag = f"V{V}_{max_chars or 'all'}"
    p = os.path.join(cache, tag + ".npz")
    if os.path.exists(p):
        z = np.load(p)
        return z["train"], z["val"]
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tr, va = read_corpus(corpus_dir, max_chars)
    # character-level BPE (rare characters -> [UNK]) so that V can be as small as ~100
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=V, min_frequency=2, show_progress=False, special_tokens=["[UNK]"], limit_alphabet=min(V // 2, 96)
    )
    chunks = tr.split("\n\n")
    tok.train_from_iterator(chunks, trainer=trainer)
    tok.save(os.path.join(cache, tag + ".json"))

    def enc(s):
        return np.asarray(
            [i for e in tok.encode_batch([c + "\n\n" for c in s.split("\n\n")]) for i in e.ids], dtype=np.int32
        )

    t, v = enc(tr), enc(va)
    assert tok.get_vocab_size() <= V and t.max() < V, (tok.get_vocab_size(), V)
    np.savez(p, train=t, val=v)
    return t, v


# ---------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.heads = heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Pre-LN decoder; untied embedding (init N(0,1)) and zero-initialised readout (muP, Tensor
    Programs V Table 3: the output LR scaled by 1/m through the `output` role; issue 8's version
    also multiplied the logits by 1/m, which scaled the read-out twice); hidden matrices
    N(0, 1/fan_in)."""

    def __init__(self, V, d, layers, seq):
        super().__init__()
        self.embedding = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, max(1, d // 32)) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        nn.init.normal_(self.embedding.weight, std=1.0)
        for b in self.blocks:
            for lin in (b.qkv, b.proj, b.fc1, b.fc2):
                nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        nn.init.zeros_(self.lm_head.weight)

    def forward(self, idx):
        x = self.embedding(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


# ---------------------------------------------------------------------------- one run


def batches(ids, steps, batch, seq, seed):
    """The token windows of every step, fixed by the seed alone (shared across configs)."""
    g = np.random.default_rng(1000 + seed)
    starts = g.integers(0, len(ids) - seq - 1, size=(steps, batch))
    return starts


def nominal_hidden(optim, width):
    """The muP hidden LR: AdamW x 32/width, AdamH's hyperball matrices x (32/width)^(1/2)."""
    return sweep.nominal_hidden(HIDDEN_LR0, BASE_WIDTH, optim, width)


def run_one(cfg, ids_tr, ids_va, optim, width, V, seed, k, steps, batch, seq, layers, hidden_factor=1.0):
    torch.manual_seed(seed)
    model = TinyLM(V, width, layers, seq)
    lr_e = EMB_LR0 * 2 ** (k / 2)
    h0 = HIDDEN_LR0[optim] * hidden_factor
    opt_cls = lvopt.AdamH if optim == "adamh" else lvopt.AdamW
    lrs = {"embedding": lr_e, "hidden": h0, "output": HIDDEN_LR0["adamw"], "vector": HIDDEN_LR0["adamw"]}
    wd = {"embedding": 0.0, "hidden": 0.0, "output": 0.0, "vector": 0.0}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # V < 16 x width at V = 128: the small-V end is the point
        opt = from_model(
            opt_cls,
            model,
            lr=lrs,
            base_width=BASE_WIDTH,
            rule="mup",
            weight_decay=wd,
            overrides={"lm_head.weight": "output", "pos": "vector"},
            allow_smaller_width=True,
        )
    lr_h = opt.scaling_plan.role_lr("hidden")
    # the corrected rule, checked: hidden x 32/width (AdamW) or x (32/width)^(1/2) (AdamH's
    # hyperball), output x 32/width, embedding unscaled
    assert abs(lr_h / (nominal_hidden(optim, width) * hidden_factor) - 1) < 1e-9, (lr_h, optim, width)
    assert abs(opt.scaling_plan.role_lr("output") / (HIDDEN_LR0["adamw"] * BASE_WIDTH / width) - 1) < 1e-9
    assert abs(opt.scaling_plan.role_lr("embedding") - lr_e) < 1e-12
    base = [g["lr"] for g in opt.param_groups]
    starts = batches(ids_tr, steps, batch, seq, seed)
    t_ids = torch.from_numpy(ids_tr.astype(np.int64))
    ar = torch.arange(seq + 1)
    t0 = time.time()
    tl, distinct = [], []
    for s in range(steps):
        f = sweep.lr_factor(s, steps)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        w = t_ids[torch.from_numpy(starts[s]).unsqueeze(1) + ar]
        distinct.append(int(w[:, :-1].unique().numel()))
        logits = model(w[:, :-1])
        if not sweep.train_step(opt, F.cross_entropy(logits.reshape(-1, V), w[:, 1:].reshape(-1)), tl):
            break
    # validation: fixed windows, the same for every config of this V
    g = np.random.default_rng(7)
    vs = g.integers(0, len(ids_va) - seq - 1, size=min(EVAL_WINDOWS, max(8, len(ids_va) // seq)))
    v_ids = torch.from_numpy(ids_va.astype(np.int64))
    with torch.no_grad():
        vl = []
        for i in range(0, len(vs), 16):
            w = v_ids[torch.from_numpy(vs[i : i + 16]).unsqueeze(1) + ar]
            vl.append(F.cross_entropy(model(w[:, :-1]).reshape(-1, V), w[:, 1:].reshape(-1)).item())
    val = float(np.mean(vl)) if all(math.isfinite(x) for x in tl) else math.nan
    N = sum(p.numel() for p in model.parameters())
    r = dict(
        optim=optim,
        width=width,
        V=V,
        seed=seed,
        k=k,
        lr_embedding=lr_e,
        lr_hidden=lr_h,
        N=N,
        D=steps * batch * seq,
        steps=steps,
        train_loss=float(np.mean(tl[-max(1, steps // 10) :])),
        loss=val,
        seconds=round(time.time() - t0, 2),
    )
    return r, float(np.mean(distinct))


# ---------------------------------------------------------------------------- sweep


class _DryRun(Exception):
    pass


class Sweep(sweep.Sweep):
    """Runs on demand: ``ensure`` returns a finished run's loss from the csv or runs it (with
    ``--dry-run``: raises _DryRun naming the run instead)."""

    def __init__(self, a, P):
        super().__init__(a.out, P["steps"], nominal_hidden)
        self.a, self.P = a, P
        self.data = {}

    def ids(self, V):
        if V not in self.data:
            self.data[V] = tokenize(self.a.corpus, V, self.a.cache, self.a.max_chars)
            t, v = self.data[V]
            print(f"lv_rule: V={V}: {len(t)} train tokens, {len(v)} val tokens", flush=True)
        return self.data[V]

    def run(self, optim, width, V, seed, k, hf):
        if self.a.dry_run:
            raise _DryRun((optim, width, V, seed, k, hf))
        P = self.P
        r, distinct = run_one(
            P, *self.ids(V), optim, width, V, seed, k, P["steps"], P["batch"], P["seq"], P["layers"], hf
        )
        return r, f"val={r['loss']:.4f} train={r['train_loss']:.4f} distinct/step={distinct:.0f}"

    def emb_grid(self, optim, width, V, seeds, centre, hf=1.0):
        """The embedding-LR grid (k = centre-2 .. centre+2 to start), extended one point at a time
        until the best point has two grid points on each side: first on the first seed alone (cheap
        while the first guess is off), then on the mean of all seeds. Returns {k: mean loss}."""
        return super().emb_grid(optim, width, V, seeds, centre, hf, first_seed_first=True)

    def config(self, optim, width, V, seeds, ks=None, hidden_check=False):
        """The embedding-LR optimum at the muP hidden LR (bracketed, or the fixed grid ``ks``);
        then optionally the hidden-LR check: x 1/2 and x 2 at the best embedding point."""
        if ks is not None:
            for s in seeds:
                for k in ks:
                    self.ensure(optim, width, V, s, k)
            return
        grid = self.emb_grid(optim, width, V, seeds, CENTRE_K[V])
        best = min(grid, key=grid.get)
        if hidden_check:
            for hf in (0.5, 2.0):
                self.mean_loss(optim, width, V, best, seeds, hf)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    sweep.add_arguments(ap, os.path.join(HERE, "runs_corpus.csv"))
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"))
    ap.add_argument("--max-chars", type=int, default=3_000_000, help="use only this many corpus characters")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="per configuration, the next run the csv does not "
        "hold yet (optim, width, V, seed, k, hidden factor); runs nothing",
    )
    a = ap.parse_args(argv)
    P = PRESETS[a.preset]
    sw = Sweep(a, P)
    print(f"lv_rule: {len(sw.rows)} runs already in {a.out}", flush=True)

    def config(part, o, V, w):
        try:
            sw.config(o, w, V, P["seeds"], part.get("ks"), part.get("hidden_check", False))
        except _DryRun as e:  # the next run this configuration needs (adaptive grids
            print("next:", *e.args, flush=True)  # decide the rest from its loss)

    sweep.for_each_config(P, a.parts, a.threads, config)
    print(f"lv_rule: done, {sw.n_new} new runs, {(time.time() - sw.t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
