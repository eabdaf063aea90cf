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
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .roles import ROLES, ParamRole, _user_stacklevel, check_role, detect_roles, output_modules, token_embedding

__all__ = ["RULES", "ScalingPlan", "exponents", "lr_multipliers", "model_width", "vocab_size",
           "scaling_plan", "from_model", "apply_output_multiplier", "mup_output_init_"]

# alpha per role: a role's LR is multiplied by m ** (-alpha).
RULES: dict = {
    "sp": {"embedding": 0.0, "hidden": 0.0, "output": 0.0, "vector": 0.0},
    "mup": {"embedding": 0.0, "hidden": 1.0, "output": 1.0, "vector": 0.0},
    "lv": {"embedding": 0.5, "hidden": 1.0, "output": 1.0, "vector": 0.0},
    "sp_emb": {"embedding": -1.0, "hidden": 0.0, "output": 0.0, "vector": 0.0},
}

# Attribute names under which Hugging Face configs keep the model width, in order of preference.
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")


def exponents(rule: str = "lv", embedding_exponent: float | None = None) -> dict:
    """alpha per role for ``rule``, with the embedding exponent replaced if given."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; rules are {', '.join(RULES)} (or any rule with "
                         f"embedding_exponent=...)")
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
            f"downwards, pass allow_smaller_width=True")
    return m


def lr_multipliers(rule: str = "lv", *, width, base_width, embedding_exponent: float | None = None,
                   allow_smaller_width: bool = False) -> dict:
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

    @property
    def multiplier(self) -> float:
        return self.width / self.base_width

    def role_lr(self, role: str) -> float:
        return self.lr[role] * self.multiplier ** (-self.alpha[role])

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
        ``hyperball``)."""
        seen: dict = {}
        groups = []
        for role in ROLES:
            members = [e for e in self.entries if e.role == role and e.trainable]
            if not members:
                continue
            for e in members:
                if id(e.param) in seen:
                    raise ValueError(f"parameter {e.name!r} would be in two groups ({seen[id(e.param)]!r} "
                                     f"and {role!r})")
                seen[id(e.param)] = role
            g = {"params": [(e.name, e.param) for e in members], "lr": self.role_lr(role),
                 "weight_decay": self.weight_decay[role], "role": role}
            if self.hyperball:
                g["hyperball"] = self.role_hyperball(role)
            groups.append(g)
        return groups

    def table(self) -> str:
        """A fixed-width table: name, shape, role, lr, wd, algorithm, why."""
        head = (f"rule={self.rule} alpha={{{', '.join(f'{r}: {a:g}' for r, a in self.alpha.items())}}} "
                f"width={self.width:g} base_width={self.base_width:g} m={self.multiplier:g} "
                f"vocab={self.vocab_size}")
        rows = [("name", "shape", "role", "lr", "wd", "algorithm", "why")]
        for e in self.entries:
            name = " = ".join(e.names)
            shape = "x".join(str(s) for s in e.param.shape) or "scalar"
            if e.trainable:
                rows.append((name, shape, e.role, f"{self.role_lr(e.role):.4g}",
                             f"{self.weight_decay[e.role]:g}", self._algorithm(e), e.reason))
            else:
                rows.append((name, shape, e.role, "-", "-", "frozen", e.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)

    __str__ = table


def scaling_plan(model: nn.Module, *, lr, base_width, rule: str = "lv", width=None,
                 embedding_exponent: float | None = None, weight_decay=None, overrides=None,
                 tied: str | None = None, allow_smaller_width: bool = False,
                 optimizer=None, include_frozen: bool = False) -> ScalingPlan:
    """Roles and scaled hyperparameters for ``model``, without building an optimizer.

    ``lr``: base LR tuned at ``base_width``, a number or ``{role: lr}`` (every role present in
    the model must then be given). ``weight_decay``: a number for embeddings, hidden matrices
    and the output layer (vectors take 0), or ``{role: wd}`` (missing roles: the optimizer's
    default, vectors 0); default: the optimizer's default. Under AdamH hidden matrices are on
    the hyperball and take no weight decay. ``optimizer``: the optimizer class the plan is for
    (the default weight decay, the hyperball groups, the table's algorithm column).
    """
    alpha = exponents(rule, embedding_exponent)
    if width is None:
        width = model_width(model)
        if width is None:
            raise ValueError(f"cannot read the width of {type(model).__name__}: no config hidden_size / "
                             f"n_embd / d_model and no embedding; pass width=...")
    _check_width(width, base_width, alpha, allow_smaller_width)
    entries = detect_roles(model, overrides=overrides, tied=tied, include_frozen=include_frozen)
    present = {e.role for e in entries if e.trainable}
    if not present:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")

    if isinstance(lr, Mapping):
        lrs = _per_role(lr, "lr", lambda r: None)
        missing = [r for r in ROLES if r in present and lrs[r] is None]
        if missing:
            raise ValueError(f"lr is a per-role mapping but has no entry for role(s) {missing} present in "
                             f"the model; give every role in {sorted(present)}")
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
        raise ValueError(f"weight_decay={wds['hidden']} for hidden matrices under {optimizer.__name__}: they "
                         f"are on the hyperball, whose norm is fixed, so they take no weight decay")

    vocab = vocab_size(model)
    if rule == "lv" and embedding_exponent is None and vocab is not None and vocab < width:
        warnings.warn(f"lvopt: rule 'lv' with vocabulary {vocab} < width {width}: the LV analysis "
                      f"(Hayou & Liu 2025) assumes a vocabulary much larger than the width; with a small "
                      f"vocabulary it predicts the muP exponent (rule='mup')", UserWarning, stacklevel=_user_stacklevel())
    name = getattr(optimizer, "__name__", "optimizer").lower() if optimizer is not None else "-"
    return ScalingPlan(entries, rule, alpha, float(width), float(base_width), vocab,
                       {r: (float(v) if v is not None else None) for r, v in lrs.items()},
                       {r: float(v) for r, v in wds.items()}, hyperball, name)


def from_model(opt_cls, model: nn.Module, *, lr, base_width, rule: str = "lv", width=None,
               embedding_exponent: float | None = None, weight_decay=None, overrides=None,
               tied: str | None = None, allow_smaller_width: bool = False, verbose: bool = False,
               **optimizer_kwargs):
    """``opt_cls(groups, **optimizer_kwargs)`` with one param group per role whose ``lr`` is the
    base LR scaled by ``rule`` from ``base_width`` to the model's ``width``.

    ``lvopt.AdamW.from_model(model, ...)`` and ``lvopt.AdamH.from_model(model, ...)`` call
    this; any ``torch.optim`` class works as ``opt_cls`` too. The plan (roles, LRs, table) is
    kept on the optimizer as ``optimizer.scaling_plan``; ``verbose=True`` prints its table.
    See :func:`scaling_plan` for the arguments. LR schedulers multiply every group's LR by the
    same factor, so the ratios set here hold along the schedule.
    """
    for key in ("params", "lr", "weight_decay"):
        if key in optimizer_kwargs:
            raise TypeError(f"from_model() got {key!r} twice")
    plan = scaling_plan(model, lr=lr, base_width=base_width, rule=rule, width=width,
                        embedding_exponent=embedding_exponent, weight_decay=weight_decay,
                        overrides=overrides, tied=tied, allow_smaller_width=allow_smaller_width,
                        optimizer=opt_cls)
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
        raise ValueError(f"{type(model).__name__} has no output layer lvopt can find (no "
                         f"get_output_embeddings() and no linear of the token embedding's shape)")
    return mods


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

    return [m.register_forward_hook(hook) for m, _ in mods]


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
            raise ValueError("the output layer is tied to the input embeddings; re-initialising it would "
                             "change the embeddings. Use apply_output_multiplier for tied weights")
        mod.weight.normal_(0.0, std)
        if getattr(mod, "bias", None) is not None:
            mod.bias.zero_()
