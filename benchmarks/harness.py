"""The one harness behind every benchmark: `python -m lvopt bench`, the pytest-benchmark files
(benchmarks/bench_<op>.py), the GPU scripts and the studies (benchmarks/studies/) time with it.

- :func:`measure` is the one timing function: warm-up calls, then timed calls, one sample each
  (perf_counter on the CPU, CUDA events on a GPU, or the other timers a script asks for); given
  several contenders it steps them round-robin, one call each per round, so that the machine's
  noise falls on all of them alike. The statistic is the median of the samples.
- :func:`record` is the one result record: a dict with the case, the contender's name, its
  median ms and the effective GB/s of the bytes its step must move (the case's byte model,
  docs/design.md section 4).
- :func:`format_rows` prints records as a table; :func:`write_csv` appends them to a csv.

A *case* (:class:`Case`) is one workload (a parameter list, a gradient) and several
*contenders* (lvopt and the anchors a user would pick instead); :func:`run_case` times them
with :func:`measure`.
"""

from __future__ import annotations

import argparse
import csv
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
    # Timed by itself after the round-robin of the others: an eager anchor whose step runs for
    # seconds and allocates gigabytes of temporaries leaves the kernel reclaiming memory on one
    # of this machine's two cores for a while after it, and in a round the contender after it
    # took 2-3x its time (the 8192^2 AdamH case, benchmarks/RESULTS.md).
    separate: bool = False


@dataclass
class Case:
    name: str
    title: str
    bytes: float  # bytes one step must move (the case's byte model)
    contenders: list[Contender]
    notes: str = ""
    results: list[dict] = field(default_factory=list)


def gpt2_small_shapes(V: int = 50257, d: int = 768, L: int = 12, ctx: int = 1024, conv1d: bool = False):
    """GPT-2 small's 148 parameter tensors (124M parameters): nn.Linear's (out, in) matrices, or
    with ``conv1d`` Hugging Face GPT-2's Conv1D (in, out) ones (the GPU scripts' layout)."""
    s = [(V, d), (ctx, d)]
    for _ in range(L):
        if conv1d:
            s += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        else:
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


def hyper_table(n: int = 1, lr: float = 1e-3, weight_decay: float = 0.0, device=None) -> torch.Tensor:
    """The ops' per-tensor hyperparameter table (float64, [n, HYPER_COLS], columns as
    lvopt/_layout.py): ``n`` rows of ``lr``, betas (0.9, 0.999), ``weight_decay``, eps 1e-8, no
    maximize, for scripts that call the ops directly."""
    from lvopt import _layout as L

    row = [0.0] * L.HYPER_COLS
    row[L.LR], row[L.BETA1], row[L.BETA2] = lr, 0.9, 0.999
    row[L.WEIGHT_DECAY], row[L.EPS], row[L.MAXIMIZE] = weight_decay, 1e-8, 0.0
    return torch.tensor([row] * n, dtype=torch.float64, device=device)


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
        p.grad = torch.randn(s, generator=g).to(dtype)
        ps.append(p)
    return ps


@dataclass
class Timing:
    """The samples of one timed callable, in seconds. ``host``: with timer="wall", the time to
    the call's return, before the device synchronisation (what the call costs the host)."""

    samples: list[float]
    host: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    @property
    def min_ms(self) -> float:
        return min(self.samples) * 1e3

    @property
    def host_ms(self) -> float:
        return statistics.median(self.host) * 1e3


TIMERS = ("cpu", "events", "wall", "host", "queued")


