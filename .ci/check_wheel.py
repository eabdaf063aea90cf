"""CI: the CUDA wheel that `make wheel` built installs and runs outside the source tree.

Installs dist/lvopt-*.whl (the newest) into a scratch virtual environment (its only other
packages are this environment's, through a .pth file: nothing is downloaded, and pip installs
the wheel *with* its dependencies from what is there, so its torch requirement must be met by
the torch it was built with) and, from another working directory, checks that: the installed
copy is the one imported; the wheel's metadata requires exactly this torch and its version
names CUDA and torch (+cu<CUDA>torch<torch>); the extension was compiled with CUDA for the
architectures setup.py was asked for; every lvopt op has a CPU kernel and the GPU ops a CUDA
kernel registered; the sm_90 code is in the shared library (cuobjdump, shipped with Triton); a
CPU step runs; the installed `lvopt bench --only adamw_1x` command runs on the benchmark suite
the wheel ships.
"""

from __future__ import annotations

import glob
import os
import site
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import glob, os, subprocess, sys
import torch
import lvopt

import importlib.metadata as md

target = sys.argv[1]
assert lvopt.__file__.startswith(target), f"imported {lvopt.__file__}, not the installed wheel in {target}"
info = lvopt.build_info()
torch_base = torch.__version__.split("+")[0]
cuda_tag = "cu" + torch.version.cuda.replace(".", "")
version = md.version("lvopt")
assert version.endswith(f"+{cuda_tag}torch{torch_base}"), f"wheel version {version} does not name {cuda_tag} and torch {torch_base}"
assert lvopt.__version__ == version, (lvopt.__version__, version)
assert info["built_for"] == dict(version=version, torch=torch.__version__, cuda=torch.version.cuda), info["built_for"]
requires = md.requires("lvopt")
assert f"torch=={torch_base}" in requires, f"wheel requires {requires}, not torch=={torch_base}"
assert info["native"], info["native_error"]
assert info["cuda"], "the wheel's extension was built without CUDA"
archs = sys.argv[2].split(";")  # what setup.py was asked for (LVOPT_CUDA_ARCHS, default 80;90)
assert set(archs) <= set(info["cuda_archs"]), (archs, info["cuda_archs"])
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = ["fused_adamw_", "fused_adamh_", "nonfinite_scan_", "coalesce_rows", "sparse_adamw_", "sparse_catchup_"]
for op in ops:
    assert has(f"lvopt::{op}", "CPU"), f"lvopt::{op} has no CPU kernel"
cuda_ops = [op for op in ops if has(f"lvopt::{op}", "CUDA")]
for op in ("fused_adamw_", "fused_adamh_", "nonfinite_scan_"):
    assert op in cuda_ops, f"lvopt::{op} has no CUDA kernel"
so = glob.glob(os.path.join(os.path.dirname(lvopt.__file__), "_C*.so"))[0]
import triton
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if os.path.exists(cuobjdump):
    elf = subprocess.run([cuobjdump, "-lelf", so], capture_output=True, text=True).stdout
    assert all(f"sm_{a}" in elf for a in archs), elf
p = torch.nn.Parameter(torch.randn(1000))
p.grad = torch.randn(1000)
lvopt.AdamW([p], lr=1e-3).step()
print(f"wheel OK: lvopt {version} requires {requires}; {lvopt.__file__}; CUDA archs {info['cuda_archs']}; "
      f"CUDA kernels for {', '.join(cuda_ops)}")
"""


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    sys.stdout.write(out.stdout)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"FAILED: {' '.join(cmd)}")
    return out.stdout


def main() -> int:
    wheels = sorted(glob.glob(os.path.join(ROOT, "dist", "lvopt-*.whl")), key=os.path.getmtime)
    if not wheels:
        print("no dist/lvopt-*.whl: run `make wheel` first", file=sys.stderr)
        return 1
    wheel = wheels[-1]
    with tempfile.TemporaryDirectory() as venv, tempfile.TemporaryDirectory() as cwd:
        # No pip or setuptools of its own: an old ensurepip setuptools would shadow this
        # environment's and fail torch's own requirements. This pip installs into it (--python).
        run([sys.executable, "-m", "venv", "--without-pip", venv])
        vpy = os.path.join(venv, "bin", "python")
        target = run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
        # This environment's packages (torch, triton, matplotlib, ...) behind the scratch one's.
        ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
        with open(os.path.join(target, "_lvopt_ci_base.pth"), "w") as f:
            f.write("\n".join(dict.fromkeys(ours)) + "\n")
        # With its dependencies, offline: torch==<the build's> must be satisfied by what is here.
        # (pip leaves the lvopt of this environment, outside the scratch one, untouched.)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                vpy,
                "install",
                "-q",
                "--no-index",
                "--no-build-isolation",
                wheel,
            ],
            cwd=cwd,
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        archs = ";".join(a for a in os.environ.get("LVOPT_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a)
        run([vpy, "-c", CHECK, target, archs], cwd=cwd, env=env)
        lvopt_cmd = os.path.join(venv, "bin", "lvopt")
        out = run(
            [
                lvopt_cmd,
                "bench",
                "--only",
                "adamw_1x",
                "--size",
                "small",
                "--rounds",
                "1",
                "--no-progress",
                "--out",
                os.path.join(cwd, "bench-out"),
            ],
            cwd=cwd,
            env=env,
        )
        assert "lvopt AdamW" in out and os.path.exists(os.path.join(cwd, "bench-out", "bench.json")), out
        suite = run([vpy, "-c", "from lvopt import bench; print(bench.suite_dir())"], cwd=cwd, env=env).strip()
        assert suite.startswith(target), f"lvopt bench used {suite}, not the suite the wheel ships"
    print(
        f"{os.path.basename(wheel)}: installs with its torch requirement met, imports and runs "
        f"`lvopt bench` outside the source tree"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
