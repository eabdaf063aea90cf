"""lvopt: fused AdamW/AdamH for PyTorch with sparse embedding rows and the large-vocabulary
(LV) embedding learning-rate rule. See README.md and docs/design.md."""

from . import _ops  # noqa: F401  (loads lvopt._C: registers torch.ops.lvopt.*)
from ._version import __version__ as _base_version

# The built package's full version, with its +cu<CUDA>torch<torch> label (as torch.__version__
# carries its own), or lvopt/_version.py's for a source tree that setup.py has not built.
__version__ = _ops.built_for().get("version", _base_version)
from . import reference
from ._backend import BACKENDS, build_info, cpu_isa_levels, set_cpu_isa, set_cpu_workspace_limit
from ._validate import NONFINITE_POLICIES
from .optim import AdamH, AdamW, DenseEmbeddingGradWarning, NonFiniteGradientError
from . import checkpoint, nn, distributed, sparse, telemetry  # noqa: E402  (nn before distributed: it imports it)
from .checkpoint import CheckpointError  # noqa: E402

__all__ = [
    "AdamW",
    "AdamH",
    "CheckpointError",
    "DenseEmbeddingGradWarning",
    "NonFiniteGradientError",
    "NONFINITE_POLICIES",
    "checkpoint",
    "distributed",
    "telemetry",
    "nn",
    "sparse",
    "build_info",
    "cpu_isa_levels",
    "set_cpu_isa",
    "set_cpu_workspace_limit",
    "reference",
    "BACKENDS",
    "__version__",
]
from . import roles, scaling  # noqa: E402
from .roles import ROLES, TiedWeightsWarning, detect_roles  # noqa: E402
from .scaling import (
    RULES,
    ScalingPlan,
    apply_output_multiplier,
    lr_multipliers,
    model_width,  # noqa: E402
    mup_output_init_,
    scaling_plan,
)

__all__ += [
    "roles",
    "scaling",
    "ROLES",
    "RULES",
    "TiedWeightsWarning",
    "detect_roles",
    "ScalingPlan",
    "apply_output_multiplier",
    "lr_multipliers",
    "model_width",
    "mup_output_init_",
    "scaling_plan",
]
