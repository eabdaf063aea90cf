"""LV-rule sweep on a real corpus (issue 8's sweep, kept as the second check; its results are in
issue8/, run before the corrections of issue 16: the read-out was scaled twice, AdamH's hidden
LR took AdamW's exponent). This version has both corrections; its default preset has not been
rerun (experiments/lv_rule/REPORT.md).

The sweep: a tiny decoder-only LM, BPE vocabularies of several sizes,
hidden LR at its muP scaling, embedding LR on a 2^(k/2) grid, several seeds, two optimizer
variants (AdamW everywhere; AdamH on hidden matrices with AdamW on embedding/output/vectors).

Resumable: every finished run is appended to ``runs.csv``; runs already there are skipped.

    python experiments/lv_rule/corpus.py                 # issue 8's default sweep, corrected
    python experiments/lv_rule/corpus.py --preset smoke  # a few seconds
"""
from __future__ import annotations

import argparse
import csv
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
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the worktree's lvopt first
import lvopt  # noqa: E402
from lvopt.scaling import from_model  # noqa: E402

DEFAULT_CORPUS = "/usr/share/vim/vim90/doc"   # Debian package vim-runtime (Vim license)

PRESETS = {
    # The default sweep (~65-70 min on this 2-core CPU, one thread): 450 steps x 8 x 32 tokens per
    # run, the same for every config; AdamW at widths 32-256 and AdamH at 32-128, embedding LR
    # 0.32-5.12 (k = 8..16) and, for V = 128 whose optima sit lower, 0.08-0.23 (k = 4..7).
    # A preset is a grid, or a list of grids ("parts") whose runs are all done.
    "default": dict(vocabs=[128, 4096], seeds=[0, 1], steps=450, batch=8, seq=32, layers=2, parts=[
        dict(optims=["adamw"], widths=[32, 64, 128, 256], ks=list(range(8, 17))),
        dict(optims=["adamh"], widths=[32, 64, 128], ks=list(range(8, 17))),
        dict(optims=["adamw"], widths=[32, 64, 128, 256], ks=[4, 5, 6, 7], vocabs=[128]),
        dict(optims=["adamh"], widths=[32, 64, 128], ks=[4, 5, 6, 7], vocabs=[128]),
    ]),
    # The first, shorter sweep (150 steps, widths 32-128; results in runs_150steps.csv).
    "quick": dict(widths=[32, 64, 128], vocabs=[128, 4096], seeds=[0, 1], ks=[6, 7, 8, 9, 10, 11, 12, 13, 14],
                  optims=["adamw", "adamh"], steps=150, batch=8, seq=32, layers=2),
    "smoke": dict(widths=[32], vocabs=[128], seeds=[0], ks=[0, 2], optims=["adamw"],
                  steps=4, batch=4, seq=32, layers=1),
}
BASE_WIDTH = 32
EMB_LR0 = 0.02          # centre of the embedding-LR grid: lr_emb = EMB_LR0 * 2**(k/2)
HIDDEN_LR0 = {"adamw": 1e-2, "adamh": 0.05}   # hidden/output LR at BASE_WIDTH (AdamW x BASE_WIDTH/width,
                                              # AdamH's hyperball x (BASE_WIDTH/width)^(1/2))
FIELDS = ["optim", "width", "V", "seed", "k", "lr_embedding", "lr_hidden", "N", "D", "steps",
          "train_loss", "loss", "seconds"]


# ---------------------------------------------------------------------------- data

