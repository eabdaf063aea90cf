"""Resident memory (VmRSS, VmHWM in GiB) at each phase of a training step, lvopt.nn.Embedding
versus a dense nn.Embedding (V = 262,144, d = 1,024; the model of memory_sparse_rows.py):
shows where the peaks of the two variants come from.

    python benchmarks/memory_timeline_sparse_rows.py lvopt|dense
"""
import resource, torch, lvopt, sys, os
from torch import nn
def rss():
    with open("/proc/self/status") as f:
        d = dict(l.split(":", 1) for l in f)
    return int(d["VmRSS"].split()[0]) / 2**20, int(d["VmHWM"].split()[0]) / 2**20
torch.manual_seed(0)
V, d = 262144, 1024
emb = lvopt.nn.Embedding(V, d) if sys.argv[1] == "lvopt" else nn.Embedding(V, d)
head = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, 1000))
opt = lvopt.AdamW(list(emb.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.1)
w = torch.arange(1, V + 1, dtype=torch.float64) ** -1.1
print("setup", rss())
for step in range(3):
    ids = torch.multinomial(w, 16384, replacement=True).reshape(16, 1024)
    opt.zero_grad(set_to_none=True)
    out = emb(ids); print(step, "fwd-emb", rss())
    loss = head(out).logsumexp(-1).mean(); print(step, "fwd", rss())
    del out
    loss.backward(); print(step, "bwd", rss())
    opt.step(); print(step, "step", rss())
