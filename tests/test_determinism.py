"""End-to-end determinism: a whole training run of a small model gives the same bits run to
run, for 1 or 2 threads (torch.set_num_threads here; OMP_NUM_THREADS in fresh processes), and
for every CPU ISA level the hardware has (LVOPT_CPU_ISA=baseline|avx2|avx512 in fresh
processes). Kernel-level versions are in tests/test_fused_adamw.py, test_fused_adamh.py and
test_sparse_rows.py; these drive the optimizers through lvopt.nn.Embedding (exact sparse rows),
multi-chunk matrices (153,600 elements: 3 chunks of 64 Ki, so AdamH's reduction is split
across threads) and an LR schedule.

The forward and backward passes run on one thread: torch's own kernels (MKL GEMM) are not
promised to give the same bits for different thread counts, and the claim under test is about
lvopt's step. The step runs on the thread count under test.
"""

import hashlib
import json
import os

import pytest
import torch
from torch import nn

import lvopt
from conftest import needs_native, run_python

V, D, H, C = 1000, 64, 256, 600
STEPS = 6
KINDS = ("adamw_fp32", "adamw_bf16", "adamh_fp32")


class Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.emb = lvopt.nn.Embedding(V, D)
        self.fc1 = nn.Linear(D, H)
        self.norm = nn.LayerNorm(H)
        self.fc2 = nn.Linear(H, C)  # 153,600 weights
        self.to(dtype)

    def forward(self, ids):
        return self.fc2(self.norm(torch.relu(self.fc1(self.emb(ids)))))


def train(kind: str) -> str:
    """Trains ``kind`` for STEPS steps; returns a SHA-256 of every parameter's and every state
    tensor's bytes (after the optimizer brings every row current)."""
    dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
    torch.manual_seed(0)
    model = Net(dtype)
    mats = [model.fc1.weight, model.fc2.weight]
    vecs = [model.fc1.bias, model.fc2.bias, *model.norm.parameters()]
    if kind.startswith("adamh"):
        opt = lvopt.AdamH(
            [dict(params=mats), dict(params=vecs), dict(params=[model.emb.weight], hyperball=False, weight_decay=0.1)],
            lr=1e-2,
        )
    else:
        opt = lvopt.AdamW(
            [dict(params=mats + [model.emb.weight], weight_decay=0.1), dict(params=vecs, weight_decay=0.0)],
            lr=1e-2,
            betas=(0.9, 0.95),
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    gen = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    for _ in range(STEPS):
        ids = torch.randint(0, V, (8, 24), generator=gen)
        target = torch.randint(0, C, (8, 24), generator=gen)
        torch.set_num_threads(1)
        try:
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1).float(), target.flatten())
            opt.zero_grad()
            loss.backward()
        finally:
            torch.set_num_threads(threads)
        opt.step()
        sched.step()
    h = hashlib.sha256()
    for t in list(model.parameters()) + [
        v for st in opt.state_dict()["state"].values() for v in st.values() if torch.is_tensor(v)
    ]:
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    """Fresh-process entry point: prints the active ISA, the thread count and every kind's hash."""
    print(
        json.dumps(
            dict(
                isa=lvopt.build_info()["cpu_isa_active"],
                threads=torch.get_num_threads(),
                **{k: train(k) for k in KINDS},
            )
        )
    )


@pytest.fixture(scope="module")
def here():
    return {k: train(k) for k in KINDS}


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_run_to_run_and_thread_count(here, kind):
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = train(kind)
        torch.set_num_threads(2)
        two = train(kind)
    finally:
        torch.set_num_threads(n)
    assert one == two == here[kind] == train(kind)


ENVS = [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"}] + [
    {"OMP_NUM_THREADS": "2", "LVOPT_CPU_ISA": isa} for isa in ("baseline", "avx2", "avx512")
]


@needs_native
@pytest.mark.parametrize("env", ENVS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_fresh_process_thread_count_and_isa(here, env):
    isa = env.get("LVOPT_CPU_ISA")
    if isa is not None and isa not in lvopt.cpu_isa_levels():
        pytest.skip(f"{isa} is not compiled in or not supported by this CPU")
    out = json.loads(
        run_python(
            "import test_determinism; test_determinism.main()", env={**env, "PYTHONPATH": os.path.dirname(__file__)}
        )
    )
    assert out["threads"] == int(env["OMP_NUM_THREADS"])
    if isa is not None:
        assert out["isa"] == isa
    for k in KINDS:
        assert out[k] == here[k], (k, env)


@needs_native
def test_training_moves_the_state(here):
    """The hashes cover a run that changed something (different kinds, different bits)."""
    assert len(set(here.values())) == len(KINDS)
