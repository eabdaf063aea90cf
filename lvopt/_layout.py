"""The layout every backend shares, mirrored from the native headers: the one place the Python
side (the optimizer, the reference, the Triton kernels' host code, the tests) takes it from.

Each block names the C++ declaration it mirrors; tests/test_layout.py parses the headers and
checks that every value here equals its C++ counterpart, so a change on one side fails there.
"""

from __future__ import annotations

# Columns of one row of the per-tensor hyperparameter table (float64, [n_tensors, HYPER_COLS]):
# csrc/include/lvopt/math.h, enum HyperCol (kLr .. kMaximize, kHyperCols). MAXIMIZE is 1.0 or 0.0.
LR, BETA1, BETA2, WEIGHT_DECAY, EPS, MAXIMIZE = 0, 1, 2, 3, 4, 5
HYPER_COLS = 6

# Columns of the per-step history table of an exact-mode sparse parameter (float64,
# [steps, HIST_COLS], built by lvopt/sparse.py RowClock): csrc/include/lvopt/math.h, enum HistCol
# (kHLr .. kHSeries, kHistSeries, kHistCols). The HIST_SERIES series columns start at H_SERIES.
H_LR, H_DECAY, H_LOGPI, H_U, H_SQRTBC2, H_SERIES = 0, 1, 2, 3, 4, 5
HIST_SERIES = 8
HIST_COLS = 13

# Where the catch-up's four-term series serve (e*a_max <= 1/SERIES_LIMIT forward, e*a_min >=
# SERIES_LIMIT reversed): csrc/include/lvopt/sparse_clock.h, kSeriesLimit.
SERIES_LIMIT = 1e2

# Codes of the sparse ops' error word ({code, min id, max id}, int64 [3]):
# csrc/include/lvopt/sparse_args.h, kErrIds and kErrClock.
ERR_IDS, ERR_CLOCK = 1, 2

# Bits of the sparse ops' ``flags`` argument: csrc/include/lvopt/sparse_args.h, kFlagCoalesced
# and kFlagRing. SPARSE_COALESCED: the ids are sorted and distinct (the GPU ops skip their sort);
# SPARSE_RING: ``hist`` is a RingClock's device ring, appended to by the step op.
SPARSE_COALESCED, SPARSE_RING = 1, 2

# Python name -> (header under csrc/include/lvopt/, C++ name), for tests/test_layout.py.
CPP_NAMES = {
    "LR": ("math.h", "kLr"),
    "BETA1": ("math.h", "kBeta1"),
    "BETA2": ("math.h", "kBeta2"),
    "WEIGHT_DECAY": ("math.h", "kWeightDecay"),
    "EPS": ("math.h", "kEps"),
    "MAXIMIZE": ("math.h", "kMaximize"),
    "HYPER_COLS": ("math.h", "kHyperCols"),
    "H_LR": ("math.h", "kHLr"),
    "H_DECAY": ("math.h", "kHDecay"),
    "H_LOGPI": ("math.h", "kHLogPi"),
    "H_U": ("math.h", "kHU"),
    "H_SQRTBC2": ("math.h", "kHSqrtBc2"),
    "H_SERIES": ("math.h", "kHSeries"),
    "HIST_SERIES": ("math.h", "kHistSeries"),
    "HIST_COLS": ("math.h", "kHistCols"),
    "SERIES_LIMIT": ("sparse_clock.h", "kSeriesLimit"),
    "ERR_IDS": ("sparse_args.h", "kErrIds"),
    "ERR_CLOCK": ("sparse_args.h", "kErrClock"),
    "SPARSE_COALESCED": ("sparse_args.h", "kFlagCoalesced"),
    "SPARSE_RING": ("sparse_args.h", "kFlagRing"),
}
