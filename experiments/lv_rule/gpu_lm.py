"""The LV-rule experiment as a language model, sized for one GPU (<= 8 minutes on one H200).

A synthetic language in which the vocabulary changes and the grammar does not: K = 16 hidden
classes follow a fixed first-order Markov chain; class c emits one of V/K tokens with Zipf(1)
frequencies. A pre-LN decoder (muP: token embedding N(0, 1), position table N(0, 1), hidden
matrices N(0, 1/fan_in), zero-initialised untied read-out, attention scale 1/d_head, no output
multiplier) predicts the next token. The Bayes loss is H(next class | class) + H(Zipf over
V/K tokens), computed exactly; ``excess`` = loss - Bayes.

LRs from ``lvopt.scaling.from_model(..., rule="mup", base_width=128)``: hidden and output x
128/width; the embedding LR 0.01 * 2^(k/2) is swept in rings around a first guess per width
(half-way between muP and LV), ring after ring over every (V, width), so that a run cut short
by the time budget still has every configuration's best points. Widths 128-1024, V 128 and
32,768, 2 M tokens per run by default.

Streams as it goes: every finished run is appended to ``$OUT/runs.csv`` (run.py's columns) and
a line to ``$OUT/gpu_lm.log``; at the end (or when the budget runs out) analyze.py's tables
go to ``$OUT/results.md``. ``OUT`` defaults to ``gpu-out``.

    python experiments/lv_rule/gpu_lm.py                      # the GPU sweep
    python experiments/lv_rule/gpu_lm.py --preset smoke       # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch
from torch import nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import lvopt  # noqa: E402
from lvopt.scaling import from_model  # noqa: E402
import sweep  # noqa: E402
from sweep import FIELDS  # noqa: E402,F401  (run.py's columns: gpu_lm.FIELDS)

K = 16
TASK_SEED = 20261201
PRESETS = {
    "default": dict(
        widths=[128, 256, 512, 1024],
        vocabs=[128, 32768],
        seeds=[0],
        rings=[0, 1, -1, 2, -2, 3, -3],
        tokens=2_000_000,
        seq=256,
        batch=32,
        layers=2,
        base_width=128,
        budget_s=450,
    ),
    "smoke": dict(
        widths=[16, 32],
        vocabs=[32, 256],
        seeds=[0],
        rings=[0],
        tokens=256,
        seq=16,
        batch=4,
        layers=1,
        base_width=16,
        budget_s=120,
    ),
}
EMB_LR0 = 0.01
HIDDEN_LR0 = 4e-3  # hidden and output LR at base_width (x base_width/width)
VECTOR_LR = 4e-3


class Language:
    def __init__(self, V, device):
        if V % K:
            raise ValueError(f"V must be a multiple of {K}, got {V}")
        self.V, self.per, self.device = V, V // K, device
        g = torch.Generator().manual_seed(TASK_SEED)
        x = -(torch.log(torch.rand(K, K, generator=g, dtype=torch.float64)) ** 2)
        T = x / x.sum(1, keepdim=True)
        pi = torch.full((K,), 1.0 / K, dtype=torch.float64)
        for _ in range(500):
            pi = pi @ T
        p = 1.0 / torch.arange(1, self.per + 1, dtype=torch.float64)
        p = p / p.sum()
        self.bayes = float(-(pi[:, None] * T * T.log()).sum() - (p * p.log()).sum())
        self.Tcdf = T.cumsum(1).to(device)
        self.Tcdf[:, -1] = 1.0
        self.zcdf = p.cumsum(0).to(device)
        self.zcdf[-1] = 1.0
        self.pi_cdf = pi.cumsum(0).to(device)
        self.pi_cdf[-1] = 1.0

    def sequences(self, n, length, seed):
        """n token sequences of ``length``, the chain started from its stationary law."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        u = torch.rand(n, length, generator=g, device=self.device, dtype=torch.float64)
        r = torch.rand(n, length, generator=g, device=self.device, dtype=torch.float64)
        c = torch.empty(n, length, dtype=torch.long, device=self.device)
        c[:, 0] = torch.searchsorted(self.pi_cdf, u[:, 0].contiguous())
        for t in range(1, length):
            c[:, t] = torch.searchsorted(self.Tcdf[c[:, t - 1]], u[:, t : t + 1].contiguous()).squeeze(1)
        c.clamp_(max=K - 1)
        rank = torch.searchsorted(self.zcdf, r).clamp_(max=self.per - 1)
        return c + K * rank


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.hd = min(64, d)
        for lin in (self.qkv, self.proj, self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, d // self.hd, self.hd).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / self.hd)  # muP: 1/d_head
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class LM(nn.Module):
    def __init__(self, V, d, layers, seq):
        super().__init__()
        self.tok = nn.Embedding(V, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        nn.init.normal_(self.tok.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=1.0)
        nn.init.zeros_(self.head.weight)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def centre_k(width, base_width):
    return 6 - round(0.5 * math.log2(width / base_width))


def run_one(lang, train, val, width, seed, k, P, device, optimizer):
    torch.manual_seed(seed)
    model = LM(lang.V, width, P["layers"], P["seq"]).to(device)
    lr_e = EMB_LR0 * 2 ** (k / 2)
    opt_cls = torch.optim.AdamW if optimizer == "torch" else lvopt.AdamW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # V = 128 < 16 x width: on purpose
        opt = from_model(
            opt_cls,
            model,
            lr={"embedding": lr_e, "hidden": HIDDEN_LR0, "output": HIDDEN_LR0, "vector": VECTOR_LR},
            base_width=P["base_width"],
            rule="mup",
            weight_decay=0.0,
            allow_smaller_width=True,
        )
    groups = [dict(g) for g in opt.param_groups]
    base = [g["lr"] for g in opt.param_groups]
    lr_h = opt.scaling_plan.role_lr("hidden")
    steps = max(1, P["tokens"] // (P["batch"] * P["seq"]))
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    t0 = time.time()
    tl = []
    n = train.shape[0]
    for s in range(steps):
        f = sweep.lr_factor(s, steps)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        i = (s * P["batch"]) % max(1, n - P["batch"] + 1)
        w = train[i : i + P["batch"]]
        with amp:
            logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, lang.V), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s >= steps - max(1, steps // 10):
            tl.append(loss.detach())
    with torch.no_grad(), amp:
        vl = [
            F.cross_entropy(model(val[i : i + 64, :-1]).float().reshape(-1, lang.V), val[i : i + 64, 1:].reshape(-1))
            for i in range(0, val.shape[0], 64)
        ]
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_loss = float(torch.stack(tl).mean())
    loss = float(torch.stack(vl).mean())
    if not (math.isfinite(train_loss) and math.isfinite(loss)):
        loss = math.nan
    del groups
    return dict(
        optim="adamw",
        width=width,
        V=lang.V,
        seed=seed,
        k=k,
        lr_embedding=lr_e,
        lr_hidden=lr_h,
        N=sum(p.numel() for p in model.parameters()),
        D=steps * P["batch"] * P["seq"],
        steps=steps,
        train_loss=train_loss,
        loss=loss,
        seconds=round(time.time() - t0, 2),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-out")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting runs after this many seconds")
    ap.add_argument("--optimizer", choices=["lvopt", "torch"], default="lvopt")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    P = dict(PRESETS[a.preset])
    if a.budget_s is not None:
        P["budget_s"] = a.budget_s
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(a.out, exist_ok=True)
    path, logp = os.path.join(a.out, "runs.csv"), os.path.join(a.out, "gpu_lm.log")
    done = {(int(r["width"]), int(r["V"]), int(r["seed"]), int(r["k"])) for r in sweep.read_rows(path)}
    t_start = time.time()

    def log(msg):
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        with open(logp, "a") as f:
            f.write(line + "\n")

    log(f"gpu_lm: device {device}, preset {a.preset}, {P}")
    langs, data = {}, {}
    n_train = max(P["batch"], P["tokens"] // P["seq"] + P["batch"])
    for V in P["vocabs"]:
        langs[V] = Language(V, device)
        for seed in P["seeds"]:
            data[(V, seed)] = (
                langs[V].sequences(n_train, P["seq"] + 1, 1000 + seed),
                langs[V].sequences(256, P["seq"] + 1, 999),
            )
        log(f"V={V}: Bayes loss {langs[V].bayes:.4f} nats/token; {n_train} train sequences per seed")
    order = [(r, seed, V, w) for r in P["rings"] for seed in P["seeds"] for V in P["vocabs"] for w in P["widths"]]
    per_width: dict = {}
    for r, seed, V, w in order:
        k = centre_k(w, P["base_width"]) + r
        if (w, V, seed, k) in done:
            continue
        est = per_width.get((w, V), 0.0)
        if time.time() - t_start + est > P["budget_s"]:
            log(f"budget: skipping width={w} V={V} seed={seed} k={k} (estimated {est:.0f}s)")
            continue
        res = run_one(langs[V], *data[(V, seed)], w, seed, k, P, device, a.optimizer)
        per_width[(w, V)] = res["seconds"]
        sweep.append_row(path, res)
        log(
            f"width={w} V={V} seed={seed} k={k} lr_emb={res['lr_embedding']:.4g} lr_hid={res['lr_hidden']:.3g} "
            f"loss={res['loss']:.4f} excess={res['loss'] - langs[V].bayes:.4f} train={res['train_loss']:.4f} "
            f"({res['seconds']:.1f}s, {res['D']} tokens)"
        )
    try:
        import analyze

        analyze.analyze(path, a.out, n_boot=500, plots=False)
        log(f"analysis: {os.path.join(a.out, 'results.md')}")
    except Exception as e:  # the runs are what matter; the analysis can be redone anywhere
        log(f"analysis skipped: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
