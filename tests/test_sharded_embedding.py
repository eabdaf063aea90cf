"""lvopt.nn.ShardedEmbedding on the CPU with gloo: worker processes that this test starts itself
(localhost, a free port), on 2, 4 and 1 ranks, against one process with lvopt.nn.Embedding.

- Training (2 and 4 ranks, exact and lazy, 50 steps): a small next-token model, the embedding
  sharded by rows, the dense head's gradients averaged over ranks; the same model in one process
  on the concatenated batch. Equal within fp32 rounding (the gradients differ by summation
  order only). A batch with an out-of-range id on one rank is refused on every rank midway, with
  nothing written (checked bit for bit), and training goes on.
- Checkpoints (torch.distributed.checkpoint): saved on 2 ranks, resumed on 4 and on 1, equal bit
  for bit to one process that never stopped. Bit identity is possible because the gradient rows
  are small dyadic numbers (their sums are exact in any order), grad_reduction="sum", and each
  row's step is the same elementwise arithmetic wherever the row lives.
- Bad arguments: max_norm, scale_grad_by_freq, float ids, a wrong-shaped state.

The three launches (7 processes) take about 45 s of CPU time together; 2.5 min of wall time
on a loaded 2-core machine.
"""

import os

import pytest
import torch
from torch import nn

import lvopt
from _gloo import run_ranks
from conftest import needs_native

V, D, H = 301, 16, 24  # 301 rows: blocks of 151/150 on 2 ranks, 76/76/76/73 on 4
PAD = 7
G, L = 8, 7  # sequences per global batch (divisible by 1, 2, 4), tokens per sequence
STEPS = 50
BAD_STEP = 25  # the step before which an out-of-range batch is refused
CKPT_FIRST, CKPT_THEN = 12, 12  # steps before the checkpoint, steps after it
MODES = ("exact", "lazy")


def full_table() -> torch.Tensor:
    w = torch.randn(V, D, generator=torch.Generator().manual_seed(0))
    w[PAD] = 0
    return w


def batch(t: int) -> torch.Tensor:
    ids = torch.randint(0, V, (G, L), generator=torch.Generator().manual_seed(1000 + t))
    ids[::3, -2:] = PAD  # padding in the batch
    ids[:, 0] = ids[0, 0]  # a duplicate across every rank's share
    return ids


def dyadic_target(t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5000 + t)
    return torch.randint(-8, 9, (G, L, D), generator=g).float() / 8


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc = nn.Linear(D, H)
        self.out = nn.Linear(H, V)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def lm_loss(emb, head, ids):
    logits = head(emb(ids[:, :-1]))
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def optimizer(emb_weight, head, mode):
    groups = [dict(params=[emb_weight], sparse_mode=mode)]
    if head is not None:
        groups.append(dict(params=list(head.parameters())))
    return lvopt.AdamW(groups, lr=2e-2, weight_decay=0.1)


# ----- one process: the reference -------------------------------------------------------------


def flushed_table_state(opt, emb) -> dict:
    """The embedding table and its moments after a flush (every row current), copied."""
    opt.flush()
    st = opt.state[emb.weight]
    return dict(weight=emb.weight.detach().clone(), exp_avg=st["exp_avg"].clone(), exp_avg_sq=st["exp_avg_sq"].clone())


def one_process_training(mode: str) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        emb, head = lvopt.nn.Embedding(V, D, padding_idx=PAD, _weight=full_table()), Head()
        opt = optimizer(emb.weight, head, mode)
        for t in range(STEPS):
            opt.zero_grad()
            lm_loss(emb, head, batch(t)).backward()
            opt.step()
        return dict(flushed_table_state(opt, emb), head={k: v.detach().clone() for k, v in head.state_dict().items()})
    finally:
        torch.set_num_threads(n)


