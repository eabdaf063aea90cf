"""Loads the native extension (which registers the ``lvopt::*`` ops) and the ops' fake kernels.

The fake kernels let ``torch.compile`` and ``torch.library.opcheck`` trace the ops: the step
ops mutate their inputs in place and the only new tensor is AdamH's ``[n, 3]`` fp64 stats (fused_adamh_ and fused_adamh_reduce_).
"""

from __future__ import annotations

import os
import warnings

import torch


def built_for() -> dict:
    """What lvopt._C was built for (lvopt/_build.py, written by setup.py): version, torch, CUDA.
    Empty when this source tree was not built by setup.py."""
    try:
        from . import _build
    except ImportError:
        return {}
    return dict(version=_build.VERSION, torch=_build.TORCH_VERSION, cuda=_build.CUDA_VERSION)


def native_error_message(e: BaseException, built: dict) -> str:
    """The load error of lvopt._C with both torches named: the extension binds to the torch it
    was compiled with, and a different one is the usual reason it does not load."""
    want = built.get("torch") or "unknown (lvopt/_build.py is missing: not built by setup.py)"
    msg = f"{type(e).__name__}: {e}; lvopt {built.get('version', '')} was built for torch {want}, this is torch {torch.__version__}"
    if built.get("torch") and built["torch"] != torch.__version__:
        msg += (
            f": install torch=={built['torch'].split('+')[0]} (the wheel's requirement), or rebuild lvopt "
            f"against this torch (make dev, or pip install --no-build-isolation .)"
        )
    return msg


try:
    from . import _C  # noqa: F401  (registers torch.ops.lvopt.*)

    NATIVE_ERROR: str | None = None
except ImportError as e:  # reported by build_info() and by backend selection
    _C = None
    NATIVE_ERROR = native_error_message(e, built_for())


def native_available() -> bool:
    return _C is not None


CPU_ISA_LEVELS = ("baseline", "avx2", "avx512")


def check_cpu_isa_env() -> str | None:
    """The CPU kernels clamp ``LVOPT_CPU_ISA`` to what the hardware has and ignore an unknown
    value (csrc/cpu/isa.cpp); say so instead of running another level silently. Returns the
    warning's text (None when the level asked for is the one in use)."""
    want = os.environ.get("LVOPT_CPU_ISA", "")
    if not want or _C is None:
        return None
    info = _C.build_info()
    active = info["cpu_isa_active"]
    if want not in CPU_ISA_LEVELS:
        msg = f"LVOPT_CPU_ISA={want!r} is not one of {', '.join(CPU_ISA_LEVELS)}: ignored"
    elif want != active:
        msg = (
            f"LVOPT_CPU_ISA={want!r} asks for more than this build and CPU offer (compiled: "
            f"{info['cpu_isa_compiled']}; hardware: {info['cpu_isa_hardware']})"
        )
    else:
        return None
    msg = f"lvopt: {msg}; the CPU kernels use {active!r} (every level computes the same bits)"
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return msg


check_cpu_isa_env()


if _C is not None:

    @torch.library.register_fake("lvopt::fused_adamw_")
    def _fused_adamw_fake(
        params, grads, exp_avgs, exp_avg_sqs, steps, hyper, found_inf=None, stats=None, max_exp_avg_sqs=None
    ):
        return None

    @torch.library.register_fake("lvopt::nonfinite_scan_")
    def _nonfinite_scan_fake(tensors, found_inf):
        return None

    @torch.library.register_fake("lvopt::fused_adamh_")
    def _fused_adamh_fake(params, grads, exp_avgs, exp_avg_sqs, steps, radii, hyper, found_inf=None):
        # On the parameters' device: the CUDA kernel returns device stats (reading them back
        # would synchronise), whichever device the hyper table is on.
        if params:
            return params[0].new_empty((len(params), 3), dtype=torch.float64)
        return hyper.new_empty((0, 3))

    @torch.library.register_fake("lvopt::fused_adamh_reduce_")
    def _fused_adamh_reduce_fake(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, found_inf=None):
        if params:
            return params[0].new_empty((len(params), 3), dtype=torch.float64)
        return hyper.new_empty((0, 3))

    @torch.library.register_fake("lvopt::fused_adamh_apply_")
    def _fused_adamh_apply_fake(params, exp_avgs, exp_avg_sqs, steps, radii, hyper, sums, found_inf=None):
        return None

    @torch.library.register_fake("lvopt::coalesce_rows")
    def _coalesce_rows_fake(indices, values, num_rows):
        # The number of distinct rows depends on the data.
        u = torch.library.get_ctx().new_dynamic_size()
        return indices.new_empty((u,)), values.new_empty((u, values.shape[1]))

    @torch.library.register_fake("lvopt::sparse_adamw_")
    def _sparse_adamw_fake(
        param,
        indices,
        values,
        exp_avg,
        exp_avg_sq,
        step,
        last_step,
        hist,
        qpow,
        hyper,
        hist_base,
        epoch,
        window,
        exact,
        stats=None,
        error=None,
        flags=0,
    ):
        return None

    @torch.library.register_fake("lvopt::sparse_catchup_")
    def _sparse_catchup_fake(
        param,
        indices,
        exp_avg,
        exp_avg_sq,
        step,
        last_step,
        hist,
        qpow,
        hyper,
        hist_base,
        epoch,
        window,
        error=None,
        flags=0,
    ):
        return None
