"""``lvopt bench`` (also ``python -m lvopt bench``): lvopt side by side with what users would
pick instead.

Runs the benchmark families of the suite (``bench_<op>.py``: benchmarks/ in a source checkout,
the copy a wheel ships in lvopt/_bench otherwise; see :func:`suite_dir`) through their shared
harness, measures a copy and an in-place stream bandwidth in the same run, and prints one table
per case (median ms, effective GB/s, fraction of the stream bandwidth, speed-up of lvopt over
each anchor), then the ratios that lvopt's issues promise (the suite's claims.py), each marked
as met or missed. Writes ``bench.json`` and ``bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# Where the suite is: the copy a wheel ships (setup.py copies benchmarks/*.py there at build
# time; a checkout has none), then a source checkout's benchmarks/ (editable install, PYTHONPATH).
SUITE_DIRS = (os.path.join(HERE, "_bench"), os.path.join(os.path.dirname(HERE), "benchmarks"))
# Files that identify the suite (a site-packages/benchmarks of another project is not it).
SUITE_FILES = ("harness.py", "claims.py", "bench_fused_adamw.py")
# Families in the order the table shows them; each module has cases(size) (harness cases) or
# run(size) (rows it timed itself).
FAMILIES = ["bench_fused_adamw", "bench_fused_adamh", "bench_sparse_rows"]


def suite_dir() -> str:
    """The benchmark suite's directory, put first on sys.path (its modules import each other
    by name). Exits with what to do when there is none."""
    for d in SUITE_DIRS:
        if all(os.path.exists(os.path.join(d, f)) for f in SUITE_FILES):
            if d not in sys.path:
                sys.path.insert(0, d)
            return d
    raise SystemExit(
        f"lvopt bench: the benchmark suite is not here (looked for {', '.join(SUITE_FILES)} in "
        f"{' and '.join(SUITE_DIRS)}). It ships in wheels built from the source tree (`make wheel`, "
        f"or `pip wheel --no-build-isolation .`) and lives in benchmarks/ of a source checkout: "
        f"install such a wheel, or run `python -m lvopt bench` / `make bench` in a checkout."
    )


def _families(only: set[str] | None):
    d = suite_dir()
    return [importlib.import_module(name) for name in FAMILIES if os.path.exists(os.path.join(d, name + ".py"))]


def check_claims(results: list[dict], levels: list[str] | None = None) -> list[dict]:
    """The suite's claims (claims.py) checked on ``results``; with ISA ``levels`` (rows named
    "name [level]", see --isa), once per level on that level's rows and the shared anchors,
    each claim marked with its level."""
    suite_dir()
    check = importlib.import_module("claims").check_claims
    if not levels:
        return check(results)
    out = []
    for lv in levels:
        tag = f" [{lv}]"
        tagged = [f" [{x}]" for x in levels]
        view = [
            dict(r, name=r["name"][: -len(tag)]) if r["name"].endswith(tag) else r
            for r in results
            if r["name"].endswith(tag) or not any(r["name"].endswith(t) for t in tagged)
        ]
        out += [dict(c, claim=f"{c['claim']} [{lv}]", isa=lv) for c in check(view)]
    return out


def isa_levels(spec: str) -> list[str]:
    """The levels of ``--isa``: [] for the default (the level in use), every level from avx2 up
    that this CPU has for ``all`` (baseline too where it is the only one), or the listed ones,
    refused with what this CPU has when it lacks one."""
    if not spec:
        return []
    import lvopt

    have = lvopt.cpu_isa_levels()
    if not have:
        raise SystemExit(
            f"lvopt bench --isa: the native CPU kernels are not built ({lvopt.build_info()['native_error']})"
        )
    if spec == "all":
        return [lv for lv in have if lv != "baseline"] or have
    want = [s.strip() for s in spec.split(",") if s.strip()]
    missing = [lv for lv in want if lv not in have]
    if missing:
        raise SystemExit(
            f"lvopt bench --isa: {', '.join(missing)} not available on this CPU (it has {', '.join(have)})"
        )
    return want


def machine_info() -> dict:
    import lvopt

    info = lvopt.build_info()
    return dict(
        machine=platform.machine(),
        processor=_cpu_name(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        lvopt=info["version"],
        cpu_isa=info["cpu_isa_active"],
        date=time.strftime("%Y-%m-%d %H:%M"),
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_case(title: str, rows: list[dict], stream_gbps: float) -> str:
    """One case's table (the suite's harness.format_rows): median ms, effective GB/s, fraction of
    the stream bandwidth, and lvopt's speed-up over each anchor."""
    suite_dir()
    harness = importlib.import_module("harness")
    ours = next((r for r in rows if not r.get("anchor") and "ms" in r), None)
    columns = [
        ("median ms", 10, lambda r: f"{r['ms']:.2f}"),
        ("GB/s eff", 9, lambda r: f"{r['gbps']:.1f}"),
        ("% stream", 8, lambda r: f"{100 * r['gbps'] / stream_gbps:.0f}%"),
        (
            "lvopt speed-up",
            15,
            lambda r: f"{r['ms'] / ours['ms']:.2f}x" if ours is not None and r.get("anchor") else "",
        ),
    ]
    return harness.format_rows(rows, columns, title)


