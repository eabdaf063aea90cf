"""lvopt.AdamH on FSDP2 shards (torch.distributed.fsdp.fully_shard), on CPU with gloo: 2 and 4
processes that this test starts itself, each against an unsharded AdamH it runs alongside.

- Shard(0) (FSDP2's default, with an uneven and on 4 ranks an empty shard) and Shard(1)
  (``shard_placement_fn``; FSDP2 shards other dims only evenly): 20 steps equal
  to the unsharded AdamH within 1e-6 of each tensor's largest element, the radius R = ||W_0|| of
  the whole matrix, and ||W|| = R after every step; resumed halfway from the optimizer's
  state_dict into a new optimizer.
- The optimizer's communication: one all-reduce per step of [n, 3] fp64 sums (24 bytes per
  sharded matrix), plus one of n fp64 values at the matrices' first step (the radii).
- nonfinite="skip": a NaN in one rank's gradient shard skips the step on every rank.
- Layouts AdamH cannot step are refused on every rank before anything is written: matrices
  sharded over different groups of ranks, a 2-D sharded matrix, a Partial placement.
"""

import os

import pytest
import torch
from torch import nn

import lvopt
import _gloo
from conftest import needs_native

STEPS = 20
# FSDP2 shards dim 0 unevenly (6 rows on 4 ranks: 2, 2, 2, 0), other dims only evenly.
D_IN, D_HID, D_OUT = 20, 28, 6


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def _batch(t: int) -> torch.Tensor:
    return torch.randn(8, D_IN, generator=torch.Generator().manual_seed(1000 + t))


def _loss(model, x):
    return (model(x) - 1.0).square().mean()


class _Counter:
    """Counts torch.distributed.all_reduce calls (and their bytes) while it is installed: the
    optimizer's own communication (FSDP2's collectives run in forward and backward)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.orig, self.calls = dist, dist.all_reduce, []

    def __enter__(self):
        def counted(t, *args, **kwargs):
            self.calls.append(t.numel() * t.element_size())
            return self.orig(t, *args, **kwargs)

        self.dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce = self.orig


def _equal_to_unsharded(shard_dim: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model, plain = _net(), _net()
    placement = (lambda p: Shard(shard_dim) if p.dim() == 2 else None) if shard_dim else None
    fully_shard(model[0], mesh=mesh, shard_placement_fn=placement)
    fully_shard(model[2], mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    opt = lvopt.AdamH(model.parameters(), lr=2e-2)
    ref = lvopt.AdamH(plain.parameters(), lr=2e-2)
    named = dict(model.named_parameters())
    matrices = [k for k, p in named.items() if p.dim() == 2]
    res = dict(
        placements={k: str(p.placements) for k, p in named.items()},
        local_shapes={k: tuple(p.to_local().shape) for k, p in named.items()},
        max_rel=0.0,
        norm_err=0.0,
        radius_err=0.0,
        calls=[],
    )
    for t in range(STEPS):
        x = _batch(t)  # the same batch on every rank: FSDP2's averaged gradient is the full one
        if t == STEPS // 2:
            # Resume halfway from the optimizer's state_dict (local DTensor moments, radius and
            # step as plain tensors) into a new optimizer: the steps go on as if uninterrupted.
            saved = opt.state_dict()
            opt = lvopt.AdamH(model.parameters(), lr=2e-2)
            opt.load_state_dict(saved)
        opt.zero_grad()
        _loss(model, x).backward()
        with _Counter() as c:
            opt.step()
        res["calls"].append(c.calls)
        ref.zero_grad()
        _loss(plain, x).backward()
        ref.step()
        for (k, p), q in zip(named.items(), plain.parameters()):
            full = p.detach().full_tensor()
            res["max_rel"] = max(res["max_rel"], float((full - q).abs().max() / q.abs().max()))
            if k in matrices:
                r = float(opt.state[p]["radius"])
                res["radius_err"] = max(res["radius_err"], abs(r / float(ref.state[q]["radius"]) - 1))
                res["norm_err"] = max(res["norm_err"], abs(float(full.double().norm()) / r - 1))
    res["radius_type"] = type(opt.state[named[matrices[0]]]["radius"]).__name__
    res["moment_type"] = type(opt.state[named[matrices[0]]]["exp_avg"]).__name__
    res["n_matrices"] = len(matrices)
    return res


def _skip_agreed(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = _net()
    fully_shard(model, mesh=mesh)
    opt = lvopt.AdamH(model.parameters(), lr=2e-2, nonfinite="skip")
    _loss(model, _batch(0)).backward()
    if rank == 0:
        model[0].weight.grad.to_local()[0, 0] = float("nan")
    before = [p.to_local().clone() for p in model.parameters()]
    opt.step()
    skipped = dict(
        skipped=opt.skipped_steps,
        state=len(opt.state),
        unchanged=all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters())),
    )
    opt.zero_grad()
    _loss(model, _batch(1)).backward()
    opt.step()  # the next, finite step runs everywhere
    skipped["stepped_after"] = not all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
    return skipped


def _refusals(rank: int) -> dict:
    """Layouts AdamH refuses, each recorded with whether anything was written."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    world = torch.distributed.get_world_size()
    cases = {}

    def attempt(name, tensors):
        params = [nn.Parameter(t) for t, _ in tensors]
        for p, (t, g) in zip(params, tensors):
            p.grad = g
        opt = lvopt.AdamH(params, lr=1e-2)
        before = [p.to_local().clone() for p in params]
        try:
            opt.step()
            cases[name] = None
        except Exception as e:  # recorded, asserted on by the tests
            cases[name] = (
                type(e).__name__,
                str(e),
                all(torch.equal(b, p.to_local()) for b, p in zip(before, params)),
                len(opt.state),
            )

    gen = torch.Generator().manual_seed(5)
    w, g = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    mesh1 = init_device_mesh("cpu", (world,))
    attempt(
        "partial",
        [
            (
                DTensor.from_local(w.clone(), mesh1, [Partial()], run_check=False),
                DTensor.from_local(g.clone(), mesh1, [Partial()], run_check=False),
            )
        ],
    )
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
        attempt(
            "two_mesh_dims",
            [(distribute_tensor(w, mesh2, [Shard(0), Shard(1)]), distribute_tensor(g, mesh2, [Shard(0), Shard(1)]))],
        )
        attempt(
            "mixed_groups",
            [
                (
                    distribute_tensor(w, mesh2, [Shard(0), Replicate()]),
                    distribute_tensor(g, mesh2, [Shard(0), Replicate()]),
                ),
                (
                    distribute_tensor(w, mesh2, [Replicate(), Shard(0)]),
                    distribute_tensor(g, mesh2, [Replicate(), Shard(0)]),
                ),
            ],
        )
        # HSDP's layout (replicated over "a", sharded over "b"): supported, one group.
        p = nn.Parameter(distribute_tensor(w, mesh2, [Replicate(), Shard(1)]))
        p.grad = distribute_tensor(g, mesh2, [Replicate(), Shard(1)])
        q = nn.Parameter(w.clone())
        q.grad = g.clone()
        a, b = lvopt.AdamH([p], lr=1e-2), lvopt.AdamH([q], lr=1e-2)
        for _ in range(3):
            a.step()
            b.step()
        cases["hsdp_rel"] = float((p.detach().full_tensor() - q.detach()).abs().max() / q.detach().abs().max())
    return cases


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        res = {f"shard{d}": _equal_to_unsharded(d) for d in (0, 1)}
        res["skip"] = _skip_agreed(rank)
        res["refusals"] = _refusals(rank)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, out_dir) -> list:
    """Starts ``world`` gloo processes running :func:`worker`; returns their results."""
    return _gloo.run_ranks(world, f"import test_fsdp_adamh; test_fsdp_adamh.worker({str(out_dir)!r})", out_dir)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return request.param, run_ranks(request.param, tmp_path_factory.mktemp(f"fsdp{request.param}"))


