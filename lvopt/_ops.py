"""Loads the native extension (which registers the ``lvopt::*`` ops) and the ops' fake kernels.

The fake kernels let ``torch.compile`` and ``torch.library.opcheck`` trace the ops: the step
ops mutate their inputs in place and the only new tensor is AdamH's ``[n, 3]`` fp64 stats.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.lvopt.*)

    NATIVE_ERROR: str | None = None
except ImportError as e:  # reported by build_info() and by backend selection
    _C = None
    NATIVE_ERROR = f"{type(e).__name__}: {e}"


def native_available() -> bool:
    return _C is not None


if _C is not None:

    @torch.library.register_fake("lvopt::fused_adamw_")
    def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, found_inf=None, stats=None,
                          max_exp_avg_sqs=None):
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
