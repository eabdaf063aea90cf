"""Build of lvopt's native extension, lvopt._C.

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when this torch is a
CUDA build (torch.version.cuda) and an nvcc is found, unless LVOPT_NO_CUDA=1; the decision
never depends on the build machine having a GPU. Architectures come from LVOPT_CUDA_ARCHS
(default "80;90": SASS for sm_80 and sm_90, PTX embedded for the newest).

The extension binds to the torch it is compiled with, so the package's metadata names that
torch: install_requires pins ``torch==<this torch>``, and the version carries a local label
``+cu<CUDA>torch<torch>`` (``+cputorch<torch>`` without CUDA kernels), as xformers' and
flash-attention's wheels do. lvopt/_build.py (generated here, not in git) records the same for
lvopt at run time: the import error of an extension that does not load names both torches.
A wheel also carries the benchmark suite (benchmarks/*.py as lvopt/_bench/) for `lvopt bench`.
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

CXX_FLAGS = [
    "-O3",
    "-std=c++20",
    "-fopenmp",
    # Same bits on every ISA level (csrc/cpu/isa.h): no a*b+c contraction into FMA.
    "-ffp-contract=off",
    # sqrtf without errno lets the loops vectorise; no other fast-math relaxation.
    "-fno-math-errno",
]


def _cuda_archs():
    archs = [a.strip() for a in os.environ.get("LVOPT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    return [a for a in archs if a]


def _nvcc_gencode(archs):
    flags = []
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    newest = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit())))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _want_cuda():
    if os.environ.get("LVOPT_NO_CUDA", "0") == "1":
        return False, "LVOPT_NO_CUDA=1"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return False, "no CUDA sources"
    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found"
    if not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension locates the toolkit (headers, libcudart to link) from
        # CUDA_HOME; point it at nvcc's. An nvcc installed on its own (e.g. /usr/local/bin/nvcc,
        # finding its toolkit through nvcc.profile) has no libraries beside it: then the
        # conventional /usr/local/cuda.
        candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
        homes = [h for h in candidates if _has_cudart(h)]
        os.environ["CUDA_HOME"] = homes[0] if homes else candidates[0]
    # torch.utils.cpp_extension read CUDA_HOME when this file imported it (its own guess from
    # nvcc's directory, which misses libcudart here); give it the toolkit chosen above.
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    return True, nvcc


def _has_cudart(home):
    return any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib"))


def extensions():
    sources = ["csrc/module.cpp", "csrc/register.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    with_cuda, why = _want_cuda()
    if with_cuda:
        archs = _cuda_archs()
        cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        print(f"lvopt: building CUDA kernels for sm_{', sm_'.join(archs)} with {why}")
        return [
            CUDAExtension(
                "lvopt._C",
                sources + cu_sources,
                include_dirs=include_dirs,
                define_macros=[("LVOPT_WITH_CUDA", None), ("LVOPT_CUDA_ARCHS", f'"{";".join(archs)}"')],
                # -fmad=false: no a*b+c contraction, as -ffp-contract=off on the CPU, so
                # that the shared math.h computes the same bits on the GPU.
                extra_compile_args={
                    "cxx": CXX_FLAGS,
                    "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-fmad=false"] + _nvcc_gencode(archs),
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    print(f"lvopt: building CPU kernels only ({why})")
    return [
        CppExtension(
            "lvopt._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]


def _base_version():
    with open(os.path.join(ROOT, "lvopt", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


TORCH_VERSION = torch.__version__.split("+")[0]  # "2.14.1" of "2.14.1+cu130"
EXTENSIONS = extensions()
WITH_CUDA = any(isinstance(e.sources, list) and any(s.endswith(".cu") for s in e.sources) for e in EXTENSIONS)
CUDA_TAG = "cu" + torch.version.cuda.replace(".", "") if WITH_CUDA else "cpu"
VERSION = f"{_base_version()}+{CUDA_TAG}torch{TORCH_VERSION}"


def _write_build_record():
    text = (
        '"""Written by setup.py when lvopt._C was built (not in git): what it was built for."""\n'
        f"VERSION = {VERSION!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if WITH_CUDA else None)!r}\n"
    )
    path = os.path.join(ROOT, "lvopt", "_build.py")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # rewriting an unchanged file would only bump its mtime
        with open(path, "w") as f:
            f.write(text)


_write_build_record()


class BuildPyWithBench(build_py):
    """build_py that also copies the benchmark suite (benchmarks/*.py) into the built package as
    lvopt/_bench/, where an installed `lvopt bench` finds it (lvopt/bench.py, suite_dir). An
    editable install runs from the checkout and reads benchmarks/ itself."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = os.path.join(self.build_lib, "lvopt", "_bench")
        self.mkpath(dest)
        for src in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))):
            self.copy_file(src, os.path.join(dest, os.path.basename(src)))


setup(
    name="lvopt",
    version=VERSION,
    description="Fused AdamW/AdamH with sparse embedding rows and the large-vocabulary LR rule",
    packages=find_packages(include=["lvopt", "lvopt.*"]),
    python_requires=">=3.9",
    # The torch the extension was compiled against: its C++ symbols are what lvopt._C binds to.
    install_requires=[f"torch=={TORCH_VERSION}"],
    extras_require={"bench": ["matplotlib", "tqdm"]},
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithBench},
    entry_points={"console_scripts": ["lvopt=lvopt.__main__:main"]},
)
