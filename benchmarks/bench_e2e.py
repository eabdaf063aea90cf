"""End-to-end: a small causal LM with a large vocabulary, trained a few hundred steps with
torch.optim.AdamW (dense embedding) and with lvopt (sparse exact embedding rows), each run in
its own process so that its peak memory is its own.

Runs:
  torch      torch.optim.AdamW(fused=True), nn.Embedding (dense V x d gradient), one LR
  lvopt-sp   lvopt.AdamW.from_model(rule="sp"): the same LRs, lvopt.nn.Embedding (sparse rows,
             exact mode) -- the same semantics as `torch`, so the loss curves must agree
  lvopt-lv   lvopt.AdamW.from_model(rule="lv", base_width=d/4): the LV embedding-LR rule
Reported per run: loss curve, median fwd+bwd and optimizer-step ms, peak RSS.

    python -m lvopt bench --e2e [--steps 300]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

CFG = dict(V=32768, d=128, layers=2, heads=4, T=33, B=8, lr=2e-3, wd=0.1)


class CausalLM(nn.Module):
    def __init__(self, V, d, layers, heads, sparse_embedding: bool):
        super().__init__()
        if sparse_embedding:
            import lvopt.nn

            self.emb = lvopt.nn.Embedding(V, d)
        else:
            self.emb = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.emb(x)
        for b in self.blocks:
            h = b(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batches(V, T, B, steps, seed=0):
    """Zipf(1.1) unigram tokens with a fixed random bigram successor for 70% of positions:
    a learnable, large-vocabulary stream where most rows are rare."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
    succ = torch.randint(0, V, (V,), generator=g)
    for _ in range(steps):
        x = torch.multinomial(probs, B * T, replacement=True, generator=g).view(B, T)
        follow = torch.rand(B, T, generator=g) < 0.7
        nxt = succ[x]
        x[:, 1:] = torch.where(follow[:, 1:], nxt[:, :-1], x[:, 1:])
        yield x


def train(run: str, steps: int) -> dict:
    import lvopt

    torch.manual_seed(0)
    c = CFG
    model = CausalLM(c["V"], c["d"], c["layers"], c["heads"], sparse_embedding=run != "torch")
    if run == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["wd"], fused=True)
    else:
        rule = run.split("-", 1)[1]
        # Same weight decay on every role as the torch run, so that only the LR rule differs
        # (and under "sp", nothing does).
        wd = {role: c["wd"] for role in ("embedding", "hidden", "output", "vector")}
        base = c["d"] if rule == "sp" else c["d"] // 4
        opt = lvopt.AdamW.from_model(model, lr=c["lr"], base_width=base, rule=rule, weight_decay=wd)
    losses, fb, st = [], [], []
    for x in batches(c["V"], c["T"], c["B"], steps):
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        losses.append(loss.item())
        fb.append(t1 - t0)
        st.append(t2 - t1)
    return dict(
        run=run,
        losses=losses,
        fwd_bwd_ms=statistics.median(fb) * 1e3,
        step_ms=statistics.median(st) * 1e3,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def run(steps: int = 300, runs=("torch", "lvopt-sp", "lvopt-lv")) -> list[dict]:
    out = []
    for r in runs:
        code = (
            f"import sys, json; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_e2e; "
            f"print('RESULT' + json.dumps(bench_e2e.train({r!r}, {steps})))"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if p.returncode != 0:
            out.append(dict(run=r, error=p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"))
            continue
        out.append(json.loads(p.stdout.split("RESULT", 1)[1]))
    return out


def report(results: list[dict]) -> str:
    c = CFG
    lines = [
        f"\nEnd to end: causal LM, V={c['V']}, d={c['d']}, {c['layers']} layers, batch {c['B']}x{c['T']}",
        f"  {'run':10s} {'final loss':>10s} {'fwd+bwd ms':>11s} {'step ms':>8s} {'peak RSS MB':>12s}",
    ]
    ok = {r["run"]: r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"  {r['run']:10s} not run: {r['error']}")
            continue
        tail = statistics.mean(r["losses"][-20:])
        lines.append(
            f"  {r['run']:10s} {tail:10.4f} {r['fwd_bwd_ms']:11.1f} {r['step_ms']:8.2f} {r['peak_rss_mb']:12.0f}"
        )
    if "torch" in ok and "lvopt-sp" in ok:
        a, b = ok["torch"]["losses"], ok["lvopt-sp"]["losses"]
        diffs = [abs(x - y) for x, y in zip(a, b)]
        lines.append(
            f"  same semantics (torch vs lvopt-sp) over {len(a)} steps: |loss difference| max {max(diffs):.2e}, "
            f"mean {statistics.mean(diffs):.2e}, last 20 steps {statistics.mean(diffs[-20:]):.2e} "
            f"(two runs drift apart by rounding: the sparse and dense embedding backward sum in different orders)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="bench_e2e")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    results = run(args.steps)
    print(report(results))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(results, f)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in results:
            if "losses" in r:
                ax.plot(r["losses"], label=r["run"], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "e2e.png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {args.out}/e2e.json and {args.out}/e2e.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
