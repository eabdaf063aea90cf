"""Width scaling rules for per-role learning rates, and one call from a model to an optimizer.

With width multiplier m = width / base_width, a parameter of role r gets learning rate
``lr_r * m ** (-alpha_r)``, where ``lr_r`` is the base LR tuned at ``base_width``
(docs/scaling.md gives the formulas, their sources and their limits):

======== ========= ====== ====== ====== ==========================================
rule     embedding hidden output vector source
======== ========= ====== ====== ====== ==========================================
sp       0         0      0      0      standard parameterisation: one LR
mup      0         1      1      0      Tensor Programs V (Yang et al.), Table 3, Adam
lv       1/2       1      1      0      Hayou & Liu 2025, arXiv 2506.15025
sp_emb   -1        0      0      0      SP with the embedding LR raised by m
======== ========= ====== ====== ====== ==========================================

``embedding_exponent`` replaces the rule's embedding exponent (anything in between).

The default rule is ``mup``: both width sweeps of experiments/lv_rule (REPORT.md) found muP's
embedding exponent transferring with the smaller loss penalty where V >> width, and neither
found the embedding optimum falling as width^-1/2. ``lv`` is an explicit opt-in; its embedding
exponent rests on Hayou & Liu's analysis, not on a measurement in this repository.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .roles import ROLES, ParamRole, _user_stacklevel, check_role, detect_roles, output_modules, token_embedding

__all__ = [
    "RULES",
    "HYPERBALL_HIDDEN",
    "LV_MIN_RATIO",
    "ScalingPlan",
    "coord_check",
    "CoordCheck",
    "exponents",
    "lr_multipliers",
    "model_width",
    "vocab_size",
    "scaling_plan",
    "from_model",
    "apply_output_multiplier",
    "mup_output_init_",
]

# alpha per role: a role's LR is multiplied by m ** (-alpha).
RULES: dict = {
    "sp": {"embedding": 0.0, "hidden": 0.0, "output": 0.0, "vector": 0.0},
    "mup": {"embedding": 0.0, "hidden": 1.0, "output": 1.0, "vector": 0.0},
    "lv": {"embedding": 0.5, "hidden": 1.0, "output": 1.0, "vector": 0.0},
    "sp_emb": {"embedding": -1.0, "hidden": 0.0, "output": 0.0, "vector": 0.0},
}

# alpha of hidden matrices in AdamH's hyperball groups, per rule. A hyperball step moves W by
# lr*R*u/||u||_F; for an n x n matrix at N(0, 1/n) init R = ||W_0||_F ~ sqrt(n) and Adam's
# direction u has O(1) entries, ||u||_F ~ n, so each entry moves by lr/sqrt(n). muP wants Adam's
# per-entry step to fall as 1/n (alpha 1), so the hyperball lr must fall as n^(-1/2): alpha 1/2
# wherever the rule gives hidden matrices alpha 1 (docs/scaling.md; checked by coord_check in
# tests/test_scaling.py).
HYPERBALL_HIDDEN: dict = {"sp": 0.0, "mup": 0.5, "lv": 0.5, "sp_emb": 0.0}

# The LV exponent is for vocabulary tables: the analysis assumes V >> width. A table counts as a
# vocabulary table when it is the token embedding or has at least LV_MIN_RATIO * width rows;
# smaller embedding tables (position tables: their "vocabulary" is the context length; token
# types) keep muP's input-weight exponent under `lv`, and rule 'lv' warns when the token
# vocabulary itself is below LV_MIN_RATIO * width. 16 is a convention (an order of magnitude
# and more), not a measured boundary: docs/scaling.md says what was measured.
LV_MIN_RATIO = 16

# Optimizers whose update is normalised per coordinate (Adam's family, Lion): the exponents of
# RULES are theirs. SGD's muP exponents differ (Tensor Programs V, Table 3).
_ADAM_LIKE_NAMES = ("adam", "lion")

# Where a model or its output module may keep a muP output (logit) multiplier.
_OUTPUT_MULT_ATTRS = ("output_mult", "out_mult", "output_multiplier", "logit_multiplier", "logits_scaling")

# Attribute names under which Hugging Face configs keep the model width, in order of preference.
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")


def exponents(rule: str = "mup", embedding_exponent: float | None = None) -> dict:
    """alpha per role for ``rule``, with the embedding exponent replaced if given."""
    if rule not in RULES:
        raise ValueError(
            f"unknown rule {rule!r}; rules are {', '.join(RULES)} (or any rule with embedding_exponent=...)"
        )
    alpha = dict(RULES[rule])
    if embedding_exponent is not None:
        e = float(embedding_exponent)
        if not math.isfinite(e):
            raise ValueError(f"embedding_exponent must be finite, got {embedding_exponent!r}")
        alpha["embedding"] = e
    return alpha


def _check_width(width, base_width, alpha: dict, allow_smaller_width: bool) -> float:
    for name, w in (("width", width), ("base_width", base_width)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"{name} must be a positive number, got {w!r}")
    m = width / base_width
    if m < 1 and not allow_smaller_width and any(a != 0 for a in alpha.values()):
        raise ValueError(
            f"width={width} is below base_width={base_width}. base_width is the width at which the base "
            f"LRs were tuned (the small proxy model), width the model being trained; the rules transfer "
            f"from a narrow proxy to a wider model. If the arguments are right and you mean to transfer "
            f"downwards, pass allow_smaller_width=True"
        )
    return m


def lr_multipliers(
    rule: str = "mup", *, width, base_width, embedding_exponent: float | None = None, allow_smaller_width: bool = False
) -> dict:
    """The factor m ** (-alpha_role) per role, m = width / base_width."""
    alpha = exponents(rule, embedding_exponent)
    m = _check_width(width, base_width, alpha, allow_smaller_width)
    return {r: m ** (-a) for r, a in alpha.items()}


def model_width(model: nn.Module) -> int | None:
    """The width of ``model``: a Hugging Face config's ``hidden_size`` / ``n_embd`` /
    ``d_model``, else the token embedding's dimension; None if neither exists."""
    cfg = getattr(model, "config", None)
    for key in _WIDTH_KEYS:
        w = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(w, int) and not isinstance(w, bool) and w > 0:
            return w
    tok = token_embedding(model)
    return int(tok.weight.shape[1]) if tok is not None else None


def vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size: the token embedding's rows, else a config's ``vocab_size``."""
    tok = token_embedding(model)
    if tok is not None:
        return int(tok.weight.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if isinstance(v, int) else None


def _per_role(value, name: str, default_fn) -> dict:
    """A scalar for every role, or a ``{role: value}`` mapping (missing roles: default_fn(role))."""
    if isinstance(value, Mapping):
        for k in value:
            check_role(k, f"{name} key")
        return {r: (value[r] if r in value else default_fn(r)) for r in ROLES}
    return {r: value for r in ROLES}


def _is_hyperball_optimizer(opt_cls) -> bool:
    return "hyperball" in getattr(opt_cls, "_group_extra_defaults", {})


def _default_weight_decay(opt_cls) -> float:
    try:
        p = inspect.signature(opt_cls.__init__).parameters.get("weight_decay")
    except (TypeError, ValueError):
        p = None
    if p is not None and isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
        return float(p.default)
    return 0.0


@dataclass
class ScalingPlan:
    """The roles and the per-role hyperparameters for one model: ``param_groups()`` for an
    optimizer, ``table()`` for a person."""

    entries: list
    rule: str
    alpha: dict
    width: float
    base_width: float
    vocab_size: int | None
    lr: dict
    weight_decay: dict
    hyperball: bool
    algorithm_name: str
    # ids of embedding-role tensors that are not vocabulary tables (position tables...), and
    # the exponent they take instead of alpha["embedding"]
    small_tables: frozenset = frozenset()
    small_table_alpha: float = 0.0

    @property
    def multiplier(self) -> float:
        return self.width / self.base_width

    def role_alpha(self, role: str) -> float:
        """The exponent applied to ``role``: the rule's, except for hidden matrices on AdamH's
        hyperball (:data:`HYPERBALL_HIDDEN`). For the embedding role this is the vocabulary
        tables' exponent; see :meth:`entry_alpha`."""
        if self.role_hyperball(role):
            return HYPERBALL_HIDDEN.get(self.rule, self.alpha[role] / 2)
        return self.alpha[role]

    def role_lr(self, role: str) -> float:
        return self.lr[role] * self.multiplier ** (-self.role_alpha(role))

    def entry_alpha(self, e: ParamRole) -> float:
        if e.role == "embedding" and id(e.param) in self.small_tables:
            return self.small_table_alpha
        return self.role_alpha(e.role)

    def entry_lr(self, e: ParamRole) -> float:
        return self.lr[e.role] * self.multiplier ** (-self.entry_alpha(e))

    def role_hyperball(self, role: str) -> bool:
        # AdamH: hidden matrices on the hyperball; embeddings, output and vectors on AdamW, as in
        # the authors' reference runs (docs/design.md section 2.2).
        return self.hyperball and role == "hidden"

    def _algorithm(self, e: ParamRole) -> str:
        if self.hyperball:
            return "adamh" if self.role_hyperball(e.role) and e.param.dim() >= 2 else "adamw"
        return self.algorithm_name

    def param_groups(self) -> list:
        """One group per role present, in the order embedding, hidden, output, vector; each has
        ``params`` as (name, tensor) pairs, ``lr``, ``weight_decay``, ``role`` (and for AdamH
        ``hyperball``). Where small embedding tables (position tables) take another exponent
        than the vocabulary tables, they get a second ``embedding`` group, marked
        ``table="small"`` (the vocabulary tables' group ``table="vocabulary"``)."""
        seen: dict = {}
        groups = []
        for role in ROLES:
            members = [e for e in self.entries if e.role == role and e.trainable]
            if not members:
                continue
            for e in members:
                if id(e.param) in seen:
                    raise ValueError(
                        f"parameter {e.name!r} would be in two groups ({seen[id(e.param)]!r} and {role!r})"
                    )
                seen[id(e.param)] = role
            parts = [(None, members)]
            if role == "embedding":
                small = [e for e in members if id(e.param) in self.small_tables]
                if small and self.small_table_alpha != self.role_alpha(role):
                    big = [e for e in members if id(e.param) not in self.small_tables]
                    parts = ([("vocabulary", big)] if big else []) + [("small", small)]
            for table, ms in parts:
                g = {
                    "params": [(e.name, e.param) for e in ms],
                    "lr": self.entry_lr(ms[0]),
                    "weight_decay": self.weight_decay[role],
                    "role": role,
                }
                if table is not None:
                    g["table"] = table
                if self.hyperball:
                    g["hyperball"] = self.role_hyperball(role)
                groups.append(g)
        return groups

    def table(self) -> str:
        """A fixed-width table: name, shape, role, lr, wd, algorithm, why."""
        alpha = {r: self.role_alpha(r) for r in self.alpha}
        head = (
            f"rule={self.rule} alpha={{{', '.join(f'{r}: {a:g}' for r, a in alpha.items())}}} "
            f"width={self.width:g} base_width={self.base_width:g} m={self.multiplier:g} "
            f"vocab={self.vocab_size}"
        )
        rows = [("name", "shape", "role", "lr", "wd", "algorithm", "why")]
        for e in self.entries:
            name = " = ".join(e.names)
            shape = "x".join(str(s) for s in e.param.shape) or "scalar"
            if e.trainable:
                rows.append(
                    (
                        name,
                        shape,
                        e.role,
                        f"{self.entry_lr(e):.4g}",
                        f"{self.weight_decay[e.role]:g}",
                        self._algorithm(e),
                        e.reason
                        + (
                            f"; small table, alpha {self.small_table_alpha:g}"
                            if id(e.param) in self.small_tables and e.role == "embedding"
                            else ""
                        ),
                    )
                )
            else:
                rows.append((name, shape, e.role, "-", "-", "frozen", e.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)

    __str__ = table


def _is_adam_like(opt_cls) -> bool:
    names = [c.__name__.lower() for c in getattr(opt_cls, "__mro__", [opt_cls]) if hasattr(c, "__name__")]
    return any(k in n for n in names for k in _ADAM_LIKE_NAMES)


def _found_output_multipliers(model: nn.Module) -> list:
    """Where ``model`` seems to multiply its logits: lvopt's apply_output_multiplier hook, the
    ``mup`` package's MuReadout, or an attribute (model, output module or config) of a name in
    _OUTPUT_MULT_ATTRS with a value other than 1."""
    found = []
    outs = [m for m, _ in output_modules(model)]
    for name, mod in model.named_modules():
        if getattr(mod, "_lvopt_output_multiplier", None) is not None:
            found.append(f"{name or 'model'}: lvopt.apply_output_multiplier hook")
        elif type(mod).__name__ in ("MuReadout", "MuSharedReadout"):
            found.append(f"{name or 'model'}: {type(mod).__name__} (mup package)")
    holders = [("model", model)] + [(f"output module {type(m).__name__}", m) for m in outs]
    cfg = getattr(model, "config", None)
    if cfg is not None:
        holders.append(("config", cfg))
    for where, obj in holders:
        for a in _OUTPUT_MULT_ATTRS:
            v = getattr(obj, a, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 1:
                found.append(f"{where}.{a} = {v:g}")
    return found


def scaling_plan(
    model: nn.Module,
    *,
    lr,
    base_width,
    rule: str = "mup",
    width=None,
    embedding_exponent: float | None = None,
    weight_decay=None,
    overrides=None,
    tied: str | None = None,
    allow_smaller_width: bool = False,
    optimizer=None,
    include_frozen: bool = False,
    output_multiplier: bool | None = None,
    adam_like: bool | None = None,
) -> ScalingPlan:
    """Roles and scaled hyperparameters for ``model``, without building an optimizer.

    ``lr``: base LR tuned at ``base_width``, a number or ``{role: lr}`` (every role present in
    the model must then be given). ``weight_decay``: a number for embeddings, hidden matrices
    and the output layer (vectors take 0), or ``{role: wd}`` (missing roles: the optimizer's
    default, vectors 0); default: the optimizer's default. Under AdamH hidden matrices are on
    the hyperball and take no weight decay. ``optimizer``: the optimizer class the plan is for
    (the default weight decay, the hyperball groups, the table's algorithm column).

    ``output_multiplier``: ``True`` if the model's forward pass multiplies the logits by
    base_width/width (muP's multiplier form, e.g. :func:`apply_output_multiplier` or the ``mup``
    package's MuReadout): the output layer's LR is then not width-scaled (alpha 0), as the
    ``mup`` package does. ``None`` (default): look for such a multiplier and refuse to combine
    one with an output alpha other than 0 (the read-out would be scaled twice); ``False``: the
    model has none (no check).

    ``adam_like``: the rules' exponents are for Adam-type optimizers (per-coordinate normalised
    updates). ``optimizer`` classes whose name (or a base class's) does not contain "adam" or
    "lion" are refused for every rule but ``sp`` unless ``adam_like=True`` says otherwise.

    Embedding tables other than the token embedding with fewer than ``LV_MIN_RATIO * width``
    rows (position tables, token types) are not vocabularies: they keep muP's input-weight
    exponent under ``lv`` (and ignore ``embedding_exponent``), in their own param group.
    """
    alpha = exponents(rule, embedding_exponent)
    if (
        optimizer is not None
        and any(a != 0 for a in alpha.values())
        and not _is_adam_like(optimizer)
        and adam_like is not True
    ):
        raise ValueError(
            f"rule {rule!r} gives Adam's exponents (Tensor Programs V, Table 3, Adam column), but "
            f"{getattr(optimizer, '__name__', optimizer)!r} does not look like an Adam-type optimizer. "
            f"For SGD muP's exponents differ (embedding -1, hidden 0, output 1 in lvopt's convention); "
            f"pass rule='sp' with your own per-role lr, or adam_like=True if the optimizer normalises "
            f"its update per coordinate as Adam does"
        )
    if output_multiplier not in (None, True, False):
        raise ValueError(f"output_multiplier must be True, False or None, got {output_multiplier!r}")
    if width is None:
        width = model_width(model)
        if width is None:
            raise ValueError(
                f"cannot read the width of {type(model).__name__}: no config hidden_size / "
                f"n_embd / d_model and no embedding; pass width=..."
            )
    _check_width(width, base_width, alpha, allow_smaller_width)
    entries = detect_roles(model, overrides=overrides, tied=tied, include_frozen=include_frozen)
    present = {e.role for e in entries if e.trainable}
    if not present:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if output_multiplier is True:
        alpha["output"] = 0.0
    elif output_multiplier is None and "output" in present and alpha["output"] != 0:
        found = _found_output_multipliers(model)
        if found:
            raise ValueError(
                f"{type(model).__name__} multiplies its logits ({'; '.join(found)}) and rule {rule!r} also "
                f"scales the output layer's LR by m^-{alpha['output']:g}: the read-out would be scaled "
                f"twice (its effective LR falling as 1/m^2). Pass output_multiplier=True if the "
                f"multiplier is muP's base_width/width (the output LR is then not width-scaled), or "
                f"output_multiplier=False if it is not a width multiplier"
            )
    tok = token_embedding(model)
    small = frozenset(
        id(e.param)
        for e in entries
        if e.role == "embedding"
        and tok is not None
        and e.param is not tok.weight
        and e.param.dim() == 2
        and e.param.shape[0] < LV_MIN_RATIO * width
    )
    small_alpha = RULES["mup" if rule == "lv" else rule]["embedding"]

    if isinstance(lr, Mapping):
        lrs = _per_role(lr, "lr", lambda r: None)
        missing = [r for r in ROLES if r in present and lrs[r] is None]
        if missing:
            raise ValueError(
                f"lr is a per-role mapping but has no entry for role(s) {missing} present in "
                f"the model; give every role in {sorted(present)}"
            )
    else:
        lrs = _per_role(lr, "lr", None)
    for r in present:
        v = lrs[r]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"lr for role {r!r} must be a finite number >= 0, got {v!r}")

    hyperball = _is_hyperball_optimizer(optimizer) if optimizer is not None else False
    wd_default = _default_weight_decay(optimizer) if optimizer is not None else 0.0
    if weight_decay is None:
        wds = {r: (0.0 if r == "vector" else wd_default) for r in ROLES}
        if hyperball:
            wds["hidden"] = 0.0
    elif isinstance(weight_decay, Mapping):
        wds = _per_role(weight_decay, "weight_decay", lambda r: 0.0 if r == "vector" else wd_default)
        if hyperball and "hidden" not in weight_decay:
            wds["hidden"] = 0.0
    else:
        wds = {r: (0.0 if r == "vector" else weight_decay) for r in ROLES}
        if hyperball:
            wds["hidden"] = 0.0
    for r in ROLES:
        v = wds[r]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"weight_decay for role {r!r} must be a finite number >= 0, got {v!r}")
    if hyperball and wds["hidden"] != 0.0 and "hidden" in present:
        raise ValueError(
            f"weight_decay={wds['hidden']} for hidden matrices under {optimizer.__name__}: they "
            f"are on the hyperball, whose norm is fixed, so they take no weight decay"
        )

    vocab = vocab_size(model)
    if rule == "lv" and embedding_exponent is None and vocab is not None and vocab < LV_MIN_RATIO * width:
        warnings.warn(
            f"lvopt: rule 'lv' with vocabulary {vocab} < {LV_MIN_RATIO} x width {width}: the LV "
            f"analysis (Hayou & Liu 2025) assumes a vocabulary much larger than the width; as "
            f"V/width falls it interpolates towards muP (rule='mup', the default). Below {LV_MIN_RATIO}x the "
            f"regime is not established (docs/scaling.md)",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
    name = getattr(optimizer, "__name__", "optimizer").lower() if optimizer is not None else "-"
    return ScalingPlan(
        entries,
        rule,
        alpha,
        float(width),
        float(base_width),
        vocab,
        {r: (float(v) if v is not None else None) for r, v in lrs.items()},
        {r: float(v) for r, v in wds.items()},
        hyperball,
        name,
        small,
        float(small_alpha),
    )


def from_model(
    opt_cls,
    model: nn.Module,
    *,
    lr,
    base_width,
    rule: str = "mup",
    width=None,
    embedding_exponent: float | None = None,
    weight_decay=None,
    overrides=None,
    tied: str | None = None,
    allow_smaller_width: bool = False,
    verbose: bool = False,
    output_multiplier: bool | None = None,
    adam_like: bool | None = None,
    **optimizer_kwargs,
):
    """``opt_cls(groups, **optimizer_kwargs)`` with one param group per role whose ``lr`` is the
    base LR scaled by ``rule`` from ``base_width`` to the model's ``width``.

    ``rule``: ``"mup"`` (the default), ``"lv"`` (opt-in: the LV embedding exponent, which no
    measurement here supports; docs/scaling.md), ``"sp"`` or ``"sp_emb"``.
    ``lvopt.AdamW.from_model(model, ...)`` and ``lvopt.AdamH.from_model(model, ...)`` call
    this; any ``torch.optim`` class works as ``opt_cls`` too. The plan (roles, LRs, table) is
    kept on the optimizer as ``optimizer.scaling_plan``; ``verbose=True`` prints its table.
    See :func:`scaling_plan` for the arguments. LR schedulers multiply every group's LR by the
    same factor, so the ratios set here hold along the schedule.
    """
    for key in ("params", "lr", "weight_decay"):
        if key in optimizer_kwargs:
            raise TypeError(f"from_model() got {key!r} twice")
    plan = scaling_plan(
        model,
        lr=lr,
        base_width=base_width,
        rule=rule,
        width=width,
        embedding_exponent=embedding_exponent,
        weight_decay=weight_decay,
        overrides=overrides,
        tied=tied,
        allow_smaller_width=allow_smaller_width,
        optimizer=opt_cls,
        output_multiplier=output_multiplier,
        adam_like=adam_like,
    )
    groups = plan.param_groups()
    opt = opt_cls(groups, **optimizer_kwargs)
    opt.scaling_plan = plan
    if verbose:
        print(plan.table())
    return opt


def _output_width(model, width, base_width):
    if base_width is None:
        raise ValueError("give base_width (and width, if it cannot be read from the model)")
    width = model_width(model) if width is None else width
    if width is None:
        raise ValueError(f"cannot read the width of {type(model).__name__}; pass width=...")
    return width


def _outputs_or_raise(model):
    mods = output_modules(model)
    if not mods:
        raise ValueError(
            f"{type(model).__name__} has no output layer lvopt can find (no "
            f"get_output_embeddings() and no linear of the token embedding's shape)"
        )
    return mods


class _MultiplierHandle:
    """A forward-hook handle whose ``remove()`` also clears the module's multiplier mark."""

    def __init__(self, handle, module):
        self._h, self._m = handle, module

    def remove(self):
        self._h.remove()
        if hasattr(self._m, "_lvopt_output_multiplier"):
            del self._m._lvopt_output_multiplier


def apply_output_multiplier(model: nn.Module, multiplier=None, *, width=None, base_width=None) -> list:
    """Multiply the output layer's output (the logits) by ``multiplier``, default
    ``base_width / width`` (1/m), with a forward hook on every output module found by
    :func:`lvopt.roles.output_modules`. Returns the hook handles (``.remove()`` undoes it).

    This is muP's output multiplier in the form the ``mup`` package uses for a readout whose LR
    is not width-scaled, i.e. for **tied** embeddings, whose shared tensor takes the
    ``embedding`` role (alpha 0 under ``mup``). Do not combine it with an untied output layer in
    the ``output`` role (alpha 1): that scales the output side twice; use
    :func:`mup_output_init_` there. lvopt's optimizers never apply either themselves."""
    if multiplier is None:
        multiplier = base_width / _output_width(model, width, base_width) if base_width is not None else None
        if multiplier is None:
            raise ValueError("give multiplier, or base_width (and width, if it cannot be read from the model)")
    mods = _outputs_or_raise(model)
    mult = float(multiplier)

    def hook(module, args, out):
        return out * mult

    handles = []
    for m, _ in mods:
        m._lvopt_output_multiplier = mult
        h = m.register_forward_hook(hook)
        handles.append(_MultiplierHandle(h, m))
    return handles


@torch.no_grad()
def mup_output_init_(model: nn.Module, base_std: float, *, base_width, width=None) -> None:
    """Re-initialise an untied output layer as Tensor Programs V, Table 3 prescribes for Adam
    with the output LR scaled by 1/m: weights ~ N(0, std^2) with std = base_std * base_width /
    width (variance proportional to 1/fan_in^2; SP's is 1/fan_in), bias zero. ``base_std`` is
    the std used (tuned) at ``base_width``. Refuses tied weights (see
    :func:`apply_output_multiplier`)."""
    width = _output_width(model, width, base_width)
    tok = token_embedding(model)
    std = float(base_std) * base_width / width
    for mod, _ in _outputs_or_raise(model):
        if tok is not None and mod.weight is tok.weight:
            raise ValueError(
                "the output layer is tied to the input embeddings; re-initialising it would "
                "change the embeddings. Use apply_output_multiplier for tied weights"
            )
        mod.weight.normal_(0.0, std)
        if getattr(mod, "bias", None) is not None:
            mod.bias.zero_()


# ---------------------------------------------------------------------------- coordinate check


@dataclass
class CoordCheck:
    """What :func:`coord_check` measured. ``sizes[q]`` is an array (len(widths), steps + 1) of
    the seed-mean size of quantity ``q`` per width and step (step 0: at initialisation);
    ``slopes[q]`` the slope of log2(size) against log2(width) per step (nan where a size is 0);
    ``expected[q]`` the slope the check wants; ``passed[q]`` whether every step's slope is within
    ``tol`` of it. Quantities: ``update:<role>`` (mean |(W_t - W_0) x_t| over the role's
    modules, on a fixed probe batch), ``activation:<module>`` (mean |h_t|) and
    ``logits`` (mean |output_t|)."""

    widths: list
    steps: int
    tol: float
    sizes: dict
    slopes: dict
    expected: dict
    passed: dict

    @property
    def ok(self) -> bool:
        return all(self.passed.values())

    def roles(self) -> dict:
        """Pass/fail per role (its update and its modules' activations) and for the logits."""
        out: dict = {}
        for q, p in self.passed.items():
            key = q.split(":", 1)[1] if q.startswith("update:") else self._role_of.get(q, q)
            out[key] = out.get(key, True) and p
        return out

    _role_of: dict = None

    def worst(self, q: str) -> float:
        d = np.asarray(self.slopes[q]) - self.expected[q]
        d = d[np.isfinite(d)]
        return float(d[np.argmax(np.abs(d))]) if d.size else math.nan

    def table(self) -> str:
        lines = [
            f"coordinate check over widths {self.widths}, {self.steps} steps, tol {self.tol:g}: "
            f"{'PASS' if self.ok else 'FAIL'}",
            f"{'quantity':34s} {'expected':>8s} "
            + " ".join(f"{'t=' + str(t):>7s}" for t in range(self.steps + 1))
            + "  result",
        ]
        for q in self.slopes:
            sl = " ".join(f"{x:7.2f}" if math.isfinite(x) else f"{'-':>7s}" for x in self.slopes[q])
            lines.append(f"{q:34s} {self.expected[q]:8.2f} {sl}  {'pass' if self.passed[q] else 'FAIL'}")
        return "\n".join(lines)

    __str__ = table

    def plot(self, path: str, title: str | None = None) -> None:
        """One panel per quantity: size against width (log-log), one line per step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        qs = list(self.sizes)
        n = len(qs)
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), squeeze=False)
        for ax, q in zip(axes.flat, qs):
            for t in range(self.steps + 1):
                y = self.sizes[q][:, t]
                if np.all(y > 0):
                    ax.plot(self.widths, y, "o-", ms=3, color=f"C{t % 10}", label=f"t={t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(
                f"{q}\n{'pass' if self.passed[q] else 'FAIL'} (worst slope dev {self.worst(q):+.2f})", fontsize=8
            )
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        from matplotlib.lines import Line2D

        fig.legend(
            [Line2D([], [], color=f"C{t % 10}", marker="o", ms=3) for t in range(self.steps + 1)],
            [f"step {t}" for t in range(self.steps + 1)],
            loc="lower right",
            fontsize=6,
            ncol=self.steps + 1,
        )
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _slope(widths, y) -> float:
    y = np.asarray(y, dtype=float)
    if not np.all(np.isfinite(y)) or not np.all(y > 0):
        return math.nan
    x = np.log2(np.asarray(widths, dtype=float))
    return float(np.polyfit(x, np.log2(y), 1)[0])


def coord_check(
    model_fn,
    widths,
    *,
    data,
    lr=None,
    base_width=None,
    rule: str = "mup",
    optimizer=None,
    opt_fn=None,
    loss_fn=None,
    steps: int = 4,
    seeds=(0, 1),
    tol: float = 0.3,
    expected=None,
    activations: bool = True,
    plot: str | None = None,
    **plan_kwargs,
) -> CoordCheck:
    """muP's coordinate check (as the ``mup`` package's): train a model at every width in
    ``widths`` for a few steps and see how the size of what each layer computes grows with width.

    ``model_fn(width)`` builds the model. ``data`` is ``(inputs, targets)`` or a callable
    ``data(step) -> (inputs, targets)`` (called under ``torch.manual_seed`` of the seed and step,
    so every width sees the same batches); ``inputs`` may be a tuple of arguments. The first
    batch is also the probe on which outputs are measured after every step. ``loss_fn(output,
    targets)``: cross-entropy over the last dimension by default.

    The optimizer is ``opt_fn(model, width)`` if given, else ``from_model(optimizer or
    lvopt.AdamW, model, lr=lr, base_width=base_width or min(widths), rule=rule, width=width,
    **plan_kwargs)``.

    Measured on the probe batch (seed means): per role, the mean |(W_t - W_0) x_t| over the
    modules whose weight has that role, i.e. what the role's own updates add to the module's
    output (``update:<role>``); per module, mean |h_t| (``activation:<name>``); the model's
    output (``logits``). A parametrization passes when, at every step, the slope of
    log2(size) against log2(width) is within ``tol`` of ``expected``: 0 for everything (nothing
    may blow up or vanish with width) except the embedding update, which follows the rule's
    embedding exponent (slope -alpha_embedding: `lv` shrinks it as m^-1/2 by design; muP keeps
    it). ``expected={quantity: slope}`` overrides. SP with Adam at a fixed LR fails: hidden
    and output updates grow ~ width. ``plot``: a PNG path for :meth:`CoordCheck.plot`.
    """
    import torch.nn.functional as F
    from . import optim as _optim

    widths = [int(w) for w in widths]
    if len(widths) < 2 or len(set(widths)) != len(widths):
        raise ValueError(f"widths must be at least two distinct widths, got {widths}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if opt_fn is None and lr is None:
        raise ValueError("give lr (and rule, base_width) or opt_fn(model, width)")
    if loss_fn is None:

        def loss_fn(out, y):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    get = data if callable(data) else (lambda step: data)
    bw = base_width if base_width is not None else min(widths)

    def batch(seed, step):
        with torch.random.fork_rng():
            torch.manual_seed(1_000_003 * seed + step)
            x, y = get(step)
        return (x if isinstance(x, tuple) else (x,)), y

    acc: dict = {}
    role_of: dict = {}
    emb_alpha = 0.0
    for wi, width in enumerate(widths):
        for seed in seeds:
            torch.manual_seed(seed)
            model = model_fn(width)
            if opt_fn is not None:
                opt = opt_fn(model, width)
            else:
                opt = from_model(
                    optimizer or _optim.AdamW,
                    model,
                    lr=lr,
                    base_width=bw,
                    rule=rule,
                    width=width,
                    allow_smaller_width=True,
                    **plan_kwargs,
                )
            plan = getattr(opt, "scaling_plan", None)
            if plan is not None:
                emb_alpha = plan.role_alpha("embedding")
                entries = plan.entries
            else:
                entries = detect_roles(model, overrides=plan_kwargs.get("overrides"), tied=plan_kwargs.get("tied"))
            role_by_id = {id(e.param): e.role for e in entries}
            mods = [
                (n, m)
                for n, m in model.named_modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor)
                and m.weight.dim() >= 2
                and id(m.weight) in role_by_id
            ]
            w0 = {n: m.weight.detach().clone() for n, m in mods}
            captured: dict = {}
            hooks = [
                m.register_forward_hook(
                    lambda mod, a, kw, out, n=n: captured.__setitem__(n, (a, kw, out.detach())), with_kwargs=True
                )
                for n, m in mods
            ]
            px, _ = batch(seed, 0)

            def probe():
                captured.clear()
                with torch.no_grad():
                    out = model(*px)
                return dict(captured), out.detach()

            try:
                for t in range(steps + 1):
                    if t > 0:
                        x, y = batch(seed, t - 1)
                        opt.zero_grad(set_to_none=True)
                        loss_fn(model(*x), y).backward()
                        opt.step()
                    cap, outt = probe()
                    vals: dict = {}
                    per_role: dict = {}
                    for n, m in mods:
                        role = role_by_id[id(m.weight)]
                        a, kw, out = cap[n]
                        if t > 0:
                            # the module's own update applied to its current input: (W_t - W_0) x_t
                            with torch.no_grad():
                                delta = {"weight": m.weight.detach() - w0[n]}
                                if isinstance(getattr(m, "bias", None), torch.Tensor):
                                    delta["bias"] = torch.zeros_like(m.bias)
                                d = torch.func.functional_call(m, delta, a, kw)
                            per_role.setdefault(role, []).append(float(d.abs().mean()))
                        if activations:
                            vals[f"activation:{n}"] = float(out.abs().mean())
                            role_of[f"activation:{n}"] = role
                    for role, v in per_role.items():
                        vals[f"update:{role}"] = float(np.mean(v))
                    vals["logits"] = float(outt.abs().mean())
                    for q, v in vals.items():
                        acc.setdefault(q, np.zeros((len(widths), steps + 1)))[wi, t] += v / len(seeds)
            finally:
                for h in hooks:
                    h.remove()
    order = sorted(acc, key=lambda q: (not q.startswith("update:"), q != "logits", q))
    sizes = {q: acc[q] for q in order}
    slopes = {
        q: [
            (_slope(widths, sizes[q][:, t]) if t > 0 or not q.startswith("update:") else math.nan)
            for t in range(steps + 1)
        ]
        for q in order
    }
    exp = {q: 0.0 for q in order}
    if "update:embedding" in exp:
        exp["update:embedding"] = -emb_alpha
    for q, v in (expected or {}).items():
        if q not in exp:
            raise ValueError(f"expected: unknown quantity {q!r}; quantities are {', '.join(order)}")
        exp[q] = float(v)
    passed = {q: all(abs(s - exp[q]) <= tol for s in slopes[q] if math.isfinite(s)) for q in order}
    res = CoordCheck(widths, steps, tol, sizes, slopes, exp, passed)
    res._role_of = role_of
    if plot:
        res.plot(plot)
    return res
