"""Triton kernels of lvopt's ops (backend="triton"), one module per op family
(lvopt/triton/<op>.py), each exporting functions with the signatures of torch.ops.lvopt.<op>.

They are torch.library custom ops in the ``lvopt_triton`` namespace (torch.ops.lvopt_triton.*),
with fake kernels, so torch.compile traces them. On CPU tensors they run only under
TRITON_INTERPRET=1 (set before triton is imported), which is how they are tested without a GPU.
"""

from ._common import nonfinite_scan_  # torch reductions: any device, no synchronisation
from .fused_adamh import fused_adamh_, fused_adamh_apply_, fused_adamh_reduce_
from .fused_adamw import fused_adamw_
from .sparse_rows import coalesce_rows, sparse_adamw_, sparse_catchup_

__all__ = [
    "fused_adamw_",
    "fused_adamh_",
    "fused_adamh_reduce_",
    "fused_adamh_apply_",
    "nonfinite_scan_",
    "coalesce_rows",
    "sparse_adamw_",
    "sparse_catchup_",
]
