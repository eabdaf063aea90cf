"""Coordinate check (lvopt.scaling.coord_check) of the sweep's model with the sweep's LRs.

The muP baseline of run.py (AdamW; AdamH with the hyperball hidden exponent 1/2) must pass;
standard parametrisation with the same base LRs at every width (rule "sp", SP read-out init)
and AdamH with AdamW's hidden exponent 1 must fail. Tables go to results/coord_V<V>.txt, plots to
results/coord_V<V>_<case>.png.

    python experiments/lv_rule/coord.py [--V 65536] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import run  # noqa: E402
import lvopt  # noqa: E402
from lvopt.scaling import coord_check  # noqa: E402


def cases(k=8):
    lr_e = run.EMB_LR0 * 2 ** (k / 2)

    def mup(optim):
        return lambda m, w: run.make_optimizer(m, optim, lr_e)

    def sp(m, w):
        nn.init.normal_(m.head.weight, std=w**-0.5)  # SP read-out init
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lvopt.scaling.from_model(
                lvopt.AdamW,
                m,
                lr={"embedding": lr_e, "hidden": run.HIDDEN_LR0["adamw"], "output": run.OUTPUT_LR0},
                base_width=run.BASE_WIDTH,
                rule="sp",
                weight_decay=0.0,
                overrides={"head.weight": "output"},
            )

    def adamh_alpha1(m, w):
        f = run.BASE_WIDTH / w
        return lvopt.AdamH(
            [
                {"params": [m.embedding.weight], "lr": lr_e, "hyperball": False},
                {"params": [m.fc1.weight, m.fc2.weight], "lr": run.HIDDEN_LR0["adamh"] * f},
                {"params": [m.head.weight], "lr": run.OUTPUT_LR0 * f, "hyperball": False},
            ]
        )

    return {"mup_adamw": mup("adamw"), "mup_adamh": mup("adamh"), "sp_adamw": sp, "adamh_hidden_alpha1": adamh_alpha1}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--V", type=int, default=65536)
    ap.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    task = run.Task(a.V)

    def data(step):
        x, _, y = task.sample(a.batch, torch.Generator().manual_seed(50_000 + step))
        return x, y

    lines, verdict = [], {}
    for name, opt_fn in cases().items():
        r = coord_check(
            lambda d: run.MLP(a.V, d),
            a.widths,
            data=data,
            opt_fn=opt_fn,
            steps=a.steps,
            seeds=(0, 1),
            overrides={"head.weight": "output"},
        )
        r.plot(os.path.join(a.out, f"coord_V{a.V}_{name}.png"), title=f"{name}, V={a.V}")
        verdict[name] = r.ok
        lines += [f"== {name} (V={a.V}, batch {a.batch})", r.table(), ""]
        print(lines[-3], "\n", lines[-2], flush=True)
    with open(os.path.join(a.out, f"coord_V{a.V}.txt"), "w") as f:
        f.write("\n".join(lines))
    expected = {"mup_adamw": True, "mup_adamh": True, "sp_adamw": False, "adamh_hidden_alpha1": False}
    print("as expected" if verdict == expected else f"NOT as expected: {verdict}")
    return 0 if verdict == expected else 1


if __name__ == "__main__":
    sys.exit(main())