def read_corpus(corpus_dir: str, max_chars: int | None = None):
    files = sorted(glob.glob(os.path.join(corpus_dir, "*.txt")))
    if not files:
        raise SystemExit(f"no *.txt in {corpus_dir}; install Debian's vim-runtime or pass --corpus")
    train, val = [], []
    for f in files:   # split by file: ~10% of files (by name hash) are validation
        text = open(f, encoding="utf-8", errors="replace").read()
        (val if int(hashlib.md5(os.path.basename(f).encode()).hexdigest(), 16) % 10 == 0 else train).append(text)
    tr, va = "\n".join(train), "\n".join(val)
    if max_chars:
        tr, va = tr[:max_chars], va[:max_chars // 5]
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
    trainer = trainers.BpeTrainer(vocab_size=V, min_frequency=2, show_progress=False,
                                  special_tokens=["[UNK]"], limit_alphabet=min(V // 2, 96))
    chunks = tr.split("\n\n")
    tok.train_from_iterator(chunks, trainer=trainer)
    tok.save(os.path.join(cache, tag + ".json"))
    enc = lambda s: np.asarray([i for e in tok.encode_batch([c + "\n\n" for c in s.split("\n\n")])
                                for i in e.ids], dtype=np.int32)
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
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
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


def run_one(cfg, ids_tr, ids_va, optim, width, V, seed, k, steps, batch, seq, layers):
    torch.manual_seed(seed)
    model = TinyLM(V, width, layers, seq)
    lr_e = EMB_LR0 * 2 ** (k / 2)
    h0 = HIDDEN_LR0[optim]
    opt_cls = lvopt.AdamH if optim == "adamh" else lvopt.AdamW
    lrs = {"embedding": lr_e, "hidden": h0, "output": HIDDEN_LR0["adamw"], "vector": HIDDEN_LR0["adamw"]}
    wd = {"embedding": 0.0, "hidden": 0.0, "output": 0.0, "vector": 0.0}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = from_model(opt_cls, model, lr=lrs, base_width=BASE_WIDTH, rule="mup",
                         weight_decay=wd, overrides={"lm_head.weight": "output", "pos": "vector"},
                         allow_smaller_width=True)
    lr_h = opt.scaling_plan.role_lr("hidden")
    assert abs(opt.scaling_plan.role_lr("embedding") - lr_e) < 1e-12
    base = [g["lr"] for g in opt.param_groups]
    starts = batches(ids_tr, steps, batch, seq, seed)
    t_ids = torch.from_numpy(ids_tr.astype(np.int64))
    ar = torch.arange(seq + 1)
    warm = max(1, steps // 10)
    t0 = time.time()
    tl = []
    for s in range(steps):
        f = min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        w = t_ids[torch.from_numpy(starts[s]).unsqueeze(1) + ar]
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tl.append(loss.item())
        if not math.isfinite(tl[-1]):
            break
    # validation: fixed windows, same for every config of this V
    g = np.random.default_rng(7)
    vs = g.integers(0, len(ids_va) - seq - 1, size=min(64, max(8, len(ids_va) // seq)))
    v_ids = torch.from_numpy(ids_va.astype(np.int64))
    with torch.no_grad():
        vl = []
        for i in range(0, len(vs), 16):
            w = v_ids[torch.from_numpy(vs[i:i + 16]).unsqueeze(1) + ar]
            vl.append(F.cross_entropy(model(w[:, :-1]).reshape(-1, V), w[:, 1:].reshape(-1)).item())
    val = float(np.mean(vl)) if all(math.isfinite(x) for x in tl) else math.nan
    N = sum(p.numel() for p in model.parameters())
    return dict(optim=optim, width=width, V=V, seed=seed, k=k, lr_embedding=lr_e, lr_hidden=lr_h, N=N,
                D=steps * batch * seq, steps=steps, train_loss=float(np.mean(tl[-max(1, steps // 10):])),
                loss=val, seconds=round(time.time() - t0, 2))


# ---------------------------------------------------------------------------- sweep

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--out", default=os.path.join(HERE, "runs_corpus.csv"))
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"))
    ap.add_argument("--max-chars", type=int, default=3_000_000, help="use only this many corpus characters")
    ap.add_argument("--threads", type=int, default=1)
    for key in ("widths", "vocabs", "seeds", "ks"):
        ap.add_argument(f"--{key}", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--optims", type=lambda s: s.split(","), default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true", help="list the runs to do and exit")
    a = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _sweep(a)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was (tests call main)


def _sweep(a) -> int:
    P = dict(PRESETS[a.preset])
    for key in ("widths", "vocabs", "seeds", "ks", "optims", "steps"):
        if getattr(a, key) is not None:
            P[key] = getattr(a, key)
            P.pop("parts", None)   # an explicit grid replaces the preset's parts
    done = set()
    if os.path.exists(a.out):
        with open(a.out, newline="") as f:
            for r in csv.DictReader(f):
                done.add((r["optim"], int(r["width"]), int(r["V"]), int(r["seed"]), int(r["k"]), int(r["steps"])))
    # order: seed-major within each part, so that a partial sweep has complete first-seed grids
    todo = []
    for part in P.get("parts", [{}]):
        G = {**P, **part}
        todo += [(o, w, V, s, k) for s in G["seeds"] for V in G["vocabs"] for o in G["optims"]
                 for w in G["widths"] for k in G["ks"]
                 if (o, w, V, s, k, P["steps"]) not in done and (o, w, V, s, k) not in todo]
    P["vocabs"] = sorted({t[2] for t in todo} | set(P.get("vocabs", [])))
    total = len(todo) + sum(1 for d in done if d[5] == P["steps"])
    print(f"lv_rule: {len(todo)} runs to do, {total - len(todo)} already in {a.out}", flush=True)
    if a.dry_run:
        for t in todo:
            print(t)
        return 0
    data = {V: tokenize(a.corpus, V, a.cache, a.max_chars) for V in sorted(set(P["vocabs"]))}
    for V, (t, v) in data.items():
        print(f"lv_rule: V={V}: {len(t)} train tokens, {len(v)} val tokens", flush=True)
    new = not os.path.exists(a.out) or os.path.getsize(a.out) == 0
    t_start = time.time()
    with open(a.out, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            wr.writeheader()
        for i, (o, w, V, s, k) in enumerate(todo):
            r = run_one(P, *data[V], o, w, V, s, k, P["steps"], P["batch"], P["seq"], P["layers"])
            wr.writerow(r)
            f.flush()
            el = time.time() - t_start
            eta = el / (i + 1) * (len(todo) - i - 1)
            print(f"[{i + 1}/{len(todo)}] {o} width={w} V={V} seed={s} k={k} lr_emb={r['lr_embedding']:.4g} "
                  f"val={r['loss']:.4f} ({r['seconds']:.1f}s)  elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
