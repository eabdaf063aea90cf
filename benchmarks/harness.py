"""The one harness behind every benchmark: `python -m lvopt bench` and the pytest-benchmark
files (benchmarks/bench_<op>.py) share it.

A *case* is one workload (a parameter list, a gradient) and several *contenders* (lvopt and
the anchors a user would pick instead). Contenders of a case are timed round-robin, one step
each per round, so that the machine's noise falls on all of them alike; the statistic is the
median over rounds. Effective bandwidth counts the bytes the step must move by the case's
byte model (docs/design.md section 4), the same for every contender of the case.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass
class Contender:
    name: str
    make: Callable[[], Callable[[], None]]  # builds the state, returns one step
    anchor: bool = True  # False for lvopt's own rows
    bytes: float | None = None  # overrides the case's byte count (e.g. a different dtype)
    # An anchor whose own kernels are chosen per CPU ISA (DeepSpeedCPUAdam): level -> make,
    # for `lvopt bench --isa all`. lvopt's rows need none (lvopt.set_cpu_isa switches them).
    per_isa: Callable[[str], Callable[[], Callable[[], None]]] | None = None


@dataclass
class Case:
    name: str
    title: str
    bytes: float  # bytes one step must move (the case's byte model)
    contenders: list[Contender]
    notes: str = ""
    results: list[dict] = field(default_factory=list)


def gpt2_small_shapes(V: int = 50257, d: int = 768, L: int = 12, ctx: int = 1024):
    """GPT-2 small's 148 parameter tensors (124M parameters)."""
    s = [(V, d), (ctx, d)]
    for _ in range(L):
        s += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return s + [(d,), (d,)]


def gpt2_groups(params):
    """Four groups as a GPT-2 run would have them: embeddings, matrices, vectors, position table."""
    emb, pos, rest = params[0], params[1], params[2:]
    mats = [p for p in rest if p.dim() >= 2]
    vecs = [p for p in rest if p.dim() < 2]
    return [
        dict(params=[emb], lr=3e-3, weight_decay=0.1),
        dict(params=mats, lr=1e-3, weight_decay=0.1),
        dict(params=vecs, lr=1e-3, weight_decay=0.0),
        dict(params=[pos], lr=1e-3, weight_decay=0.0),
    ]


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
        p.grad = torch.randn(s, generator=g).to(dtype)
        ps.append(p)
    return ps


def _median_s(fn, rounds: int) -> float:
    ts = []
    for i in range(rounds + 2):
        t = time.perf_counter()
        fn()
        if i >= 2:
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(nbytes: int = 256 << 20, rounds: int = 9) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written). A copy also reads each
    destination line before writing it (write-allocate), so it moves 3 bytes per 2 counted and
    reads low against in-place kernels; stream_bandwidth is the yardstick for those."""
    x = torch.randn(nbytes // 4)
    y = torch.empty_like(x)
    return 2 * nbytes / _median_s(lambda: y.copy_(x), rounds) / 1e9


def stream_bandwidth(nbytes: int = 256 << 20, rounds: int = 9) -> float:
    """GB/s of an in-place scale of a large tensor (bytes read + bytes written, the same lines):
    the traffic pattern of an in-place optimizer step, the yardstick of the "% stream" column."""
    x = torch.randn(nbytes // 4)
    return 2 * nbytes / _median_s(lambda: x.mul_(0.999999), rounds) / 1e9


def _build(c: Contender, errors: dict):
    try:
        return c.make()
    except Exception as e:  # an anchor that is not installed or fails to build
        errors[c.name] = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        return None


def _time(step, out: list, progress) -> None:
    t = time.perf_counter()
    step()
    out.append(time.perf_counter() - t)
    if progress is not None:
        progress.update(1)


def run_case(case: Case, rounds: int, warmup: int = 2, progress=None, alone: bool = False) -> list[dict]:
    """Times every contender of ``case``; returns one dict per contender.

    Round-robin (default): all contenders' states are alive and each round steps each once, so
    noise falls on all alike and no contender finds its memory warm in the caches. ``alone``:
    each contender is built, timed and freed by itself (its page tables and state stay as warm
    as they get between steps of one optimizer)."""
    errors: dict = {}
    times = {c.name: [] for c in case.contenders}
    if alone:
        for c in case.contenders:
            step = _build(c, errors)
            if step is None:
                continue
            for _ in range(warmup):
                step()
            for _ in range(rounds):
                _time(step, times[c.name], progress)
            del step
            gc.collect()
    else:
        steps = {c.name: s for c in case.contenders if (s := _build(c, errors)) is not None}
        for step in steps.values():
            for _ in range(warmup):
                step()
        for _ in range(rounds):
            for name, step in steps.items():
                _time(step, times[name], progress)
        del steps
    results = []
    for c in case.contenders:
        nbytes = c.bytes if c.bytes is not None else case.bytes
        if c.name in errors:
            results.append(dict(case=case.name, name=c.name, anchor=c.anchor, error=errors[c.name]))
            if progress is not None:
                progress.update(rounds)
            continue
        med = statistics.median(times[c.name])
        results.append(dict(case=case.name, name=c.name, anchor=c.anchor, ms=med * 1e3,
                            ms_min=min(times[c.name]) * 1e3, bytes=nbytes, gbps=nbytes / med / 1e9,
                            rounds=rounds, alone=alone))
    gc.collect()
    case.results = results
    return results


ISA_SUFFIX = " [{}]"


def at_isa(step: Callable[[], None], level: str) -> Callable[[], None]:
    """``step`` with lvopt's CPU kernels at ISA ``level`` (lvopt.set_cpu_isa around it)."""
    import lvopt

    def run():
        with lvopt.set_cpu_isa(level):
            step()
    return run