def plot(results: list[dict], path: str) -> None:
    """One row per case: time per step on a log scale (what a user decides by: lvopt's rows
    green, the anchors grey, each anchor labelled with lvopt's speed-up over it), and the
    effective GB/s beside it (how close each contender is to the memory system)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = list(dict.fromkeys(r["case"] for r in results if "ms" in r))
    fig, axes = plt.subplots(
        len(cases), 2, figsize=(12, 1.6 + 1.1 * len(cases) * 1.6), squeeze=False, gridspec_kw=dict(width_ratios=(3, 2))
    )
    for (ax_t, ax_b), case in zip(axes, cases):
        rows = [r for r in results if r["case"] == case and "ms" in r]
        names = [r["name"] for r in rows]
        colors = ["tab:green" if not r["anchor"] else "tab:gray" for r in rows]
        ours = next((r for r in rows if not r["anchor"]), None)
        ax_t.barh(names, [r["ms"] for r in rows], color=colors)
        ax_t.set_xscale("log")
        ax_t.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ours is not None:
            for i, r in enumerate(rows):
                if r["anchor"]:
                    ax_t.annotate(
                        f"{r['ms'] / ours['ms']:.2f}x",
                        (r["ms"], i),
                        xytext=(3, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=7,
                    )
        ax_t.set_title(case, fontsize=9)
        ax_t.invert_yaxis()
        ax_t.tick_params(labelsize=8)
        ax_b.barh(names, [r["gbps"] for r in rows], color=colors)
        ax_b.invert_yaxis()
        ax_b.set_yticks([])
        ax_b.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("ms per step, log scale (lower is better; labels: lvopt's speed-up over the anchor)")
    axes[-1, 1].set_xlabel("effective GB/s (the case's byte model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lvopt bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="default", choices=["small", "default"])
    ap.add_argument("--only", default="", help="comma-separated case names (e.g. adamw_1x,adamh,sparse_rows)")
    ap.add_argument("--rounds", type=int, default=7, help="timed steps per contender (median reported)")
    ap.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--alone",
        action="store_true",
        help="time each contender by itself instead of round-robin with the others alive",
    )
    ap.add_argument(
        "--e2e",
        action="store_true",
        help="end-to-end mode: train a small large-vocabulary LM with torch.optim.AdamW and lvopt",
    )
    ap.add_argument("--steps", type=int, default=300, help="training steps of --e2e")
    ap.add_argument(
        "--isa",
        default="",
        help="CPU ISA levels of lvopt's kernels: 'all' (avx2 and avx512, those this CPU has) or a "
        "comma-separated list (baseline,avx2,avx512); each lvopt row (and DeepSpeedCPUAdam) is "
        "timed at each level side by side, and the claims are checked per level. Default: the "
        "level in use (LVOPT_CPU_ISA or the CPU's best)",
    )
    args = ap.parse_args(argv)
    if args.e2e:
        suite_dir()
        return int(importlib.import_module("bench_e2e").main(["--steps", str(args.steps), "--out", args.out]) or 0)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None

    if args.device == "cuda":
        if not os.path.exists(os.path.join(suite_dir(), "bench_gpu.py")):
            print(f"lvopt bench: no GPU benchmark (bench_gpu.py) in {suite_dir()}")
            return 2
        gpu = importlib.import_module("bench_gpu")
        return int(gpu.main(["--size", args.size]) or 0)

    levels = isa_levels(args.isa)
    mods = _families(only)
    harness = importlib.import_module("harness")
    info = machine_info()
    if levels:
        info["cpu_isa"] = ",".join(levels)
    print(
        f"lvopt bench: {info['processor']}, {info['cores']} cores, torch {info['torch']}, "
        f"{info['threads']} threads, CPU ISA {info['cpu_isa']}, size={args.size}",
        flush=True,
    )
    copy_gbps = harness.copy_bandwidth()
    stream_gbps = harness.stream_bandwidth()
    print(
        f"copy bandwidth (256 MiB, read + write): {copy_gbps:.1f} GB/s; in-place stream (the "
        f'"% stream" yardstick; a copy also reads its destination): {stream_gbps:.1f} GB/s',
        flush=True,
    )

    cases, runners = [], []
    for m in mods:
        if hasattr(m, "cases"):
            cases += [
                harness.expand_isa(c, levels) if levels else c
                for c in m.cases(args.size)
                if only is None or c.name in only
            ]
        elif hasattr(m, "run") and (only is None or getattr(m, "CASE", "sparse_rows") in only):
            runners.append(m)
    try:
        from tqdm import tqdm

        bar = (
            None
            if args.no_progress
            else tqdm(
                total=sum(len(c.contenders) for c in cases) * args.rounds,
                desc="bench",
                unit="step",
                leave=False,
                file=sys.stderr,
            )
        )
    except ImportError:
        bar = None

    results, tables = [], []
    for c in cases:
        if bar is not None:
            bar.set_postfix_str(c.name)
        rows = harness.run_case(c, rounds=args.rounds, progress=bar, alone=args.alone)
        results += rows
        tables.append(format_case(c.title, rows, stream_gbps))
    if bar is not None:
        bar.close()
    for m in runners:
        name = getattr(m, "CASE", "sparse_rows")
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = m.run(args.size, isa_levels=levels) if levels else m.run(args.size)
        rows = [dict(r, case=name, anchor=r.get("anchor", not str(r["name"]).startswith("lvopt"))) for r in out]
        results += rows
        tables.append(format_case(getattr(m, "TITLE", name), rows, stream_gbps))
    for t in tables:
        print(t)

    claims = check_claims(results, levels)
    if claims:
        print("\nWhat the issues ask, measured in this run:")
        for c in claims:
            print(f"  [{'met ' if c['met'] else 'MISS'}] {c['claim']}: {c['ratio']:.2f}x (bound {c['bound']:.2f}x)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(
            dict(
                machine=info,
                copy_gbps=copy_gbps,
                stream_gbps=stream_gbps,
                size=args.size,
                results=results,
                claims=claims,
            ),
            f,
            indent=1,
        )
    # bench.csv keeps every run's rows (one line per contender, with the run's date, machine and size).
    run_info = dict(
        date=info["date"], processor=info["processor"], threads=info["threads"], cpu_isa=info["cpu_isa"], size=args.size
    )
    harness.write_csv([dict(r, **run_info) for r in results], os.path.join(args.out, "bench.csv"))
    try:
        plot(results, os.path.join(args.out, "bench.png"))
        print(f"\nwrote {args.out}/bench.json, {args.out}/bench.csv and {args.out}/bench.png")
    except ImportError as e:  # matplotlib is an optional dependency (pip install 'lvopt[bench]')
        print(f"\nwrote {args.out}/bench.json and {args.out}/bench.csv; no bench.png: {e} (pip install 'lvopt[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
