"""Loads the native extension (which registers the ``lvopt::*`` ops) and the ops' fake kernels.

The fake kernels let ``torch.compile`` and ``torch.library.opcheck`` trace the ops: the step
ops mutate their inputs in place and the only new tensor is AdamH's ``[n, 3]`` fp64 stats.
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.lvopt.*)

    NATIVE_ERROR: str | None = None
except ImportError as e:  # reported by build_info() and by backend selection
    _C = None
    NATIVE_ERROR = f"{type(e).__name__}: {e}"


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
        msg = (f"LVOPT_CPU_ISA={want!r} asks for more than this build and CPU offer (compiled: "
               f"{info['cpu_isa_compiled']}; hardware: {info['cpu_isa_hardware']})")
    else:
        return None
    msg = f"lvopt: {msg}; the CPU kernels use {active!r} (every level computes the same bits)"
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return msg


check_cpu_isa_env()


if _C is not None:

    @torch.library.register_fake("lvopt::fused_adamw_")
    def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, found_inf=None, stats=None):
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

    @torch.library.register_fake("lvopt::coalesce_rows")
    def _coalesce_rows_fake(indices, values, num_rows):
        # The number of distinct rows depends on the data.
        u = torch.library.get_ctx().new_dynamic_size()
        return indices.new_empty((u,)), values.new_empty((u, values.shape[1]))

    @torch.library.register_fake("lvopt::sparse_adamw_")
    def _sparse_adamw_fake(param, indices, values, exp_avg, exp_avg_sq, step, last_step, hist, qpow, hyper,
                           hist_base, epoch, window, exact, stats=None):
        return None

    @torch.library.register_fake("lvopt::sparse_catchup_")
    def _sparse_catchup_fake(param, indices, exp_avg, exp_avg_sq, step, last_step, hist, qpow, hyper,
                             hist_base, epoch, window):
        return None
