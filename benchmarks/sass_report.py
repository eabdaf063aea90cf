"""Static evidence for lvopt's GPU kernels without a GPU (docs/design.md section 4).

Compiles the sm_90 builds of the CUDA kernels (the cubins inside the CUDA-built lvopt._C, or
`nvcc -cubin` of csrc/cuda/*.cu when the extension was built without CUDA) and of the Triton
kernels (triton.compile with GPUTarget("cuda", 90, 32)), disassembles them with cuobjdump
(shipped with Triton) and reports per kernel: 128-bit global loads/stores (LDG.E.128 /
STG.E.128) on the streaming kernels, local-memory traffic (LDL/STL: spills, 0 expected),
registers, and the occupancy those registers allow; then the H100 time the byte count
predicts.

    python benchmarks/sass_report.py            # print the report
    python benchmarks/sass_report.py --write    # and (re)write its section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## GPU static evidence (sm_90)"
H100_BW = 3.35e12  # H100 SXM HBM3, bytes/s
ACHIEVABLE = 0.90  # fraction of peak a streaming kernel reaches
# Streaming kernels must move their data in 16-byte vectors; the others (per-tensor
# coefficients, AdamH's per-tensor finalize) touch a few bytes per tensor.
# Kernels that stream nothing: per-tensor / per-row scalars, reductions of partial sums, and
# loop_rows_kernel (exact sparse rows whose v needs the fp64 windowed loop, ~2e-5 of elements;
# scalar per element by design, its cost is the loop, not the bytes).
NON_STREAMING = (
    "advance_kernel",
    "finalize_kernel",
    "scales_kernel",
    "stats_kernel",
    "chunk_sums_kernel",
    "catchup_scalars_kernel",
    "loop_rows_kernel",
    # The sparse step's plan and control kernels (ids and counters, O(N) bytes: not
    # the rows' data), CUB's among them.
    "setup_kernel",
    "finish_kernel",
    "piece_table_kernel",
    "cub",
    "EmptyKernel",
)
# Streaming kernels that only read (the non-finite scans): 128-bit loads, no stores.
READ_ONLY = ("nonfinite_kernel", "scan_kernel")


def tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (neither in triton's package nor on PATH)")
    return found


def nvcc() -> str | None:
    return shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )


# --------------------------------------------------------------------------------------------
# Disassembly and per-kernel statistics.

# Names of the bool template parameters, per kernel family (in the order the kernel declares them).
_BOOL_PARAMS = {
    "sparse_rows_kernel": (("lazy", "exact"), ("catchup", "step"), ("", "track")),
    "loop_rows_kernel": (("catchup", "step"), ("", "track")),
    "adamw_kernel": (("", "track"), ("", "amsgrad")),
}


def _demangle_short(name: str) -> str:
    """adamw_kernel<float>, adamw_kernel<bf16,track> (template <T, bool kTrack>),
    sparse_rows_kernel<float,exact,step,track> (template <T, bool kExact, bool kStep, bool kTrack>)."""
    m = re.search(r"([a-z_]+_kernel)(?:I([ft])((?:Lb[01]E)*)E)?", name)
    if not m:
        return name
    args = [{"f": "float", "t": "bf16"}[m.group(2)]] if m.group(2) else []
    bools = re.findall(r"Lb([01])E", m.group(3) or "")
    names = _BOOL_PARAMS.get(m.group(1), (("", "track"),) * len(bools))
    args += [names[i][int(b)] for i, b in enumerate(bools) if names[i][int(b)]]
    return m.group(1) + (f"<{','.join(args)}>" if args else "")


def analyse_cubin(path: str, origin: str, arch: str = "sm_90") -> list[dict]:
    """Per-kernel statistics of a cubin (or of the sm_90 code inside a shared library)."""
    cuobjdump = tool("cuobjdump")
    args = ["-arch", arch] if path.endswith(".so") else []
    sass = subprocess.run([cuobjdump, "-sass", *args, path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", *args, path], capture_output=True, text=True, check=True).stdout
    usage = {}
    for fn, line in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", res):
        usage[fn] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
    kernels = []
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        # Opcodes, with or without a guard predicate (@P0, @!UPT, ...).
        ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", block)
        ldg = [i for i in ins if i.startswith("LDG")]
        stg = [i for i in ins if i.startswith("STG")]
        u = usage.get(name, {})
        kernels.append(
            dict(
                origin=origin,
                name=_demangle_short(name),
                mangled=name,
                ldg128=sum(".128" in i for i in ldg),
                stg128=sum(".128" in i for i in stg),
                ldg_other=sum(".128" not in i for i in ldg),
                stg_other=sum(".128" not in i for i in stg),
                ldl=sum(i.startswith("LDL") for i in ins),
                stl=sum(i.startswith("STL") for i in ins),
                regs=u.get("REG"),
                local=u.get("LOCAL", 0),
                stack=u.get("STACK", 0),
                shared=u.get("SHARED", 0),
                streaming=not any(s in name for s in NON_STREAMING),
            )
        )
    return kernels


def occupancy(regs: int, threads: int) -> float:
    """Resident warps / 64 on sm_90 as registers allow (65536 per SM, allocated per warp in
    units of 256, at most 32 blocks and 64 warps per SM)."""
    if not regs:
        return float("nan")
    per_warp = ((regs * 32 + 255) // 256) * 256
    warps_per_block = (threads + 31) // 32
    blocks = min(32, 65536 // (per_warp * warps_per_block))
    return min(64, blocks * warps_per_block) / 64


# --------------------------------------------------------------------------------------------
# The CUDA kernels.


def _extension_so() -> str | None:
    so = glob.glob(os.path.join(ROOT, "lvopt", "_C*.so"))
    if not so:
        return None
    try:
        out = subprocess.run([tool("cuobjdump"), "-lelf", so[0]], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return None
    return so[0] if "sm_90" in out else None


def cuda_cubins(workdir: str) -> tuple[list[str], str]:
    """sm_90 code of csrc/cuda: the built extension's if it has CUDA code, else nvcc -cubin."""
    so = _extension_so()
    if so:
        return [so], f"cuobjdump -sass -arch sm_90 {os.path.relpath(so, ROOT)} (the CUDA-built extension)"
    cc = nvcc()
    if not cc:
        raise FileNotFoundError("no nvcc and no CUDA-built lvopt._C")
    from torch.utils.cpp_extension import include_paths

    out = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        cubin = os.path.join(workdir, os.path.basename(src) + ".sm_90.cubin")
        # The flags of setup.py's CUDAExtension (torch's defaults plus ours), for sm_90 only.
        cmd = [
            cc,
            "-cubin",
            "-gencode=arch=compute_90,code=sm_90",
            "-O3",
            "-std=c++20",
            "-lineinfo",
            "-fmad=false",
            "--expt-relaxed-constexpr",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C",
            "-DLVOPT_WITH_CUDA",
            "-I" + os.path.join(ROOT, "csrc", "include"),
            "-I" + os.path.join(ROOT, "csrc"),
            *("-I" + p for p in include_paths()),
            "-o",
            cubin,
            src,
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        out.append(cubin)
    return out, "nvcc -cubin -gencode=arch=compute_90,code=sm_90 -O3 (setup.py's flags) csrc/cuda/*.cu"


# --------------------------------------------------------------------------------------------
# The Triton kernels.


def triton_cubins(workdir: str) -> list[tuple[str, str]]:
    import triton
    from triton.backends.compiler import GPUTarget

    from lvopt.triton import _common as C
    from lvopt.triton import _plan as P
    from lvopt.triton import fused_adamh as H
    from lvopt.triton import fused_adamw as W
    from lvopt.triton import sparse_rows as S

    target = GPUTarget("cuda", 90, 32)
    opts = {"num_warps": C.NUM_WARPS, "enable_fp_fusion": False}
    div16 = [["tt.divisibility", 16]]
    jobs = []
    for dt_name, dt in (("fp32", "fp32"), ("bf16", "bf16")):
        const = {
            "P_DTYPE": getattr(triton.language, {"fp32": "float32", "bf16": "bfloat16"}[dt]),
            "ALIGNED": True,
            "CHUNK": C.CHUNK,
            "BLOCK": C.BLOCK,
        }
        for track, ams in ((False, False), (True, False), (False, True)):
            c = {**const, "TRACK": track, "HAS_FOUND": False, "AMS": ams}
            label = f"adamw_kernel<{dt_name}{',track' if track else ''}{',amsgrad' if ams else ''}>"
            jobs.append(
                (
                    label,
                    W.adamw_kernel,
                    {
                        "meta_ptr": "*i64",
                        "coef_ptr": "*fp32",
                        "partial_ptr": "*fp64",
                        "found_ptr": "*fp32",
                        "n_tensors": "i32",
                        **{k: "constexpr" for k in c},
                    },
                    c,
                    {(0,): div16, (1,): div16, (2,): div16, (3,): div16},
                )
            )
        hconst = {**const, "HAS_FOUND": False}
        jobs.append(
            (
                f"adamh_reduce_kernel<{dt_name}>",
                H.adamh_reduce_kernel,
                {
                    "meta_ptr": "*i64",
                    "coef_ptr": "*fp32",
                    "partial_ptr": "*fp64",
                    "found_ptr": "*fp32",
                    "n_tensors": "i32",
                    **{k: "constexpr" for k in hconst},
                },
                hconst,
                {(0,): div16, (1,): div16, (2,): div16, (3,): div16},
            )
        )
        jobs.append(
            (
                f"adamh_apply_kernel<{dt_name}>",
                H.adamh_apply_kernel,
                {
                    "meta_ptr": "*i64",
                    "coef_ptr": "*fp32",
                    "scale_ptr": "*fp32",
                    "found_ptr": "*fp32",
                    "n_tensors": "i32",
                    **{k: "constexpr" for k in hconst},
                },
                hconst,
                {(0,): div16, (1,): div16, (2,): div16, (3,): div16},
            )
        )
    jobs.append(
        (
            "adamh_finalize_kernel",
            H.adamh_finalize_kernel,
            {
                "partial_ptr": "*fp64",
                "chunks_ptr": "*i64",
                "hyper_ptr": "*fp64",
                "radius_ptr": "*i64",
                "stats_ptr": "*fp64",
                "scale_ptr": "*fp32",
                "RB": "constexpr",
                "RADIUS_TABLE": "constexpr",
            },
            {"RB": H.REDUCE_BLOCK, "RADIUS_TABLE": True},
            {},
        )
    )
    jobs.append(
        (
            "adamh_scales_kernel",
            H.adamh_scales_kernel,
            {
                "sums_ptr": "*fp64",
                "hyper_ptr": "*fp64",
                "radius_ptr": "*i64",
                "scale_ptr": "*fp32",
                "RADIUS_TABLE": "constexpr",
            },
            {"RADIUS_TABLE": True},
            {},
        )
    )
    # The per-step setup (counters and coefficients, SETUP_BLOCK tensors a program) and the
    # non-finite scan over a launch table (nonfinite="skip"/"raise").
    for step64 in (False, True):
        c = {"UNIT_STEP": False, "STEP64": step64, "HAS_FOUND": True, "RB": P.SETUP_BLOCK, "ADVANCE": True}
        jobs.append(
            (
                f"adam_setup_kernel<{'fp64' if step64 else 'fp32'} steps>",
                P.adam_setup_kernel,
                {
                    "steps_ptr": "*i64",
                    "hyper_ptr": "*fp64",
                    "coef_ptr": "*fp32",
                    "found_ptr": "*fp32",
                    "n": "i32",
                    **{k: "constexpr" for k in c},
                },
                c,
                {},
            )
        )
    for dt in ("fp32", "bf16"):
        c = {
            "P_DTYPE": getattr(triton.language, {"fp32": "float32", "bf16": "bfloat16"}[dt]),
            "ALIGNED": True,
            "CHUNK": C.CHUNK,
            "BLOCK": C.BLOCK,
        }
        jobs.append(
            (
                f"nonfinite_scan_kernel<{dt}>",
                P.nonfinite_scan_kernel,
                {"meta_ptr": "*i64", "found_ptr": "*fp32", "n_tensors": "i32", **{k: "constexpr" for k in c}},
                c,
                {(0,): div16},
            )
        )
    # Sparse embedding rows: one program per distinct row, 1024-wide tiles of rows whose width
    # is a multiple of 16 bytes (ALIGNED: what a 768-wide fp32/bf16 table gets).
    for dt in ("fp32", "bf16"):
        for name, c in (
            ("sparse_adamw_kernel", dict(HAS_GRAD=True, EXACT=False, TRACK=False)),
            ("sparse_adamw_kernel<exact,track>", dict(HAS_GRAD=True, EXACT=True, TRACK=True)),
            ("sparse_catchup_kernel", dict(HAS_GRAD=False, EXACT=True, TRACK=False)),
        ):
            const = {
                **c,
                "ALIGNED": True,
                "DEFER": c["EXACT"],
                "LOOP_LIST": False,
                "SPLIT": c["HAS_GRAD"],
                "RUN": S.RUN,
                "BLOCK_D": 512 if c["EXACT"] else 1024,
                "RING": False,
            }
            label = name.replace("kernel", f"kernel<{dt}>") if "<" not in name else name.replace("<", f"<{dt},")
            jobs.append(
                (
                    label,
                    S.sparse_rows_kernel,
                    {
                        "p_ptr": f"*{dt}",
                        "m_ptr": "*fp32",
                        "v_ptr": "*fp32",
                        "vals_ptr": f"*{dt}",
                        "rows_ptr": "*i64",
                        "perm_ptr": "*i64",
                        "offsets_ptr": "*i64",
                        "num_runs_ptr": "*i64",
                        "err_ptr": "*i64",
                        "info_ptr": "*i64",
                        "coef_ptr": "*fp32",
                        "row_last_ptr": "*i64",
                        "last_ptr": "*i64",
                        "cr_ptr": "*fp32",
                        "hist_ptr": "*fp64",
                        "qpow_ptr": "*fp64",
                        "partial_ptr": "*fp64",
                        "part_ptr": "*fp32",
                        "part_start_ptr": "*i64",
                        "loop_ptr": "*i64",
                        "d": "i32",
                        "base": "i64",
                        "epoch": "i32",
                        "window": "i32",
                        "qcols": "i32",
                        "ring": "i64",
                        **{k: "constexpr" for k in const},
                    },
                    const,
                    {(0,): div16, (1,): div16, (2,): div16, (3,): div16},
                )
            )
        # The exact-loop rows (a launch of the same kernel over the rows the first listed).
        for track in (False, True):
            c = dict(
                HAS_GRAD=True,
                EXACT=True,
                TRACK=track,
                ALIGNED=False,
                DEFER=False,
                LOOP_LIST=True,
                SPLIT=True,
                RUN=S.RUN,
                BLOCK_D=256 if dt == "bf16" else 128,
                RING=False,
            )
            jobs.append(
                (
                    f"sparse_loop_rows_kernel<{dt}{',track' if track else ''}>",
                    S.sparse_rows_kernel,
                    {**jobs[-1][2], **{k: "constexpr" for k in c}},
                    c,
                    {},
                )
            )
        const = {"ALIGNED": True, "BLOCK_D": 1024}
        jobs.append(
            (
                f"coalesce_kernel<{dt}>",
                S.coalesce_kernel,
                {
                    "vals_ptr": f"*{dt}",
                    "perm_ptr": "*i64",
                    "offsets_ptr": "*i64",
                    "out_ptr": f"*{dt}",
                    "d": "i32",
                    **{k: "constexpr" for k in const},
                },
                const,
                {(0,): div16, (3,): div16},
            )
        )
    jobs.append(
        (
            "chunk_sums_kernel",
            W.chunk_sums_kernel,
            {"partial_ptr": "*fp64", "chunks_ptr": "*i64", "out_ptr": "*fp64", "COLS": "constexpr", "RB": "constexpr"},
            {"COLS": 2, "RB": W.REDUCE_BLOCK},
            {},
        )
    )
    out = []
    for label, fn, sig, const, attrs in jobs:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        compiled = triton.compile(src, target=target, options=opts)
        path = os.path.join(workdir, re.sub(r"\W", "_", label) + ".cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out.append((label, path))
    return out


# --------------------------------------------------------------------------------------------


def collect() -> tuple[list[dict], str]:
    kernels = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, how = cuda_cubins(tmp)
        for p in paths:
            for k in analyse_cubin(p, "CUDA"):
                k["threads"] = (
                    32
                    if ("finalize" in k["name"] or "stats_kernel" in k["name"])
                    else (128 if "advance" in k["name"] else 256)
                )
                kernels.append(k)
        for label, p in triton_cubins(tmp):
            for k in analyse_cubin(p, "Triton"):
                k["name"] = label
                k["streaming"] = not any(s in label for s in NON_STREAMING)
                k["threads"] = 128
                kernels.append(k)
    return kernels, how


def check(kernels: list[dict]) -> list[str]:
    """What is wrong with the SASS: spills anywhere, streaming kernels without 128-bit access."""
    bad = []
    for k in kernels:
        where = f"{k['origin']} {k['name']}"
        if k["ldl"] or k["stl"] or k["local"]:
            bad.append(f"{where}: local memory (LDL {k['ldl']}, STL {k['stl']}, LOCAL {k['local']} B)")
        read_only = any(s in k["name"] for s in READ_ONLY)
        if k["streaming"] and read_only and not k["ldg128"]:
            bad.append(f"{where}: no 128-bit global loads (LDG.E.128 {k['ldg128']})")
        elif k["streaming"] and not read_only and not (k["ldg128"] and k["stg128"]):
            bad.append(f"{where}: no 128-bit global loads/stores (LDG.E.128 {k['ldg128']}, STG.E.128 {k['stg128']})")
    return bad


def gpt2_small_shapes() -> list[tuple]:
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _cuh_constant(name: str) -> int:
    text = open(os.path.join(ROOT, "csrc", "cuda", "multi_tensor.cuh")).read()
    return int(re.search(rf"constexpr int\w* {name} = (\d+);", text).group(1))


def predictions() -> list[tuple[str, int, float, int]]:
    """(case, bytes, predicted ms, CUDA launches) from docs/design.md section 4's byte counts."""
    from math import ceil, prod

    TENSORS_PER_LAUNCH = _cuh_constant("kTensorsPerLaunch")
    ADVANCE_PER_LAUNCH = _cuh_constant("kAdvancePerLaunch")
    n64 = 64 * 2**20
    g2 = gpt2_small_shapes()
    n_g2 = sum(prod(s) for s in g2)
    mats = [s for s in g2 if len(s) >= 2]
    n_mats = sum(prod(s) for s in mats)
    bw = H100_BW * ACHIEVABLE
    rows = []

    def add(case, nbytes, tensors, kernels_per_tensor_batch, fixed):
        launches = (
            ceil(tensors / ADVANCE_PER_LAUNCH) + kernels_per_tensor_batch * ceil(tensors / TENSORS_PER_LAUNCH) + fixed
        )
        rows.append((case, nbytes, nbytes / bw * 1e3, launches))

    add("AdamW fp32, one 64M-element tensor (28 B/param)", 28 * n64, 1, 1, 0)
    add("AdamW bf16 params+grads, fp32 moments, 64M (22 B/param)", 22 * n64, 1, 1, 0)
    add(f"AdamW fp32, GPT-2 small ({len(g2)} tensors, {n_g2 / 1e6:.1f}M params)", 28 * n_g2, len(g2), 1, 0)
    add("AdamW bf16, GPT-2 small", 22 * n_g2, len(g2), 1, 0)
    add(
        f"AdamH fp32, GPT-2 small matrices ({len(mats)} tensors, {n_mats / 1e6:.1f}M params, 40 B/param)",
        40 * n_mats,
        len(mats),
        2,
        1,
    )
    # Sparse rows (issue 3's case): V = 262,144, d = 1,024 fp32, N = 16,384 Zipf(1.1) ids with
    # U = 5,030 distinct rows: the N gradient rows read plus p, m, v of the U rows read and
    # written (4*N*d + 24*U*d); exact mode's first read of a behind row's v hits the cache when
    # the update reads it again. Launches (csrc/cuda/sparse_rows.cu's header, none sized by the
    # data, no host synchronisation): aminmax, setup, arange, CUB radix sort (~4 kernels for 18
    # key bits), memset, CUB run-length encoding (2), CUB exclusive sum (2), piece table, partial
    # sums, [exact: catch-up scalars], row kernel, [exact: loop rows], finish: 16 lazy, 18 exact,
    # each a few microseconds of latency that the byte time does not count (docs/sparse-rows.md
    # predicts ~0.10 ms lazy and ~0.12 ms exact in all). lvopt.nn.Embedding on a GPU hands the
    # raw ids to the step, so the merged row is for the CPU path's gradient or a coalesce()d one:
    # its ids are flagged coalesced, and the plan is two aranges and a fill instead of the sort,
    # encoding, scan and piece table (8 launches lazy). A capturable exact step (RingClock) adds
    # the sweep's slice of ceil(V / 2000) = 132 rows: five small torch ops for its ids and one
    # coalesced catch-up (aminmax, setup, 2 aranges, fill, scalars, rows, loop rows: 8), and up
    # to 24 B per element of those rows when they are behind.
    N, U, d = 16384, 5030, 1024
    rows.append(
        (
            "Sparse rows lazy, V=262,144 d=1,024, 16,384 Zipf ids (5,030 distinct), raw COO grad",
            4 * N * d + 24 * U * d,
            (4 * N * d + 24 * U * d) / bw * 1e3,
            16,
        )
    )
    rows.append(("Sparse rows exact, same batch", 4 * N * d + 24 * U * d, (4 * N * d + 24 * U * d) / bw * 1e3, 18))
    rows.append(("Sparse rows, a coalesced (merged) grad (28*U*d)", 28 * U * d, 28 * U * d / bw * 1e3, 8))
    slice_bytes = 24 * 132 * d
    rows.append(
        (
            "Sparse rows exact, capturable (+ the sweep's slice, at most)",
            4 * N * d + 24 * U * d + slice_bytes,
            (4 * N * d + 24 * U * d + slice_bytes) / bw * 1e3,
            18 + 5 + 8,
        )
    )
    return rows


def render(kernels: list[dict], how: str) -> str:
    lines = [
        SECTION,
        "",
        "Generated by `python benchmarks/sass_report.py --write` (no GPU needed): sm_90 SASS of the CUDA "
        f"kernels from {how}, and of the Triton kernels from `triton.compile(..., "
        'target=GPUTarget("cuda", 90, 32))` (num_warps 4, enable_fp_fusion=False, 16-byte aligned '
        "launch), disassembled with Triton's cuobjdump. `tests/test_sass.py` asserts the same in CI.",
        "",
        "| backend | kernel | LDG.E.128 | STG.E.128 | other LDG/STG | LDL/STL (spills) | registers | "
        "threads/block | occupancy (regs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        occ = occupancy(k["regs"], k["threads"])
        lines.append(
            f"| {k['origin']} | `{k['name']}` | {k['ldg128']} | {k['stg128']} | "
            f"{k['ldg_other']}/{k['stg_other']} | {k['ldl']}/{k['stl']} | {k['regs']} | "
            f"{k['threads']} | {occ:.0%} |"
        )
    bad = check(kernels)
    lines += [
        "",
        "Verdict: "
        + (
            "all streaming kernels use 128-bit global loads and stores; no kernel touches local memory."
            if not bad
            else "PROBLEMS: " + "; ".join(bad)
        ),
        "",
        '"Other LDG/STG" are the per-tensor metadata and coefficient loads and the scalar tail / '
        "misaligned-tensor loops (n not a multiple of the vector width), not the hot loop.",
        "",
        f"Predicted H100 SXM time from bytes moved: {H100_BW / 1e12:.2f} TB/s HBM3 at "
        f"{ACHIEVABLE:.0%} achievable = {H100_BW * ACHIEVABLE / 1e12:.2f} TB/s (docs/design.md section 4). "
        "Launches: the CUDA op's kernel launches (the step-counter/coefficient kernel, then one per "
        "64 tensors of a dtype; AdamH two passes plus the per-tensor finalize); each adds a few "
        "microseconds of launch latency not counted in the byte time.",
        "",
        "| case | bytes | predicted time | CUDA launches |",
        "|---|---|---|---|",
    ]
    for case, nbytes, ms, launches in predictions():
        lines.append(f"| {case} | {nbytes / 1e9:.3f} GB | {ms:.3f} ms | {launches} |")
    lines += [
        "",
        "Measured GPU times: pending a GPU (`python -m lvopt bench --device cuda`, benchmarks/bench_gpu.py).",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: str = os.path.join(ROOT, "benchmarks", "RESULTS.md")) -> None:
    """Replaces this report's section of RESULTS.md (or appends it), leaving the others."""
    old = open(path).read() if os.path.exists(path) else "# lvopt benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("" if nxt < 0 else "\n" + old[nxt + 1 :])
    with open(path, "w") as f:
        f.write(new.rstrip("\n") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="(re)write the section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    kernels, how = collect()
    text = render(kernels, how)
    print(text)
    if args.write:
        write_section(text)
    return 1 if check(kernels) else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
