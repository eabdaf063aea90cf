"""lvopt: fused AdamW/AdamH for PyTorch with sparse embedding rows and the large-vocabulary
(LV) embedding learning-rate rule. See README.md and DESIGN.md."""
__version__ = "0.1.0"

from . import _ops  # noqa: F401  (loads lvopt._C: registers torch.ops.lvopt.*)
from . import reference
from ._backend import BACKENDS, build_info
from .optim import AdamH, AdamW

__all__ = ["AdamW", "AdamH", "build_info", "reference", "BACKENDS", "__version__"]
