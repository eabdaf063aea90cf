"""The CPU workspace (csrc/cpu/workspace.h) and AdamH's kept direction: fused_adamh_ keeps u from
pass 1 for pass 2 in batches that fit the workspace; every cap (none, batches, too small for a
tensor) and every ISA level gives the bits of the step that recomputes u."""

import threading

import pytest
import torch

import lvopt
from conftest import clone_all, make_hyper, make_state, needs_native, run_python

pytestmark = needs_native

# Tails (not a multiple of 16), an empty tensor, several 64 Ki chunks, and a step of more than
# the 4 Mi elements below which u is recomputed (kKeepMinElements in fused_adamh.cpp).
SHAPES = [(1,), (7,), (33, 17), (65536 + 5,), (0,), (129, 257), (3, 70001), (2048, 2053)]
KEPT_FLOATS = sum((torch.Size(s).numel() + 15) // 16 * 16 for s in SHAPES)
SMALL = KEPT_FLOATS - 2048 * 2053  # the floats of u before the big tensor


def _steps(ps, gs, ms, vs, ss, radii, hyper, mb, steps=3):
    ps, gs, ms, vs, ss = clone_all(ps, gs, ms, vs, ss)
    with lvopt.set_cpu_workspace_limit(mb):
        for _ in range(steps):
            sums = torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper, None)
        held = lvopt.build_info()["cpu_workspace_held_mb"]
    return (ps, ms, vs, ss, sums), held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_direction_gives_the_recomputed_bits(gen, dtype):
    ps, gs, ms, vs, ss = make_state(SHAPES, dtype, gen, steps=3)
    hyper = make_hyper(len(SHAPES), wd=0.0, gen=gen)
    radii = [torch.linalg.vector_norm(p.double()).reshape(()) * 1.5 for p in ps]
    recomputed, held = _steps(ps, gs, ms, vs, ss, radii, hyper, 0)
    assert held == 0
    # One batch; the small tensors in one batch and the big one in another; the small ones in
    # several batches and the big one over the cap (recomputed).
    caps = [512, 4 * (KEPT_FLOATS - 16) / 2**20, 4 * SMALL / 3 / 2**20]
    for level in lvopt.cpu_isa_levels():
        with lvopt.set_cpu_isa(level):
            for mb in caps:
                kept, held = _steps(ps, gs, ms, vs, ss, radii, hyper, mb)
                assert 0 < held <= max(mb, 4 * KEPT_FLOATS / 2**20 + 1), (level, mb, held)
                for what, a, b in zip(("params", "exp_avgs", "exp_avg_sqs", "steps"), kept, recomputed):
                    for i, (x, y) in enumerate(zip(a, b)):
                        assert torch.equal(x, y), f"{what}[{i}] differs at {level}, cap {mb} MiB"
                assert torch.equal(kept[4], recomputed[4]), f"sums differ at {level}, cap {mb} MiB"
    # And the step is AdamH's: the reference within fp32 rounding (the bits are the same for
    # any cap, so this checks the kept path too).
    rp, rg, rm, rv, rs = clone_all(ps, gs, ms, vs, ss)
    for _ in range(3):
        lvopt.reference.fused_adamh_(rp, rg, rm, rv, rs, radii, hyper)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    for p, q in zip(recomputed[0], rp):
        if p.numel():
            assert float((p.double() - q.double()).norm() / q.double().norm()) < tol


def test_a_kept_step_uses_the_workspace_and_a_zero_cap_frees_it(gen):
    """The kept path is taken (the buffer is held after the step, sized to the step's u) and
    the cap governs it: lowering the cap below the buffer frees it. A step of fewer than 4 Mi
    elements recomputes u (its data stays in cache between the passes)."""
    ps, gs, ms, vs, ss = make_state(SHAPES, torch.float32, gen, steps=1)
    hyper = make_hyper(len(SHAPES), wd=0.0)
    radii = [torch.tensor(2.0, dtype=torch.float64) for _ in ps]
    with lvopt.set_cpu_workspace_limit(0):
        assert lvopt.build_info()["cpu_workspace_held_mb"] == 0
        with lvopt.set_cpu_workspace_limit(64):
            small = [t[:-1] for t in (ps, gs, ms, vs, ss)]
            torch.ops.lvopt.fused_adamh_(*small, radii[:-1], hyper[:-1], None)
            assert lvopt.build_info()["cpu_workspace_held_mb"] == 0
            torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper, None)
            info = lvopt.build_info()
            assert info["cpu_workspace_limit_mb"] == 64
            assert info["cpu_workspace_held_mb"] * 2**20 >= 4 * KEPT_FLOATS
        assert lvopt.build_info()["cpu_workspace_held_mb"] == 0
        # With no workspace the step still runs (recomputing u).
        torch.ops.lvopt.fused_adamh_(ps, gs, ms, vs, ss, radii, hyper, None)
        assert lvopt.build_info()["cpu_workspace_held_mb"] == 0


def test_steps_on_two_threads_at_once_match_one_at_a_time(gen):
    """Two AdamH steps running concurrently: one has the workspace, the other recomputes u (it
    cannot wait for a buffer another step holds); both give the sequential bits."""
    ps, gs, ms, vs, ss = make_state([(2049, 2051)], torch.float32, gen, steps=2)
    hyper = make_hyper(1, wd=0.0)
    radii = [torch.linalg.vector_norm(ps[0].double()).reshape(())]
    expected, _ = _steps(ps, gs, ms, vs, ss, radii, hyper, 512, steps=20)
    states = [clone_all(ps, gs, ms, vs, ss) for _ in range(2)]
    barrier = threading.Barrier(2)

    def run(state):
        barrier.wait()
        for _ in range(20):
            torch.ops.lvopt.fused_adamh_(*state, radii, hyper, None)

    with lvopt.set_cpu_workspace_limit(512):
        threads = [threading.Thread(target=run, args=(s,)) for s in states]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for state in states:
        for got, want in zip((state[0], state[2], state[3]), expected[:3]):
            assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_the_optimizer_step_does_not_depend_on_the_cap(gen):
    def train(mb):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(48, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 2048))
        opt = lvopt.AdamH(model.parameters(), lr=1e-2)
        x = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
        with lvopt.set_cpu_workspace_limit(mb):
            for _ in range(3):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    with lvopt.set_cpu_workspace_limit(0):  # start from no buffer: the kept run allocates it
        pass
    kept = train(512)
    assert lvopt.build_info()["cpu_workspace_held_mb"] > 0  # the 2048 x 2048 + ... step kept u
    for a, b in zip(kept, train(0)):
        assert torch.equal(a, b)


def test_the_cap_from_the_environment_and_bad_caps():
    out = run_python(
        "import lvopt; i = lvopt.build_info(); print(i['cpu_workspace_limit_mb'])", env={"LVOPT_CPU_WORKSPACE_MB": "3"}
    )
    assert float(out.strip()) == 3.0
    with pytest.raises(ValueError, match="set_cpu_workspace_limit.*>= 0"):
        lvopt.set_cpu_workspace_limit(-1)
    before = lvopt.build_info()["cpu_workspace_limit_mb"]
    with lvopt.set_cpu_workspace_limit(7) as s:
        assert lvopt.build_info()["cpu_workspace_limit_mb"] == 7 and repr(s) == "lvopt.set_cpu_workspace_limit(7)"
    assert lvopt.build_info()["cpu_workspace_limit_mb"] == before
