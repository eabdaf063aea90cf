"""Exact resume through real checkpoint files and a fresh interpreter.

Each configuration trains N steps here, writes model, optimizer and LR-scheduler state with
torch.save to a file, and a fresh process (sys.executable) rebuilds everything from scratch,
loads the file, trains N more steps and writes its parameters. An uninterrupted 2N-step run
in this process must give the same bits (lvopt -> lvopt), or agree within fp32 rounding where a
checkpoint crosses between lvopt.AdamW and torch.optim.AdamW. The data of step t depends on t
only, so both halves see the batches the uninterrupted run sees. (In-memory round trips are in
tests/test_optim.py and tests/test_sparse_rows_optimizer.py.)
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lvopt
from conftest import needs_native

N = 8  # steps before and after the checkpoint
THREADS = 2  # both processes: matmul bits depend on the thread count (another test may have changed it)
V, D = 200, 16  # vocabulary (rows of the embedding table) and width


class Net(nn.Module):
    def __init__(self, emb: nn.Module, dtype):
        super().__init__()
        self.emb = emb
        self.fc = nn.Linear(D, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, V, bias=False)
        self.to(dtype)

    def forward(self, ids):
        return self.out(self.norm(torch.tanh(self.fc(self.emb(ids)))))


# name -> (embedding kind, optimizer before the save, optimizer after, dtype)
CONFIGS = {
    "adamw_fp32": ("dense", "lvopt.AdamW", "lvopt.AdamW", torch.float32),
    "adamw_bf16": ("dense", "lvopt.AdamW", "lvopt.AdamW", torch.bfloat16),
    "adamh_fp32": ("dense", "lvopt.AdamH", "lvopt.AdamH", torch.float32),
    "adamh_bf16": ("dense", "lvopt.AdamH", "lvopt.AdamH", torch.bfloat16),
    "sparse_lazy_fp32": ("lazy", "lvopt.AdamW", "lvopt.AdamW", torch.float32),
    "sparse_exact_fp32": ("exact", "lvopt.AdamW", "lvopt.AdamW", torch.float32),
    "sparse_exact_bf16": ("exact", "lvopt.AdamW", "lvopt.AdamW", torch.bfloat16),
    "lvopt_to_torch": ("dense", "lvopt.AdamW", "torch.optim.AdamW", torch.float32),
    "torch_to_lvopt": ("dense", "torch.optim.AdamW", "lvopt.AdamW", torch.float32),
}
BIT_EXACT = [k for k, c in CONFIGS.items() if c[1] == c[2]]
CROSS = [k for k, c in CONFIGS.items() if c[1] != c[2]]


def build(name: str, which: int):
    """Model, optimizer and scheduler of ``name``; ``which`` = 1 (before the save) or 2 (after).
    Parameters come from seed 0; a resumed run overwrites them from the checkpoint."""
    kind, before, after, dtype = CONFIGS[name]
    torch.manual_seed(0)
    emb = nn.Embedding(V, D) if kind == "dense" else lvopt.nn.Embedding(V, D)
    model = Net(emb, dtype)
    opt_name = before if which == 1 else after
    hidden = [model.fc.weight, model.out.weight]
    vectors = [model.fc.bias, *model.norm.parameters()]
    if opt_name == "lvopt.AdamH":
        groups = [
            dict(params=hidden, hyperball=True, weight_decay=0.0),
            dict(params=vectors, hyperball=True, weight_decay=0.0, lr=2e-3),  # <2-D: AdamW
            dict(params=[model.emb.weight], hyperball=False, weight_decay=0.1, lr=5e-3),
        ]
        opt = lvopt.AdamH(groups, lr=1e-2)
    else:
        groups = [
            dict(params=hidden, weight_decay=0.1),
            dict(params=vectors, weight_decay=0.0, lr=2e-3),
            dict(params=[model.emb.weight], weight_decay=0.05, lr=5e-3),
        ]
        if kind != "dense":
            groups[2]["sparse_mode"] = kind
        cls = lvopt.AdamW if opt_name == "lvopt.AdamW" else torch.optim.AdamW
        opt = cls(groups, lr=3e-3, betas=(0.9, 0.95))
    # warmup then cosine, over 2N steps: the scheduler's state (last_epoch, its children's base
    # LRs) must travel with the checkpoint for the second half to see the right learning rates.
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, 0.2, 1.0, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2 * N - 3, eta_min=1e-4),
        ],
        milestones=[3],
    )
    return model, opt, sched


def batch(t: int) -> torch.Tensor:
    """Step t's token ids: Zipf-like over V rows (high ids are rare), so many rows of the table
    go untouched for many steps, across the save among them."""
    g = torch.Generator().manual_seed(1000 + t)
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    return torch.multinomial(ranks**-1.2, 24, replacement=True, generator=g).reshape(2, 12)


def train(model, opt, sched, steps: range) -> None:
    for t in steps:
        ids = batch(t)
        logits = model(ids[:, :-1]).float()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def resume_main(ckpt_dir: str) -> None:
    """Runs in the fresh process: for every checkpoint in ``ckpt_dir``, rebuild, load, train
    the second half, save the parameters."""
    torch.set_num_threads(THREADS)
    for name in json.load(open(os.path.join(ckpt_dir, "names.json"))):
        model, opt, sched = build(name, 2)
        ck = torch.load(os.path.join(ckpt_dir, f"{name}.pt"), weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        train(model, opt, sched, range(N, 2 * N))
        if hasattr(opt, "flush"):
            opt.flush()
        torch.save(
            {
                "params": {k: v.detach() for k, v in model.named_parameters()},
                "lrs": [g["lr"] for g in opt.param_groups],
                "last_epoch": sched.last_epoch,
            },
            os.path.join(ckpt_dir, f"{name}.out.pt"),
        )


def _touched(steps) -> torch.Tensor:
    return torch.unique(torch.cat([batch(t).reshape(-1) for t in steps]))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Writes the first-half checkpoints of every configuration, runs the fresh process once for
    all of them, and returns (name -> its outputs, name -> the uninterrupted model/optimizer)."""
    d = tmp_path_factory.mktemp("resume")
    names = list(CONFIGS)
    full = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    for name in names:
        model, opt, sched = build(name, 1)
        train(model, opt, sched, range(N))
        # What a training loop that checkpoints does: state_dict() of the live optimizer (for
        # exact sparse groups this brings every row current, docs/design.md section 2.3).
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, d / f"{name}.pt"
        )
        # The uninterrupted run: the same objects, continued in this process.
        train(model, opt, sched, range(N, 2 * N))
        if hasattr(opt, "flush"):
            opt.flush()
        full[name] = (model, opt, sched)
    torch.set_num_threads(threads)
    (d / "names.json").write_text(json.dumps(names))
    code = f"import test_resume; test_resume.resume_main({str(d)!r})"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    outs = {name: torch.load(d / f"{name}.out.pt", weights_only=True) for name in names}
    return outs, full


