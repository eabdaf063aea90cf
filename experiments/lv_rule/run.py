"""The LV-rule sweep (issue 8): a small decoder-only LM on a real corpus, BPE vocabularies of
several sizes, widths, the embedding LR on a 2^(k/2) grid with the hidden LR at its muP scaling,
two seeds, lvopt.AdamW and lvopt.AdamH (hidden matrices on the hyperball). One CSV row per run.

    python experiments/lv_rule/run.py [--preset default|micro] [--out DIR] [--threads 1]

Resumable: finished runs are in <out>/runs.csv and are skipped; progress with an ETA on stdout.
Corpus: Vim's reference documentation (/usr/share/vim/vim90/doc/*.txt, Debian package
vim-runtime: ~9.8 MB of English technical prose, Vim license), split 95/5 into train and
validation by document; byte-level BPE trained on the training split with Hugging Face
`tokenizers` at each vocabulary size.
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import time

import torch
from torch import nn

import lvopt

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_GLOB = "/usr/share/vim/vim90/doc/*.txt"

PRESETS = {
    # 168 runs, ~30 min on one core of this machine (per-run times in REPORT.md). The embedding
    # LR grid base_lr*2^(k/2) takes every other k (factor-2 steps) over 4.2e-3..0.27: a first
    # pass with k = -1..6 found the optimum beyond 2.4e-2 at every width.
    "default": dict(widths=[32, 64, 128], vocabs=[256, 4096], ks=list(range(1, 14, 2)), seeds=[0, 1],
                    optimizers=["adamw", "adamh"], steps=250, batch=8, seq=64, layers=2, base_lr=3e-3),
    # the test's configuration: seconds
    "micro": dict(widths=[16, 32], vocabs=[260], ks=[0, 2], seeds=[0], optimizers=["adamw"], steps=3,
                  batch=2, seq=16, layers=1, base_lr=3e-3),
}
BASE_WIDTH = 32
FIELDS = ["optimizer", "V", "width", "k", "seed", "lr_embedding", "lr_hidden", "lr_output", "N", "D", "loss",
          "train_loss", "seconds", "param"]


# ----- data -----------------------------------------------------------------------------------

def corpus_files(limit: int | None = None) -> list[str]:
    files = sorted(glob.glob(CORPUS_GLOB))
    if not files:
        raise SystemExit(f"corpus not found ({CORPUS_GLOB}): install Debian's vim-runtime package")
    return files[:limit] if limit else files


def split_files(files):
    """Every 20th document is validation (5%), the rest training."""
    val = [f for i, f in enumerate(files) if i % 20 == 7]
    train = [f for f in files if f not in val]
    return train, val


def read(files) -> str:
    return "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def tokenize(V: int, cache: str, max_chars: int | None = None):
    """(train ids, val ids) as int64 tensors for a byte-level BPE of vocabulary size V."""
    path = os.path.join(cache, f"tokens_V{V}_{max_chars or 'all'}.pt")
    if os.path.exists(path):
        return torch.load(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = corpus_files()
    train_f, val_f = split_files(files)
    train_text, val_text = read(train_f), read(val_f)
    if max_chars:
        train_text, val_text = train_text[:max_chars], val_text[:max_chars // 10]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([train_text[i:i + 100_000] for i in range(0, len(train_text), 100_000)], trainer)
    ids = [torch.tensor(tok.encode(t).ids, dtype=torch.int64) for t in (train_text, val_text)]
    os.makedirs(cache, exist_ok=True)
    torch.save((ids[0], ids[1], tok.get_vocab_size()), path)
    return ids[0], ids[1], tok.get_vocab_size()


# ----- model ----------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, max(1, w // 32), batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(w, 4 * w, bias=False), nn.GELU(), nn.Linear(4 * w, w, bias=False))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self, V: int, w: int, layers: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(V, w)
        self.pos = nn.Parameter(torch.zeros(seq, w))
        self.blocks = nn.ModuleList(Block(w) for _ in range(layers))
        self.ln = nn.LayerNorm(w)
        self.head = nn.Linear(w, V, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.pos, std=0.02)
        for b in self.blocks:  # muP-style hidden init: std 1/sqrt(fan_in)
            for lin in (b.mlp[0], b.mlp[2]):
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        nn.init.zeros_(self.head.weight)  # muP: zero readout
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1), persistent=False)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for b in self.blocks:
            x = b(x, self.mask[: ids.shape[1], : ids.shape[1]])
        # muP output multiplier: logits scaled by base_width / width
        return self.head(self.ln(x)) * (BASE_WIDTH / x.shape[-1])


def batches(ids: torch.Tensor, batch: int, seq: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    starts = torch.randint(0, ids.numel() - seq - 1, (steps, batch), generator=g)
    for s in starts:
        idx = s[:, None] + torch.arange(seq + 1)
        chunk = ids[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def lrs(cfg, width: int, k: int) -> dict:
    """muP hidden and output LRs (Adam: base_lr * base_width / width); embedding base_lr*2^(k/2)
    whatever the width (the sweep finds its optimum)."""
    hidden = cfg["base_lr"] * BASE_WIDTH / width
    return dict(lr_embedding=cfg["base_lr"] * 2.0 ** (k / 2), lr_hidden=hidden, lr_output=hidden)


def train_one(cfg, V, width, k, seed, opt_name, data) -> dict:
    train_ids, val_ids, vocab = data
    torch.manual_seed(seed)
    model = LM(vocab, width, cfg["layers"], cfg["seq"])
    lr = lrs(cfg, width, k)
    emb = [model.embed.weight]
    out = [model.head.weight]
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and "blocks" in n]
    vec = [p for n, p in model.named_parameters()
           if not any(p is q for q in emb + out + hidden)]
    if opt_name == "adamw":
        groups = [dict(params=emb, lr=lr["lr_embedding"], weight_decay=0.0),
                  dict(params=hidden, lr=lr["lr_hidden"]), dict(params=out, lr=lr["lr_output"]),
                  dict(params=vec, lr=lr["lr_hidden"], weight_decay=0.0)]
        opt = lvopt.AdamW(groups, lr=lr["lr_hidden"], weight_decay=0.1)
    else:
        # AdamH: hidden matrices on the hyperball. Their lr is the effective LR (step in
        # normalised weight space); muP's Adam LR base_lr*32/w on a matrix with init std
        # 1/sqrt(w) (||W|| ~ sqrt(w), ||dW|| ~ lr*w) implies an effective LR ~ base_lr*sqrt(32)
        # * sqrt(32/w): 0.02*(32/w)^(1/2).
        groups = [dict(params=emb, lr=lr["lr_embedding"], hyperball=False, weight_decay=0.0),
                  dict(params=hidden, lr=0.02 * (BASE_WIDTH / width) ** 0.5, hyperball=True, weight_decay=0.0),
                  dict(params=out, lr=lr["lr_output"], hyperball=False, weight_decay=0.1),
                  dict(params=vec, lr=lr["lr_hidden"], hyperball=False, weight_decay=0.0)]
        opt = lvopt.AdamH(groups, lr=lr["lr_hidden"])
    warm = max(1, cfg["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg["steps"]) / cfg["steps"])))
    t0 = time.perf_counter()
    train_loss = float("nan")
    for x, y in batches(train_ids, cfg["batch"], cfg["seq"], cfg["steps"], seed):
        loss = nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_loss = float(loss.detach())
        if not math.isfinite(train_loss):
            break
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1)))
                  for x, y in batches(val_ids, 16, cfg["seq"], 8, 99)]
    val = sum(losses) / len(losses) if math.isfinite(train_loss) else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    return dict(optimizer=opt_name, V=V, width=width, k=k, seed=seed, **lr, N=n_params,
                D=cfg["steps"] * cfg["batch"] * cfg["seq"], loss=val, train_loss=train_loss,
                seconds=round(time.perf_counter() - t0, 2), param=f"{opt_name}-V{V}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-chars", type=int, default=None, help="use only this much of the corpus")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _sweep(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was (tests call main)


def _sweep(args) -> int:
    cfg = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.csv")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for r in csv.DictReader(f):
                done.add((r["optimizer"], int(r["V"]), int(r["width"]), int(r["k"]), int(r["seed"])))
    jobs = [(o, V, w, k, s) for V in cfg["vocabs"] for o in cfg["optimizers"] for w in cfg["widths"]
            for s in cfg["seeds"] for k in cfg["ks"]]
    todo = [j for j in jobs if j not in done]
    print(f"lv_rule: {len(jobs)} runs, {len(jobs) - len(todo)} done, {len(todo)} to go -> {path}", flush=True)
    new = not os.path.exists(path)
    f = open(path, "a", newline="")
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    if new:
        writer.writeheader()
    data_cache: dict = {}
    t_start = time.perf_counter()
    for i, (o, V, w, k, s) in enumerate(todo):
        if V not in data_cache:
            data_cache[V] = tokenize(V, os.path.join(args.out, "cache"), args.max_chars)
        row = train_one(cfg, V, w, k, s, o, data_cache[V])
        writer.writerow(row)
        f.flush()
        el = time.perf_counter() - t_start
        eta = el / (i + 1) * (len(todo) - i - 1)
        print(f"[{i + 1}/{len(todo)}] {o} V={V} width={w} k={k} seed={s}: val loss {row['loss']:.4f} "
              f"({row['seconds']:.1f} s; ETA {eta / 60:.1f} min)", flush=True)
    f.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
