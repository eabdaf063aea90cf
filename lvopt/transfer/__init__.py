"""Hyperparameter transfer from LR sweeps: optimal learning rates, their scaling laws, and the
three transfer metrics. The formulas are in docs/transfer.md; this module is their reference.

Input is a sweep table, one training run per row (CSV, or a list of dicts / dict of columns):

=============  ========  ===================================================================
column         required  meaning
=============  ========  ===================================================================
``N``          yes       model size (parameters)
``D``          yes       training tokens
``seed``       yes       run seed (the bootstrap resamples seeds)
``loss``       yes       final loss; ``nan``/``inf`` (diverged) rows are dropped
``lr``         one LR    the swept base LR, or per-role ``lr_embedding``, ``lr_hidden``,
               column    ``lr_output``, ``lr_vector`` (the first present, in that order
                         after ``lr``, is the swept one unless ``lr_col`` says otherwise)
``eff_lr``     no        effective LR recorded by telemetry, ||dW||/||W|| (or
                         ``eff_lr_<role>``): fits are repeated with it as the x variable
``param``      no        parametrization name (``mup``, ``lv``, ``sp``...); default
                         ``default``. Fits are per parametrization.
``width``      no        model width (kept for grouping and in the outputs)
=============  ========  ===================================================================

A *configuration* is one (param, N, D, width); its rows differ in LR and seed.

Only numpy is imported at module import; SciPy and matplotlib are imported by the functions
that need them, so ``import lvopt.transfer`` stays cheap.

The package, one subject a module: ``sweep`` (the table), ``optima`` (optimal LRs), ``lr_laws``
(LR scaling laws and the extrapolation metrics), ``loss_laws``, ``plots``, ``analysis`` (all
of it, as the CLI reports it), ``cli`` (``lvopt transfer``).
"""

from __future__ import annotations

from ..roles import ROLES
from .analysis import analyze
from .cli import main
from .loss_laws import LossLaw, asymptotic_penalty, fit_loss_law
from .lr_laws import (
    LRLaw,
    choose_axis,
    curvature_test,
    extrapolation_penalty,
    fit_lr_law,
    select_slice,
)
from .lr_laws import _law_for_axis as _law_for_axis  # tests fit a law along one axis directly
from .optima import Optimum, optimal_lrs
from .plots import plot_loss_laws, plot_loss_vs_lr, plot_lr_law
from .sweep import REQUIRED, VARIABLES, default_eff_col, default_lr_col, load_sweep

__all__ = [
    "load_sweep",
    "default_lr_col",
    "default_eff_col",
    "Optimum",
    "optimal_lrs",
    "LRLaw",
    "fit_lr_law",
    "curvature_test",
    "choose_axis",
    "select_slice",
    "extrapolation_penalty",
    "LossLaw",
    "fit_loss_law",
    "asymptotic_penalty",
    "plot_loss_vs_lr",
    "plot_lr_law",
    "plot_loss_laws",
    "analyze",
    "main",
    "ROLES",
    "REQUIRED",
    "VARIABLES",
]
