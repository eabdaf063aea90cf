"""CPU ISA levels (csrc/cpu/isa.h): lvopt.set_cpu_isa switches the level in a running process,
every level gives the same bits for every optimizer path, and `lvopt bench --isa` times and
checks the claims per level. Also the huge-page backing of lvopt's CPU moments (lvopt/_memory.py).

The subprocess tests in test_fused_adamw.py / test_sparse_rows.py check the LVOPT_CPU_ISA
start-up path; these switch levels in-process, so one test covers every op and dtype at every
level the machine has, on tensors whose lengths leave vector tails at 8 and 16 lanes."""

import pytest
import torch

import lvopt
from conftest import needs_native

LEVELS = lvopt.cpu_isa_levels()


@needs_native
def test_set_cpu_isa_switches_and_restores():
    info = lvopt.build_info()
    start = info["cpu_isa_active"]
    assert LEVELS[-1] == info["cpu_isa_hardware"] and "baseline" in LEVELS
    for lv in LEVELS:
        with lvopt.set_cpu_isa(lv) as s:
            assert s.level == lv and lvopt.build_info()["cpu_isa_active"] == lv
        assert lvopt.build_info()["cpu_isa_active"] == start
    with pytest.raises(ValueError, match="unknown CPU ISA level 'sse9'"):
        lvopt.set_cpu_isa("sse9")
    above = {"baseline": "avx2", "avx2": "avx512"}.get(info["cpu_isa_hardware"])
    if above is not None:
        with pytest.raises(ValueError, match=f"'{above}' is above this CPU's level"):
            lvopt.set_cpu_isa(above)
    assert lvopt.build_info()["cpu_isa_active"] == start


def _run_everything(seed: int) -> list[torch.Tensor]:
    """Three steps of every CPU optimizer path; returns every parameter and state tensor."""
    g = torch.Generator().manual_seed(seed)
    out = []

    def params(shapes, dtype):
        return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]

    def grads(ps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)

    shapes = [(70001,), (33, 65), (5,)]
    for dtype in (torch.float32, torch.bfloat16):
        for kw in (dict(), dict(track=True), dict(amsgrad=True), dict(maximize=True)):
            ps = params(shapes, dtype)
            opt = lvopt.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw)
            for _ in range(3):
                grads(ps)
                opt.step()
            out += ps + [t for p in ps for t in opt.state[p].values() if torch.is_tensor(t)]
            if kw.get("track"):
                out.append(opt.telemetry._sums)
        ps = params([(257, 129), (1000, 67)], dtype)
        opt = lvopt.AdamH([dict(params=ps[:1]), dict(params=ps[1:], lr=3e-3)], lr=1e-2)
        for _ in range(3):
            grads(ps)
            opt.step()
        out += ps + [t for p in ps for t in opt.state[p].values() if torch.is_tensor(t)]
    for mode in ("exact", "lazy"):
        emb = lvopt.nn.Embedding(300, 67)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(300, 67, generator=g))
        opt = lvopt.AdamW(emb.parameters(), lr=1e-2, weight_decay=0.1, sparse_mode=mode)
        for _ in range(4):
            ids = torch.randint(0, 40, (64,), generator=g)
            emb(ids).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
        out += [emb.weight.detach()] + [t for t in opt.state[emb.weight].values() if torch.is_tensor(t)]
    return [t.detach().clone() for t in out]


@needs_native
@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU has one ISA level")
def test_every_level_gives_the_same_bits():
    runs = {}
    for lv in LEVELS:
        with lvopt.set_cpu_isa(lv):
            runs[lv] = _run_everything(seed=11)
    best = runs[LEVELS[-1]]
    for lv in LEVELS[:-1]:
        assert len(runs[lv]) == len(best)
        for i, (a, b) in enumerate(zip(runs[lv], best)):
            assert a.dtype == b.dtype and torch.equal(
                a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b
            ), f"tensor {i} differs between {lv} and {LEVELS[-1]}"


@needs_native
def test_the_comparison_can_fail():
    """The bit comparison above would see a one-ulp change: two seeds differ, and a run equals itself."""
    a, b = _run_everything(seed=11), _run_everything(seed=11)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = _run_everything(seed=12)
    assert not all(torch.equal(x, y) for x, y in zip(a, c) if x.shape == y.shape)


def test_bench_isa_levels_and_claims_per_level():
    from lvopt.bench import check_claims, isa_levels

    assert isa_levels("") == []
    if LEVELS:
        assert isa_levels("all") == ([lv for lv in LEVELS if lv != "baseline"] or LEVELS)
        with pytest.raises(SystemExit, match="not available on this CPU"):
            isa_levels("baseline,avx1024")
    # AdamH at 1.5x AdamW at avx512 (met), 1.9x at avx2 (missed); the anchors are shared.
    rows = [
        dict(case="adamh", name="lvopt AdamH [avx512]", ms=150.0),
        dict(case="adamh", name="lvopt AdamW (same matrix) [avx512]", ms=100.0),
        dict(case="adamh", name="lvopt AdamH [avx2]", ms=190.0),
        dict(case="adamh", name="lvopt AdamW (same matrix) [avx2]", ms=100.0),
        dict(case="adamh", name="eager PyTorch AdamH", ms=1000.0),
    ]
    claims = {c["claim"]: c for c in check_claims(rows, ["avx2", "avx512"])}
    assert claims["AdamH: <= 1.6x the AdamW step [avx512]"]["met"]
    assert not claims["AdamH: <= 1.6x the AdamW step [avx2]"]["met"]
    assert claims["AdamH: >= 3x eager PyTorch AdamH [avx2]"]["ratio"] == pytest.approx(1000 / 190)
    assert len(claims) == 4


