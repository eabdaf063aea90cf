"""benchmarks/sanitize_gpu.sh, its machine-independent part: it exits 0 with a clear message
where there is no GPU or no compute-sanitizer, and it reads compute-sanitizer's reports right
(a stand-in compute-sanitizer prints what the real one prints: per-process "ERROR SUMMARY"
lines, racecheck's "RACECHECK SUMMARY", or nothing when the run dies). The real run needs a
GPU: bash benchmarks/sanitize_gpu.sh on a GPU machine (results in benchmarks/RESULTS.md)."""

import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "sanitize_gpu.sh")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bash script for the Linux GPU machines")

# Stand-in compute-sanitizer: writes the report FAKE_REPORT_<tool> (a file) to --log-file, or
# nothing for a tool without one (a crash), and prints what pytest would.
FAKE = r"""#!/usr/bin/env bash
tool=memcheck log=/dev/stdout
while [[ $# -gt 0 ]]; do
  case $1 in
    --tool) tool=$2; shift 2 ;;
    --log-file) log=$2; shift 2 ;;
    --kernel-name|--racecheck-report|--target-processes) echo "$1 $2" >> "$FAKE_ARGS"; shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "$tool $*" >> "$FAKE_ARGS"
var=FAKE_REPORT_$tool
if [[ -n ${!var:-} ]]; then cat "${!var}" > "$log"; fi
echo "3 passed in 0.01s"
exit ${FAKE_RC:-0}
"""

CLEAN = "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"
MEMCHECK_ERRORS = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at lvopt::cuda::(anonymous namespace)::adamw_kernel+0x1a0
=========     by thread (255,0,0) in block (3,0,0)
========= Invalid __global__ write of size 2 bytes
=========     at lvopt::cuda::(anonymous namespace)::sparse_rows_kernel+0x80
========= ERROR SUMMARY: 2 errors
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
========= ERROR SUMMARY: 1 error
"""
RACECHECK = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at 0x150 in lvopt::cuda::reduce
========= Warning: Race reported between Read access at 0x90 in lvopt::cuda::reduce
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
========= ERROR SUMMARY: 1 error
"""


def run(tmp_path, env_extra, *tools):
    env = dict(os.environ, OUT=str(tmp_path / "out"), **env_extra)
    out = subprocess.run(["bash", SCRIPT, *tools], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "out" / "sanitizer" / "summary.txt").read_text()
    return out.returncode, out.stdout + out.stderr, summary


def fake_env(tmp_path, reports: dict, **extra):
    cs = tmp_path / "bin" / "compute-sanitizer"
    cs.parent.mkdir(exist_ok=True)
    cs.write_text(FAKE)
    cs.chmod(cs.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{cs.parent}:{os.environ['PATH']}",
        "SANITIZE_NO_GPU_CHECK": "1",
        "SANITIZE_FILES": "tests/test_cuda_kernels.py",
        "FAKE_ARGS": str(tmp_path / "args.txt"),
    }
    for tool, text in reports.items():
        p = tmp_path / f"{tool}.report"
        p.write_text(text)
        env[f"FAKE_REPORT_{tool}"] = str(p)
    env.update(extra)
    return env


def test_no_gpu_says_so_and_exits_0(tmp_path):
    rc, out, summary = run(tmp_path, {"CUDA_VISIBLE_DEVICES": "", "PY": sys.executable})
    assert rc == 0, out
    assert "no GPU" in summary and "skipped" in summary


def test_no_compute_sanitizer_says_so_and_exits_0(tmp_path):
    env = {"SANITIZE_NO_GPU_CHECK": "1", "PATH": "/usr/bin:/bin", "CUDA_HOME": str(tmp_path)}
    found = [
        p
        for p in (
            "/usr/bin/compute-sanitizer",
            "/bin/compute-sanitizer",
            "/usr/local/cuda/bin/compute-sanitizer",
            "/usr/local/cuda/compute-sanitizer/compute-sanitizer",
        )
        if os.path.exists(p)
    ]
    if found:
        pytest.skip(f"this machine has {found[0]}")
    rc, out, summary = run(tmp_path, env)
    assert rc == 0, out
    assert "no compute-sanitizer found" in summary


def test_reports_are_parsed(tmp_path):
    env = fake_env(
        tmp_path,
        {"memcheck": MEMCHECK_ERRORS, "racecheck": RACECHECK, "initcheck": CLEAN},
        SANITIZE_FILES="tests/test_cuda_kernels.py tests/test_sparse_rows.py",
    )
    rc, out, summary = run(tmp_path, env)
    assert rc == 1, out  # errors found
    lines = {line.split(":")[0]: line for line in summary.splitlines()}
    # two files, each report with 2 + 1 errors over two processes
    assert lines["memcheck"].startswith("memcheck: 6 errors [kernels: lvopt]"), summary
    assert "test_cuda_kernels: 3 errors, pytest rc=0 (3 passed in 0.01s)" in lines["memcheck"]
    assert lines["racecheck"].startswith("racecheck: 2 errors"), summary
    assert "test_sparse_rows: 1 errors, 1 warnings" in lines["racecheck"]
    assert lines["initcheck"].startswith("initcheck: 0 errors [kernels: lvopt]"), summary
    assert lines["synccheck"].startswith("synccheck: 0 errors + 2 reports without a summary"), summary
    assert "no ERROR SUMMARY in the report (rc=0)" in lines["synccheck"]
    args = (tmp_path / "args.txt").read_text()
    assert "--kernel-name kns=lvopt" in args and "--racecheck-report all" in args
    assert "-m pytest" in args and "tests/test_sparse_rows.py" in args
    logs = sorted(os.listdir(tmp_path / "out" / "sanitizer"))
    assert "memcheck_test_cuda_kernels.log" in logs and "synccheck_test_sparse_rows.pytest.log" in logs


def test_clean_run_exits_0_and_every_kernel_option(tmp_path):
    env = fake_env(tmp_path, {t: CLEAN for t in ("memcheck", "synccheck")}, SANITIZE_KERNELS="")
    rc, out, summary = run(tmp_path, env, "memcheck", "synccheck")
    assert rc == 0, out
    assert "memcheck: 0 errors [kernels: all]" in summary and "synccheck: 0 errors" in summary
    assert "racecheck" not in summary
    assert "--kernel-name" not in (tmp_path / "args.txt").read_text()


def test_unknown_tool_is_refused(tmp_path):
    rc, out, summary = run(tmp_path, {}, "leakcheck")
    assert rc == 2 and "unknown tool 'leakcheck'" in summary