def expand_isa(case: Case, levels: list[str]) -> Case:
    """``case`` with one copy of each lvopt contender per ISA level (named "name [level]") and of
    each anchor that has ``per_isa`` builds; other anchors once. All copies are alive and timed
    round-robin, so the levels are compared side by side in the same minutes."""
    out = []
    for c in case.contenders:
        if not c.anchor:
            out += [Contender(c.name + ISA_SUFFIX.format(lv), (lambda c=c, lv=lv: at_isa(c.make(), lv)),
                              anchor=False, bytes=c.bytes) for lv in levels]
        elif c.per_isa is not None:
            out += [Contender(c.name + ISA_SUFFIX.format(lv), c.per_isa(lv), bytes=c.bytes) for lv in levels]
        else:
            out.append(c)
    return Case(case.name, case.title, case.bytes, out, case.notes)


def deepspeed_adam(isa: str | None = None):
    """DeepSpeedCPUAdam, or an ImportError that says how to get it.

    ``isa``: the level DeepSpeed's own kernels are compiled for. DeepSpeed builds its CPU Adam
    once per machine with -march=native and -D__AVX512__ or -D__AVX256__ from the CPU flags;
    ``isa="avx2"`` on an AVX-512 machine returns a class whose instances use a second build of
    the same sources with -march=haswell -D__AVX256__ (DeepSpeed's AVX2 kernels), so an
    AVX2-capped lvopt is compared with what DeepSpeed runs on an AVX2-only machine."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # deepspeed missing, or its CPU op failed to build
        raise ImportError(f"DeepSpeedCPUAdam unavailable ({type(e).__name__}); "
                          f"install the bench extra: pip install -r requirements-bench.txt") from None
    if isa is None or isa == _deepspeed_native_isa():
        return DeepSpeedCPUAdam
    if isa != "avx2":
        raise ImportError(f"no DeepSpeedCPUAdam build for ISA {isa!r} (DeepSpeed has AVX-512, AVX2 and scalar kernels; "
                          f"this bench builds the AVX2 one)")
    module = _deepspeed_avx2_module()

    class DeepSpeedCPUAdamAVX2(DeepSpeedCPUAdam):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.ds_opt_adam.destroy_adam(self.opt_id)
            self.ds_opt_adam = module
            g = self.defaults
            module.create_adam(self.opt_id, g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"],
                               self.adam_w_mode, False)
    return DeepSpeedCPUAdamAVX2


def _deepspeed_native_isa() -> str:
    import lvopt

    return "avx512" if lvopt.build_info()["cpu_isa_hardware"] == "avx512" else "avx2"


_DS_AVX2 = []


def _deepspeed_avx2_module():
    if not _DS_AVX2:
        from deepspeed.ops.op_builder.cpu.cpu_adam import CPUAdamBuilder

        class CPUAdamAVX2Builder(CPUAdamBuilder):
            NAME = "cpu_adam_avx2"

            def absolute_name(self):
                return f"deepspeed.ops.adam.{self.NAME}_op"

            def cpu_arch(self):
                return "-march=haswell"

            def simd_width(self):
                return "-D__AVX256__"
        _DS_AVX2.append(CPUAdamAVX2Builder().load())
    return _DS_AVX2[0]


def optimizer_step(opt_factory, shapes, dtype=torch.float32, groups=None):
    """A contender factory: params + grads of ``shapes``, the optimizer, its step."""
    def make():
        ps = make_params(shapes, dtype)
        opt = opt_factory(groups(ps) if groups else ps)
        return opt.step
    return make