@needs_native
@pytest.mark.parametrize("name", BIT_EXACT)
def test_resume_in_fresh_process_is_bit_identical(resumed, name):
    outs, full = resumed
    model, opt, sched = full[name]
    got = outs[name]
    assert got["last_epoch"] == sched.last_epoch == 2 * N
    assert got["lrs"] == [g["lr"] for g in opt.param_groups]
    for k, p in model.named_parameters():
        q = got["params"][k]
        assert q.dtype == p.dtype
        assert torch.equal(q, p.detach()), f"{name}: {k} differs by {float((q.double() - p.double()).abs().max()):.3e}"
    # the run moved the parameters (a resume that silently did nothing would also "match");
    # a bf16 LayerNorm gain of 1.0 moves by lr=2e-3 < half a bf16 ulp (2**-8) and stays put.
    fresh = dict(build(name, 1)[0].named_parameters())
    for k, p in model.named_parameters():
        if p.dtype == torch.float32 or p.numel() > 100:
            assert not torch.equal(p, fresh[k]), k


@needs_native
@pytest.mark.parametrize("name", [k for k in BIT_EXACT if CONFIGS[k][0] != "dense"])
def test_sparse_rows_untouched_across_the_save(resumed, name):
    """The table has rows untouched in the last steps before the save and touched after it (an
    exact-mode row that was behind when saved), rows touched only before, and rows never
    touched; all are bit-identical after the fresh-process resume. Lazy rows never touched keep
    their initial values exactly; exact rows decay as dense AdamW with g = 0 would."""
    outs, full = resumed
    model = full[name][0]
    before, after = _touched(range(N)), _touched(range(N, 2 * N))
    late = _touched(range(N - 3, N))
    behind_at_save = torch.tensor(sorted(set(after.tolist()) - set(late.tolist())))
    only_before = torch.tensor(sorted(set(before.tolist()) - set(after.tolist())))
    never = torch.tensor(sorted(set(range(V)) - set(before.tolist()) - set(after.tolist())))
    assert behind_at_save.numel() and only_before.numel() and never.numel() > 50
    w, got = model.emb.weight.detach(), outs[name]["params"]["emb.weight"]
    for rows in (behind_at_save, only_before, never):
        assert torch.equal(got[rows], w[rows])
    w0 = build(name, 1)[0].emb.weight.detach()
    if CONFIGS[name][0] == "lazy":
        assert torch.equal(w[never], w0[never])
    elif w.dtype == torch.float32:  # (in bf16, 16 steps of decay 1 - lr*wd <= 1 - 2.5e-4 round away)
        assert not torch.equal(w[never], w0[never])


@needs_native
@pytest.mark.parametrize("name", CROSS)
def test_checkpoint_crosses_to_and_from_torch_in_fresh_process(resumed, name):
    """lvopt.AdamW's checkpoint continues in torch.optim.AdamW (and the reverse) in a fresh
    process within fp32 rounding of the uninterrupted run. The two runs see different
    parameters after the first rounding difference, so the bound is on the whole trajectory
    (N steps): relative to each tensor's largest element."""
    outs, full = resumed
    model, opt, sched = full[name]
    got = outs[name]
    assert got["last_epoch"] == sched.last_epoch == 2 * N
    worst = 0.0
    for k, p in model.named_parameters():
        q = got["params"][k]
        err = float((q.double() - p.double()).abs().max() / p.double().abs().max())
        worst = max(worst, err)
        assert err < 1e-5, (name, k, err)
    print(f"{name}: max relative parameter difference after {N} resumed steps: {worst:.2e}")


@needs_native
def test_exact_sparse_checkpoint_changes_the_run_only_by_rounding():
    """Saving brings exact-mode rows current (state_dict() flushes), so a run that checkpoints
    and one that never does differ by the rounding of the closed-form catch-up, not more."""
    a, oa, sa = build("sparse_exact_fp32", 1)
    b, ob, sb = build("sparse_exact_fp32", 1)
    train(a, oa, sa, range(N))
    train(b, ob, sb, range(N))
    oa.state_dict()
    train(a, oa, sa, range(N, 2 * N))
    train(b, ob, sb, range(N, 2 * N))
    oa.flush(), ob.flush()
    w, u = a.emb.weight.detach().double(), b.emb.weight.detach().double()
    err = float((w - u).abs().max() / u.abs().max())
    print(f"exact sparse rows, checkpointing vs not: max relative difference {err:.2e}")
    assert err < 1e-6