@needs_native
@pytest.mark.parametrize("shard_dim", [0, 1])
def test_sharded_adamh_equals_unsharded(ranks, shard_dim):
    world, results = ranks
    for res in results:
        r = res[f"shard{shard_dim}"]
        assert r["placements"]["0.weight"] == f"(Shard(dim={shard_dim}),)", r["placements"]
        assert r["moment_type"] == "DTensor" and r["radius_type"] == "Tensor"
        print(
            f"{world} ranks, Shard({shard_dim}): max |sharded - unsharded| / max|W| over {STEPS} steps "
            f"{r['max_rel']:.1e}; | ||W||/R - 1 | {r['norm_err']:.1e}; R vs unsharded {r['radius_err']:.1e}"
        )
        assert r["max_rel"] < 1e-6
        assert r["norm_err"] < 1e-6  # the radius is kept: ||W|| = R after every step
        assert r["radius_err"] < 1e-12  # R is the whole matrix's ||W_0||
    if world == 4:
        shapes = results[3][f"shard{shard_dim}"]["local_shapes"]
        # An uneven last shard: on Shard(0) the 6-row output layer leaves rank 3 no rows.
        assert shapes["2.weight"] == ((0, D_HID) if shard_dim == 0 else (D_OUT, D_HID // 4)), shapes


@needs_native
@pytest.mark.parametrize("shard_dim", [0, 1])
def test_one_all_reduce_per_step_of_24_bytes_per_matrix(ranks, shard_dim):
    """The optimizer's communication: the first step all-reduces the radii (8 bytes per matrix)
    and the sums (24 bytes per matrix), every later step the sums only."""
    world, results = ranks
    for res in results:
        r = res[f"shard{shard_dim}"]
        n = r["n_matrices"]
        assert r["calls"][0] == [8 * n, 24 * n]
        assert all(c == [24 * n] for c in r["calls"][1:]), r["calls"]


@needs_native
def test_nonfinite_skip_is_agreed_by_all_ranks(ranks):
    for res in ranks[1]:
        assert res["skip"] == dict(skipped=1, state=0, unchanged=True, stepped_after=True)


@needs_native
def test_unsupported_layouts_are_refused_on_every_rank_before_writing(ranks):
    world, results = ranks
    expected = {"partial": ("TypeError", "a Partial placement")}
    if world == 4:
        expected.update(
            two_mesh_dims=("TypeError", "sharded along mesh dimensions [0, 1]"),
            mixed_groups=("ValueError", "sharded over the ranks"),
        )
    for res in results:
        for name, (etype, words) in expected.items():
            got = res["refusals"][name]
            assert got is not None, f"{name}: not refused"
            assert got[0] == etype and words in got[1], got
            assert "param 0" in got[1] or "param 1" in got[1], got[1]
            assert got[2] and got[3] == 0, f"{name}: something was written"
        if world == 4:
            assert res["refusals"]["hsdp_rel"] < 1e-6