def one_process_checkpoint_run(mode: str) -> dict:
    """The run the checkpoint's resumptions must equal: steps, a flush where the others save
    (a save flushes; the clock then restarts at that step, as a loaded state's does), steps."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        emb = lvopt.nn.Embedding(V, D, padding_idx=PAD, _weight=full_table())
        opt = optimizer(emb.weight, None, mode)
        for t in range(CKPT_FIRST + CKPT_THEN):
            if t == CKPT_FIRST:
                opt.flush()
            opt.zero_grad()
            (emb(batch(t)) * dyadic_target(t)).sum().backward()
            opt.step()
        return dict(flushed_table_state(opt, emb), step=float(opt.state[emb.weight]["step"]))
    finally:
        torch.set_num_threads(n)


# ----- the worker processes --------------------------------------------------------------------


def _share(t_ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    k = G // world
    return t_ids[rank * k : (rank + 1) * k]


def _local_state(emb, opt) -> dict:
    st = opt.state[emb.weight]
    return dict(
        weight=emb.weight.detach().clone(),
        exp_avg=st["exp_avg"].clone(),
        exp_avg_sq=st["exp_avg_sq"].clone(),
        step=float(st["step"]),
        rows=(emb.row_start, emb.row_end),
    )


def _train(mode: str, rank: int, world: int) -> dict:
    import torch.distributed as dist

    emb = lvopt.nn.ShardedEmbedding(V, D, padding_idx=PAD, _weight=full_table())
    head = Head()
    opt = optimizer(emb.weight, head, mode)
    res = {}
    for t in range(STEPS):
        if t == BAD_STEP:
            bad = _share(batch(t), rank, world).clone()
            if rank == world - 1:
                bad[0, 1] = V  # one id out of range, on one rank only (and a negative one on rank 0 of 4)
            if world == 4 and rank == 0:
                bad[1, 2] = -3
            opt.zero_grad()
            before = _local_state(emb, opt)
            before_head = [p.detach().clone() for p in head.parameters()]
            try:
                lm_loss(emb, head, bad).backward()
                res["bad_error"] = None
            except ValueError as e:
                res["bad_error"] = str(e)
            after = _local_state(emb, opt)
            res["bad_unchanged"] = {k: torch.equal(before[k], after[k]) for k in ("weight", "exp_avg", "exp_avg_sq")}
            res["bad_unchanged"]["step"] = before["step"] == after["step"]
            res["bad_unchanged"]["no_grad"] = all(p.grad is None for p in [emb.weight, *head.parameters()])
            res["bad_unchanged"]["head"] = all(
                torch.equal(a, b.detach()) for a, b in zip(before_head, head.parameters())
            )
        opt.zero_grad()
        lm_loss(emb, head, _share(batch(t), rank, world)).backward()
        for p in head.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        if t == 0:
            res["grad_layout"] = str(emb.weight.grad.layout)
            rows = emb.weight.grad._indices()[0]
            res["grad_rows_distinct_sorted"] = bool((rows.diff() > 0).all()) and PAD not in (rows + emb.row_start)
        opt.step()
    emb.flush()
    res.update(_local_state(emb, opt))
    res["head"] = {k: v.detach().clone() for k, v in head.state_dict().items()}
    res["bytes_sent"] = dict(emb.bytes_sent)
    return res


def _ckpt_state(emb, opt):
    return {"emb": emb.state_dict(), "optim": emb.optim_state_dict(opt)}


def _ckpt_steps(emb, opt, rank, world, steps):
    for t in steps:
        opt.zero_grad()
        k = G // world
        (emb(_share(batch(t), rank, world)) * dyadic_target(t)[rank * k : (rank + 1) * k]).sum().backward()
        opt.step()


def _checkpoint(mode: str, rank: int, world: int, ckpt_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp

    path = os.path.join(ckpt_dir, mode)
    emb = lvopt.nn.ShardedEmbedding(V, D, padding_idx=PAD, grad_reduction="sum", seed=123)  # its own init
    opt = optimizer(emb.weight, None, mode)
    res = {}
    if world == 2:  # the run that saves
        emb = lvopt.nn.ShardedEmbedding(V, D, padding_idx=PAD, grad_reduction="sum", _weight=full_table())
        opt = optimizer(emb.weight, None, mode)
        _ckpt_steps(emb, opt, rank, world, range(CKPT_FIRST))
        state = _ckpt_state(emb, opt)
        res["types"] = {k: type(v).__name__ for k, v in {**state["emb"], **state["optim"]}.items()}
        res["placements"] = str(state["emb"]["weight"].placements)
        dcp.save(state, checkpoint_id=path)
    else:  # the runs that resume, with a fresh optimizer
        state = _ckpt_state(emb, opt)
        dcp.load(state, checkpoint_id=path)
        emb.load_state_dict(state["emb"])
        emb.load_optim_state_dict(opt, state["optim"])
        _ckpt_steps(emb, opt, rank, world, range(CKPT_FIRST, CKPT_FIRST + CKPT_THEN))
        emb.flush()
    res.update(_local_state(emb, opt))
    return res


def _bad_arguments() -> dict:
    errs = {}
    for name, fn in (
        ("max_norm", lambda: lvopt.nn.ShardedEmbedding(V, D, max_norm=1.0)),
        ("scale_grad_by_freq", lambda: lvopt.nn.ShardedEmbedding(V, D, scale_grad_by_freq=True)),
        ("grad_reduction", lambda: lvopt.nn.ShardedEmbedding(V, D, grad_reduction="avg")),
        ("float_ids", lambda: lvopt.nn.ShardedEmbedding(V, D, seed=0)(torch.zeros(3))),
        (
            "bad_state",
            lambda: lvopt.nn.ShardedEmbedding(V, D, seed=0).load_state_dict({"weight": torch.zeros(V + 1, D)}),
        ),
    ):
        try:
            fn()
            errs[name] = None
        except Exception as e:  # recorded, asserted on by the tests
            errs[name] = (type(e).__name__, str(e))
    return errs


def _empty_batch(rank: int) -> dict:
    """Rank 0 has no ids this step: it still takes part (an empty tensor), and rank 1's rows
    come back and are stepped."""
    emb = lvopt.nn.ShardedEmbedding(V, D, _weight=full_table())
    opt = optimizer(emb.weight, None, "exact")
    ids = torch.zeros(0, 3, dtype=torch.int64) if rank == 0 else torch.tensor([[3, 200, 3]])
    before = emb.weight.detach().clone()
    out = emb(ids)
    out.sum().backward()
    opt.step()
    return dict(
        shape=tuple(out.shape),
        rows=out.detach().clone(),
        changed=(emb.weight.detach() != before).any(1).nonzero().flatten() + emb.row_start,
    )


BF16_STEPS = 10


def one_process_bf16() -> torch.Tensor:
    emb = lvopt.nn.Embedding(V, D, padding_idx=PAD, _weight=full_table().bfloat16(), dtype=torch.bfloat16)
    opt = optimizer(emb.weight, None, "exact")
    for t in range(BF16_STEPS):
        opt.zero_grad()
        (emb(batch(t)).float() * dyadic_target(t)).sum().backward()
        opt.step()
    opt.flush()
    return emb.weight.detach().clone()


def _bf16(rank: int, world: int) -> torch.Tensor:
    """bf16 rows: the exchanged rows and gradient rows are bf16 (half the bytes)."""
    emb = lvopt.nn.ShardedEmbedding(
        V, D, padding_idx=PAD, grad_reduction="sum", _weight=full_table().bfloat16(), dtype=torch.bfloat16
    )
    opt = optimizer(emb.weight, None, "exact")
    k = G // world
    for t in range(BF16_STEPS):
        opt.zero_grad()
        (emb(_share(batch(t), rank, world)).float() * dyadic_target(t)[rank * k : (rank + 1) * k]).sum().backward()
        opt.step()
    emb.flush()
    return emb.weight.detach().clone()


def worker(out_dir: str, ckpt_dir: str) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        if world > 1:
            res["train"] = {mode: _train(mode, rank, world) for mode in MODES}
        res["checkpoint"] = {mode: _checkpoint(mode, rank, world, ckpt_dir) for mode in MODES}
        if world == 2:
            res["bad_arguments"] = _bad_arguments()
            res["empty_batch"] = _empty_batch(rank)
            res["bf16"] = _bf16(rank, world)
            emb = lvopt.nn.ShardedEmbedding(V, D, seed=7)
            res["default_init"] = emb.weight.detach().clone()
        if world == 1:
            res["default_init"] = lvopt.nn.ShardedEmbedding(V, D, seed=7).weight.detach().clone()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _launch(world: int, out_dir, ckpt_dir) -> list:
    code = f"import test_sharded_embedding as t; t.worker({str(out_dir)!r}, {str(ckpt_dir)!r})"
    return run_ranks(world, code, out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ckpt = tmp_path_factory.mktemp("ckpt")
    out = {}
    for world in (2, 4, 1):  # 2 saves the checkpoint the others load
        out[world] = _launch(world, tmp_path_factory.mktemp(f"w{world}"), ckpt)
    return out


def _gather(ranks: list, section: str, mode: str, key: str) -> torch.Tensor:
    parts = [r[section][mode] for r in ranks]
    assert [p["rows"] for p in parts] == [
        (a, b)
        for a, b in zip(
            lvopt.distributed.shard_bounds(V, len(ranks))[:-1], lvopt.distributed.shard_bounds(V, len(ranks))[1:]
        )
    ]
    return torch.cat([p[key] for p in parts])


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@needs_native
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_training_matches_one_process(runs, mode, world):
    """50 steps on `world` ranks (the table split by rows) equal one process on the concatenated
    batch within fp32 rounding: every tensor within 1e-5 of its largest element (the sums of
    gradient rows over ranks and of the head's gradients are taken in another order; measured
    about 1e-7 to 1e-6)."""
    ref = one_process_training(mode)
    ranks = runs[world]
    errs = {k: _rel(_gather(ranks, "train", mode, k), ref[k]) for k in ("weight", "exp_avg", "exp_avg_sq")}
    errs["head"] = max(_rel(r["train"][mode]["head"][k], ref["head"][k]) for r in ranks for k in ref["head"])
    print(
        f"{mode}, {world} ranks vs one process after {STEPS} steps: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    )
    assert max(errs.values()) < 1e-5, errs
    assert all(r["train"][mode]["step"] == STEPS for r in ranks)
    assert ranks[0]["train"][mode]["grad_layout"] == "torch.sparse_coo" and all(
        r["train"][mode]["grad_rows_distinct_sorted"] for r in ranks
    )


@needs_native
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_out_of_range_ids_refused_on_every_rank(runs, mode, world):
    """One rank's out-of-range id: every rank raises, naming that rank and the range, nothing is
    written on any rank (weights, moments, step, gradients, the head), and training goes on
    (the final state above still equals one process, which never saw that batch)."""
    for r in runs[world]:
        res = r["train"][mode]
        assert res["bad_error"] is not None and f"rank {world - 1} [" in res["bad_error"], res["bad_error"]
        assert f"outside [0, {V})" in res["bad_error"] and "every rank" in res["bad_error"]
        assert f", {V}]" in res["bad_error"]  # the offending rank's range
        assert ("rank 0 [-3, " in res["bad_error"]) == (world == 4), res["bad_error"]
        assert all(res["bad_unchanged"].values()), res["bad_unchanged"]


@needs_native
@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_saved_on_2_resumes_on_4_and_1_bit_identically(runs, mode):
    ref = one_process_checkpoint_run(mode)
    saved = runs[2][0]["checkpoint"][mode]
    assert saved["types"] == {"weight": "DTensor", "exp_avg": "DTensor", "exp_avg_sq": "DTensor", "step": "Tensor"}
    assert saved["placements"] == "(Shard(dim=0),)"
    for world in (4, 1):
        for key in ("weight", "exp_avg", "exp_avg_sq"):
            got = _gather(runs[world], "checkpoint", mode, key)
            assert torch.equal(got, ref[key]), (world, key, _rel(got, ref[key]))
        assert all(r["checkpoint"][mode]["step"] == ref["step"] for r in runs[world])


def test_default_init_is_the_same_for_any_number_of_ranks(runs):
    two = torch.cat([r["default_init"] for r in runs[2]])
    one = runs[1][0]["default_init"]
    assert two.shape == (V, D) and torch.equal(two, one)
    assert float(one.std()) == pytest.approx(1.0, abs=0.05)


@needs_native
def test_bf16_rows(runs):
    """A bf16 table on 2 ranks against one process: bf16 rows travel, and the sums of gradient
    rows (dyadic, so exact) give the same gradient: equal bit for bit after 10 exact steps."""
    got = torch.cat([r["bf16"] for r in runs[2]])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, one_process_bf16())


def test_a_rank_with_no_ids_takes_part(runs):
    r0, r1 = (r["empty_batch"] for r in runs[2])
    assert r0["shape"] == (0, 3, D) and r1["shape"] == (1, 3, D)
    w = full_table()
    assert torch.equal(r1["rows"][0], w[[3, 200, 3]])
    assert r0["changed"].tolist() == [3] and r1["changed"].tolist() == [200]  # rows 3 (rank 0's), 200 (rank 1's)


def test_bad_arguments_refused(runs):
    errs = runs[2][0]["bad_arguments"]
    assert errs["max_norm"][0] == "NotImplementedError" and "max_norm" in errs["max_norm"][1]
    assert errs["scale_grad_by_freq"][0] == "NotImplementedError"
    assert errs["grad_reduction"][0] == "ValueError" and "grad_reduction" in errs["grad_reduction"][1]
    assert errs["float_ids"][0] == "TypeError" and "int64" in errs["float_ids"][1]
    assert errs["bad_state"][0] == "RuntimeError" and "(302, 16)" in errs["bad_state"][1]


def test_bytes_sent_counted(runs):
    """What crossed between ranks in training (50 steps + the refused batch's meta): ids, rows
    and gradient rows both ways; rows and gradients are the same number of rows."""
    for world in (2, 4):
        sent = [r["train"]["exact"]["bytes_sent"] for r in runs[world]]
        for b in sent:
            assert b["ids"] > 0 and b["meta"] == (STEPS + 1) * (world - 1) * 32
            assert b["grads"] * 8 == b["ids"] * 4 * D  # a gradient row (fp32) goes back for each id sent
        # Every row sent back answers an id received: the totals over ranks agree.
        assert sum(b["rows"] for b in sent) == sum(b["grads"] for b in sent)


def test_needs_a_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        lvopt.nn.ShardedEmbedding(V, D)
