"""Peak memory of one training step (forward, backward, optimizer step) of an embedding plus a
small model, V = 262,144, d = 1,024: lvopt.nn.Embedding + lvopt.AdamW against a dense
nn.Embedding + lvopt.AdamW. Peak RSS is read from the process (ru_maxrss) in a fresh
interpreter per variant, after a first step (states allocated) and three more."""
from __future__ import annotations

import resource
import subprocess
import sys

CODE = """
import resource, torch, lvopt, sys
from torch import nn
torch.manual_seed(0)
V, d = 262144, 1024
emb = lvopt.nn.Embedding(V, d) if sys.argv[1] == "lvopt" else nn.Embedding(V, d)
head = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, 1000))
opt = lvopt.AdamW(list(emb.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.1)
w = torch.arange(1, V + 1, dtype=torch.float64) ** -1.1
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for step in range(4):
    ids = torch.multinomial(w, 16384, replacement=True).reshape(16, 1024)
    opt.zero_grad(set_to_none=True)
    loss = head(emb(ids)).logsumexp(-1).mean()
    loss.backward()
    opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base * 1024)
"""


def main() -> int:
    V, d = 262144, 1024
    peaks = {}
    for kind in ("dense", "lvopt"):
        out = subprocess.run([sys.executable, "-c", CODE, kind], capture_output=True, text=True, check=True)
        peaks[kind] = [int(x) for x in out.stdout.split()]
    for k, (peak, before) in peaks.items():
        print(f"{k:6s} peak RSS {peak / 2**30:.2f} GiB (after model set-up {before / 2**30:.2f} GiB)")
    diff = peaks["dense"][0] - peaks["lvopt"][0]
    print(f"difference {diff / 2**30:.2f} GiB = {diff / (V * d):.2f} x V*d bytes (target >= 4 V*d = {4 * V * d / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
