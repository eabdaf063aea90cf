"""CI: the CUDA wheel that `make wheel` built installs and imports outside the source tree.

Installs dist/lvopt-*.whl (the newest) into a throw-away directory and, from another working
directory with only that directory on PYTHONPATH, checks that: the installed copy is the one
imported; the extension was compiled with CUDA for the architectures setup.py was asked for;
every lvopt op has a CPU kernel and the GPU ops a CUDA kernel registered; the sm_90 code is in
the shared library (cuobjdump, shipped with Triton); a CPU step runs.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import glob, os, subprocess, sys
import torch
import lvopt

target = sys.argv[1]
assert lvopt.__file__.startswith(target), f"imported {lvopt.__file__}, not the installed wheel in {target}"
info = lvopt.build_info()
assert info["native"], info["native_error"]
assert info["cuda"], "the wheel's extension was built without CUDA"
assert "90" in info["cuda_archs"] and "80" in info["cuda_archs"], info["cuda_archs"]
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
    assert "sm_90" in elf and "sm_80" in elf, elf
p = torch.nn.Parameter(torch.randn(1000))
p.grad = torch.randn(1000)
lvopt.AdamW([p], lr=1e-3).step()
print(f"wheel OK: {lvopt.__file__}; CUDA archs {info['cuda_archs']}; CUDA kernels for {', '.join(cuda_ops)}")
"""


def main() -> int:
    wheels = sorted(glob.glob(os.path.join(ROOT, "dist", "lvopt-*.whl")), key=os.path.getmtime)
    if not wheels:
        print("no dist/lvopt-*.whl: run `make wheel` first", file=sys.stderr)
        return 1
    wheel = wheels[-1]
    with tempfile.TemporaryDirectory() as target, tempfile.TemporaryDirectory() as cwd:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
                       check=True)
        env = dict(os.environ, PYTHONPATH=target)
        out = subprocess.run([sys.executable, "-c", CHECK, target], cwd=cwd, env=env, capture_output=True, text=True)
        sys.stdout.write(out.stdout)
        if out.returncode:
            sys.stderr.write(out.stderr)
            print(f"{os.path.basename(wheel)}: FAILED", file=sys.stderr)
            return 1
    print(f"{os.path.basename(wheel)}: installs and imports outside the source tree")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