def sync(device) -> None:
    """Waits for ``device``'s queued work (nothing on the CPU or with no device)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns, rounds: int, warmup: int = 0, *, before=None, device=None, timer: str | None = None, progress=None):
    """Times ``fns`` (a callable, or a dict name -> callable): ``warmup`` untimed calls, then
    ``rounds`` timed calls, each a sample; returns a :class:`Timing` (a dict of them for a dict).

    A dict is timed round-robin: each contender's warm-up calls in turn, then round after round
    one call of each contender in the dict's order (all states alive, so noise falls on all
    alike). ``before(i)``: untimed, before each call (warm-up calls too), ``i`` counting the
    warm-up calls first (0 .. warmup-1) and then the rounds (warmup .. warmup+rounds-1): e.g. to
    set the i-th gradient of a pool. ``progress``: a tqdm-like bar, updated once per timed call.

    ``timer`` (default: "events" on a CUDA ``device``, else "cpu"):
    - "cpu": perf_counter around the call (on a CPU, where the call is the work);
    - "events": CUDA events recorded around the call on the current stream, the device
      synchronised after the warm-up and at each sample's end event (the device time of the
      call's kernels plus the host gaps between them);
    - "wall": the device synchronised, perf_counter around the call and a synchronisation (the
      whole time to a finished call); the host time to the call's return goes to Timing.host;
    - "host": perf_counter around the call, no synchronisation (what the call costs the host
      thread while the device runs behind; one synchronisation after the warm-up and at the end);
    - "queued": the ``rounds`` calls back to back, timed as one (CUDA events on a device) with
      one synchronisation at the end: one sample, the mean per call (a training loop's steady
      state, the host queueing ahead of the device); no ``before`` (it would be timed).
    """
    single = not isinstance(fns, dict)
    steps = {None: fns} if single else dict(fns)
    cuda = device is not None and torch.device(device).type == "cuda"
    timer = timer or ("events" if cuda else "cpu")
    if timer not in TIMERS:
        raise ValueError(f"measure: timer must be one of {TIMERS}, got {timer!r}")
    if timer == "queued" and before is not None:
        raise ValueError("measure: timer='queued' times its calls as one span and takes no before()")
    out = {name: Timing([]) for name in steps}
    for name, fn in steps.items():
        for j in range(warmup):
            if before is not None:
                before(j)
            fn()
    sync(device)
    if timer == "queued":
        for name, fn in steps.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(rounds):
                    fn()
                end.record()
                end.synchronize()
                out[name].samples.append(start.elapsed_time(end) * 1e-3 / rounds)
            else:
                t0 = time.perf_counter()
                for _ in range(rounds):
                    fn()
                out[name].samples.append((time.perf_counter() - t0) / rounds)
            if progress is not None:
                progress.update(rounds)
        return out[None] if single else out
    for r in range(rounds):
        i = warmup + r
        for name, fn in steps.items():
            if before is not None:
                before(i)
            t = out[name]
            if timer == "events" and cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                t.samples.append(start.elapsed_time(end) * 1e-3)
            elif timer == "wall":
                sync(device)
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                sync(device)
                t.samples.append(time.perf_counter() - t0)
                t.host.append(t1 - t0)
            else:  # "cpu", "host", or "events" without a CUDA device
                t0 = time.perf_counter()
                fn()
                t.samples.append(time.perf_counter() - t0)
            if progress is not None:
                progress.update(1)
    sync(device)
    return out[None] if single else out


def record(case: str, name: str, ms: float, nbytes: float | None = None, **extra) -> dict:
    """The result record of one contender: case, name, median ms, and with the bytes its step
    must move, ``bytes`` and the effective ``gbps``; ``extra`` keys as given."""
    row = dict(case=case, name=name, ms=ms)
    if nbytes is not None:
        row.update(bytes=nbytes, gbps=nbytes / ms / 1e6)
    row.update(extra)
    return row


def format_rows(rows: list[dict], columns, title: str | None = None, name_width: int = 44) -> str:
    """``rows`` as a table: the contender's name, then one cell per column of ``columns``, each
    (header, width, cell: row -> str, right-aligned to the width); a row with an ``error`` shows
    it instead of its numbers."""
    lines = [f"\n{title}"] if title is not None else []
    lines.append(f"  {'contender':{name_width}s} " + " ".join(f"{h:>{w}s}" for h, w, _ in columns))
    for r in rows:
        if "error" in r:
            dashes = " ".join(f"{'-':>{w}s}" for _, w, _ in columns)
            lines.append(f"  {r['name']:{name_width}s} {dashes}   not run: {r['error']}")
        else:
            lines.append(f"  {r['name']:{name_width}s} " + " ".join(f"{cell(r):>{w}s}" for _, w, cell in columns))
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    """Adds ``rows`` to the csv at ``path``: the rows already there kept, the header the union of
    all rows' keys (a row without a key leaves its cell empty)."""
    old = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    keys = list(dict.fromkeys(k for r in old + rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(old + rows)


def argparser(doc: str, sizes=("default", "small"), device: str | None = None) -> argparse.ArgumentParser:
    """The command line every benchmark script starts from: its docstring's first paragraph as
    the description, ``--size`` (``sizes``, the first the default) and, given a default,
    ``--device`` (cuda or cpu)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if device is not None:
        ap.add_argument("--device", default=device, choices=["cuda", "cpu"])
    ap.add_argument("--size", default=sizes[0], choices=list(sizes))
    return ap


def copy_bandwidth(nbytes: int = 256 << 20, rounds: int = 9) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written). A copy also reads each
    destination line before writing it (write-allocate), so it moves 3 bytes per 2 counted and
    reads low against in-place kernels; stream_bandwidth is the yardstick for those."""
    x = torch.randn(nbytes // 4)
    y = torch.empty_like(x)
    return 2 * nbytes / measure(lambda: y.copy_(x), rounds, warmup=2).median_s / 1e9


def stream_bandwidth(nbytes: int = 256 << 20, rounds: int = 9) -> float:
    """GB/s of an in-place scale of a large tensor (bytes read + bytes written, the same lines):
    the traffic pattern of an in-place optimizer step, the yardstick of the "% stream" column."""
    x = torch.randn(nbytes // 4)
    return 2 * nbytes / measure(lambda: x.mul_(0.999999), rounds, warmup=2).median_s / 1e9


def _build(c: Contender, errors: dict):
    try:
        return c.make()
    except Exception as e:  # an anchor that is not installed or fails to build
        errors[c.name] = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        return None


def run_case(case: Case, rounds: int, warmup: int = 2, progress=None, alone: bool = False) -> list[dict]:
    """Times every contender of ``case`` with :func:`measure`; returns one record per contender.

    Round-robin (default): all contenders' states are alive and each round steps each once, so
    noise falls on all alike and no contender finds its memory warm in the caches. ``alone``:
    each contender is built, timed and freed by itself (its page tables and state stay as warm
    as they get between steps of one optimizer)."""
    errors: dict = {}
    times: dict = {}
    if alone:
        for c in case.contenders:
            step = _build(c, errors)
            if step is None:
                continue
            times[c.name] = measure(step, rounds, warmup, progress=progress)
            del step
            gc.collect()
    else:
        together = [c for c in case.contenders if not c.separate]
        steps = {c.name: s for c in together if (s := _build(c, errors)) is not None}
        times = measure(steps, rounds, warmup, progress=progress)
        del steps
        for c in case.contenders:
            if c.separate and (step := _build(c, errors)) is not None:
                times[c.name] = measure(step, rounds, warmup, progress=progress)
                del step
    results = []
    for c in case.contenders:
        nbytes = c.bytes if c.bytes is not None else case.bytes
        if c.name in errors:
            results.append(dict(case=case.name, name=c.name, anchor=c.anchor, error=errors[c.name]))
            if progress is not None:
                progress.update(rounds)
            continue
        t = times[c.name]
        results.append(
            record(case.name, c.name, t.median_ms, nbytes, anchor=c.anchor, ms_min=t.min_ms, rounds=rounds, alone=alone)
        )
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
            out += [
                Contender(
                    c.name + ISA_SUFFIX.format(lv),
                    (lambda c=c, lv=lv: at_isa(c.make(), lv)),
                    anchor=False,
                    bytes=c.bytes,
                    separate=c.separate,
                )
                for lv in levels
            ]
        elif c.per_isa is not None:
            out += [
                Contender(c.name + ISA_SUFFIX.format(lv), c.per_isa(lv), bytes=c.bytes, separate=c.separate)
                for lv in levels
            ]
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
        raise ImportError(
            f"DeepSpeedCPUAdam unavailable ({type(e).__name__}); "
            f"install the bench extra: pip install -r requirements-bench.txt"
        ) from None
    if isa is None or isa == _deepspeed_native_isa():
        return DeepSpeedCPUAdam
    if isa != "avx2":
        raise ImportError(
            f"no DeepSpeedCPUAdam build for ISA {isa!r} (DeepSpeed has AVX-512, AVX2 and scalar kernels; "
            f"this bench builds the AVX2 one)"
        )
    module = _deepspeed_avx2_module()

    class DeepSpeedCPUAdamAVX2(DeepSpeedCPUAdam):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.ds_opt_adam.destroy_adam(self.opt_id)
            self.ds_opt_adam = module
            g = self.defaults
            module.create_adam(
                self.opt_id, g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"], self.adam_w_mode, False
            )

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