def test_expand_isa_copies_lvopt_rows_and_per_isa_anchors():
    import importlib
    import sys

    from lvopt.bench import suite_dir

    suite_dir()
    harness = importlib.import_module("harness")
    calls = []
    case = harness.Case(
        "c",
        "t",
        1.0,
        [
            harness.Contender(
                "lvopt X", lambda: lambda: calls.append(lvopt.build_info()["cpu_isa_active"]), anchor=False
            ),
            harness.Contender("anchor A", lambda: lambda: None),
            harness.Contender("anchor B", lambda: lambda: None, per_isa=lambda lv: lambda: lambda: None),
        ],
    )
    top = LEVELS[-1] if LEVELS else "baseline"
    out = harness.expand_isa(case, ["baseline", top])
    names = [c.name for c in out.contenders]
    assert names[:2] == ["lvopt X [baseline]", f"lvopt X [{top}]"]
    assert "anchor A" in names and "anchor B [baseline]" in names
    if LEVELS:
        for c in out.contenders[:2]:
            c.make()()
        assert calls == ["baseline", LEVELS[-1]]
    assert "harness" in sys.modules


def _vm_flags(addr: int) -> str:
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line
    return ""


@pytest.mark.skipif(lvopt._memory.thp_mode() not in ("always", "madvise"), reason="no transparent huge pages here")
def test_cpu_moments_are_marked_for_huge_pages(monkeypatch):
    from lvopt import _memory

    monkeypatch.setattr(_memory, "ENABLED", True)
    p = torch.nn.Parameter(torch.randn(3 << 20))  # 12 MiB
    p.grad = torch.randn_like(p)
    opt = lvopt.AdamW([p], lr=1e-3)
    opt.step()
    m = opt.state[p]["exp_avg"]
    assert " hg" in _vm_flags(m.data_ptr() + (4 << 20)), "exp_avg is not marked MADV_HUGEPAGE"
    # Same values and layout as zeros_like.
    small = _memory.zeros(torch.empty(10), torch.float32)
    assert torch.equal(small, torch.zeros(10))
    big = _memory.zeros(torch.empty(2048, 1024).t(), torch.float32)
    assert big.stride() == (1, 1024) and not big.any()
    # Switched off (the default), nothing is marked. (Checked on the call, not on the flags of
    # the memory: the allocator may hand back an address range an earlier tensor had marked.)
    monkeypatch.setattr(_memory, "ENABLED", False)
    marked = []
    monkeypatch.setattr(_memory, "mark_hugepages", lambda t: marked.append(t) or 0)
    off = _memory.zeros(torch.empty(3 << 20), torch.float32)
    assert not marked and not off.any()
    monkeypatch.setattr(_memory, "ENABLED", True)
    _memory.zeros(torch.empty(3 << 20), torch.float32)
    assert len(marked) == 1


def _disassembly() -> str:
    import glob
    import os
    import shutil
    import subprocess

    so = glob.glob(os.path.join(os.path.dirname(lvopt.__file__), "_C*.so"))
    if not so or shutil.which("objdump") is None:
        pytest.skip("needs the built lvopt._C and binutils' objdump")
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", so[0]], capture_output=True, text=True, check=True
    ).stdout


@needs_native
@pytest.mark.skipif(
    not set(LEVELS) & {"avx2", "avx512"} and lvopt.build_info()["cpu_isa_compiled"] == ["baseline"],
    reason="x86-64 builds only",
)
def test_every_vector_level_loop_is_vectorised():
    """Every per-ISA kernel with a square root computes it with packed instructions at AVX2 and
    AVX-512 (sqrtps, 8/16 lanes), not only scalar ones (sqrtss: the vector loop's tail). The
    exact-mode catch-up passes once compiled scalar at AVX2 (a ternary GCC turned into
    conditional stores, which it vectorises only with AVX-512's masked stores)."""
    import re

    funcs, cur = {}, None
    for line in _disassembly().splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = re.search(r"::(\w+_(?:avx2|avx512))\(", m.group(1))
            cur = name.group(1) if name else None
            if cur:
                funcs.setdefault(cur, [])
        elif cur and "\t" in line:
            funcs[cur].append(line.split("\t")[-1].split()[0] if line.split("\t")[-1].split() else "")
    with_sqrt = {f: ops for f, ops in funcs.items() if any("sqrt" in o for o in ops)}
    assert any(f.startswith("catchup_fwd_step") for f in with_sqrt), sorted(funcs)[:20]
    scalar_only = [f for f, ops in with_sqrt.items() if not any(o.endswith(("sqrtps", "sqrtpd")) for o in ops)]
    assert not scalar_only, f"kernels without a packed square root (not vectorised): {sorted(scalar_only)}"
