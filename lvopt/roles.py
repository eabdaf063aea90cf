"""Parameter roles: which parameters of a model are input embeddings, the output layer,
hidden matrices or vectors (docs/design.md section 3, "Scaling rules"; docs/scaling.md).

Detection works on any ``nn.Module`` without importing anything model-specific:

* ``embedding``: the weight of every embedding-like module, i.e. a module with
  ``num_embeddings`` and ``embedding_dim`` attributes and a 2-D ``weight`` of that shape
  (``nn.Embedding``, ``nn.EmbeddingBag``, ``lvopt.nn.Embedding``, Hugging Face subclasses),
  and whatever a Hugging Face model's ``get_input_embeddings()`` returns. Position tables
  (GPT-2's ``wpe``) are embeddings too: they are input weights in muP's sense.
* ``output``: the weight of ``get_output_embeddings()`` where the model has one; otherwise of
  every linear-like module (``in_features``/``out_features`` and a 2-D weight) whose weight
  *is* the token embedding (tied) or has the token embedding's shape (vocab x width).
* ``hidden``: every other parameter with two or more dimensions.
* ``vector``: every parameter with fewer than two dimensions (biases, norm gains), output
  bias included.

Tied input/output weights are one tensor, so they can take only one role. By default it is
``embedding`` (as the ``mup`` package does for a shared readout: the tensor's shape is
vocab x width, an input weight's; the output side's width scaling belongs to an output
multiplier in the forward pass, see :func:`lvopt.scaling.apply_output_multiplier`), and a
:class:`TiedWeightsWarning` says so. ``tied="embedding"`` or ``tied="output"`` states the
choice and silences the warning; an override naming the tensor does too.

Overrides map ``fnmatch`` patterns (matched against every name a tensor has, aliases included)
to roles. A pattern that matches nothing, an unknown role, and a tensor given two different
roles are errors.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

ROLES = ("embedding", "hidden", "output", "vector")

__all__ = [
    "ROLES",
    "ParamRole",
    "TiedWeightsWarning",
    "detect_roles",
    "token_embedding",
    "output_modules",
    "check_role",
]


class TiedWeightsWarning(UserWarning):
    """The model ties its input and output embeddings; see :mod:`lvopt.roles`."""


@dataclass
class ParamRole:
    """One trainable tensor of a model and its role. ``names`` lists every name the tensor has
    (more than one when it is shared, e.g. tied embeddings); ``name`` is the first."""

    names: list
    param: torch.Tensor
    role: str
    reason: str
    tied: bool = False
    trainable: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside lvopt, so that a warning
    points at the user's call whichever lvopt entry point led to it."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    return level


def check_role(role, where: str) -> str:
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; a role is one of {', '.join(ROLES)}")
    return role


def _is_embedding_like(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    ne, ed = getattr(m, "num_embeddings", None), getattr(m, "embedding_dim", None)
    return (
        isinstance(w, torch.Tensor)
        and isinstance(ne, int)
        and isinstance(ed, int)
        and w.dim() == 2
        and tuple(w.shape) == (ne, ed)
    )


def _is_linear_like(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        isinstance(w, torch.Tensor)
        and w.dim() == 2
        and isinstance(getattr(m, "in_features", None), int)
        and isinstance(getattr(m, "out_features", None), int)
        and not _is_embedding_like(m)
    )


def _hf_module(model: nn.Module, getter: str):
    """``model.get_input_embeddings()`` / ``get_output_embeddings()`` where the model has it and
    it returns a module with a weight; None otherwise (many base models raise or return None)."""
    fn = getattr(model, getter, None)
    if not callable(fn):
        return None
    try:
        m = fn()
    except (NotImplementedError, AttributeError):
        return None
    if isinstance(m, nn.Module) and isinstance(getattr(m, "weight", None), torch.Tensor):
        return m
    return None


def token_embedding(model: nn.Module):
    """The module holding the input token embeddings: ``get_input_embeddings()`` where the model
    has it, else the embedding-like module with the most rows (the vocabulary); None if none."""
    m = _hf_module(model, "get_input_embeddings")
    if m is not None:
        return m
    embs = [mod for mod in model.modules() if _is_embedding_like(mod)]
    return max(embs, key=lambda mod: mod.weight.shape[0]) if embs else None


def output_modules(model: nn.Module) -> list:
    """The output layer(s) (unembedding / LM head), as (module, reason) pairs."""
    m = _hf_module(model, "get_output_embeddings")
    if m is not None:
        return [(m, "get_output_embeddings()")]
    tok = token_embedding(model)
    if tok is None:
        return []
    found = []
    for mod in model.modules():
        if not _is_linear_like(mod) or mod is tok:
            continue
        if mod.weight is tok.weight:
            found.append((mod, "linear sharing the token embedding's weight"))
        elif tuple(mod.weight.shape) == tuple(tok.weight.shape):
            found.append((mod, f"linear of the token embedding's shape {tuple(tok.weight.shape)}"))
    return found


def detect_roles(
    model: nn.Module, overrides: Mapping[str, str] | None = None, tied: str | None = None, include_frozen: bool = False
) -> list:
    """Every parameter tensor of ``model`` once, with its role, in ``named_parameters`` order.

    ``overrides``: ``{pattern: role}``, ``fnmatch`` patterns over parameter names (a shared
    tensor matches through any of its names). ``tied``: the role of a tensor that is both an
    input embedding and the output layer, ``"embedding"`` (the default, with a
    :class:`TiedWeightsWarning` unless given explicitly) or ``"output"``. Frozen tensors
    (``requires_grad=False``) are left out unless ``include_frozen``; they are then listed with
    ``trainable=False``.
    """
    if tied is not None and tied not in ("embedding", "output"):
        raise ValueError(f"tied must be 'embedding', 'output' or None, got {tied!r}")
    overrides = dict(overrides or {})
    for pat, role in overrides.items():
        if not isinstance(pat, str):
            raise TypeError(f"override pattern {pat!r} must be a string")
        check_role(role, f"override {pat!r}")

    entries: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        e = entries.get(id(p))
        if e is None:
            entries[id(p)] = ParamRole([name], p, "", "")
        else:
            e.names.append(name)

    emb_ids, out_reason = {}, {}
    tok = token_embedding(model)
    for mod in model.modules():
        if _is_embedding_like(mod) or mod is tok:
            emb_ids.setdefault(
                id(mod.weight), "input embeddings" if mod is tok else f"embedding ({type(mod).__name__})"
            )
    if tok is not None:
        emb_ids[id(tok.weight)] = "input embeddings"
    for mod, reason in output_modules(model):
        out_reason.setdefault(id(mod.weight), f"output: {reason}")

    matched = {pat: 0 for pat in overrides}
    result, tied_entries = [], []
    for key, e in entries.items():
        hits = {}
        for pat, role in overrides.items():
            if any(fnmatch.fnmatchcase(n, pat) for n in e.names):
                hits[pat] = role
                matched[pat] += 1
        e.trainable = bool(e.param.requires_grad)
        is_emb, is_out = key in emb_ids, key in out_reason
        e.tied = is_emb and is_out
        if len(set(hits.values())) > 1:
            raise ValueError(
                f"parameter {' = '.join(repr(n) for n in e.names)} is matched by overrides "
                f"{', '.join(f'{k!r} -> {v!r}' for k, v in hits.items())}: a parameter can be "
                f"in only one group; make the patterns disjoint"
            )
        if hits:
            pat, e.role = next(iter(hits.items()))
            e.reason = f"override {pat!r}"
        elif e.tied:
            e.role = tied or "embedding"
            e.reason = f"tied input/output embeddings -> {e.role}"
            if tied is None and e.trainable:
                tied_entries.append(e)
        elif is_emb:
            e.role, e.reason = "embedding", emb_ids[key]
        elif is_out:
            e.role, e.reason = "output", out_reason[key]
        elif e.param.dim() >= 2:
            e.role, e.reason = "hidden", f"{e.param.dim()}-D"
        else:
            e.role, e.reason = "vector", f"{e.param.dim()}-D"
        if e.trainable or include_frozen:
            result.append(e)

    unmatched = [pat for pat, n in matched.items() if n == 0]
    if unmatched:
        raise ValueError(
            f"override pattern(s) {', '.join(map(repr, unmatched))} match no parameter of "
            f"{type(model).__name__}; patterns are fnmatch globs over names such as "
            f"{next(iter(entries.values())).name if entries else '<none>'!r}"
        )
    for e in tied_entries:
        warnings.warn(
            f"lvopt: input and output embeddings are tied ({' = '.join(repr(n) for n in e.names)}); the "
            f"shared tensor takes one role, 'embedding' (its LR follows the embedding rule; the output "
            f"side's width scaling needs an output multiplier in the forward pass, see "
            f"lvopt.scaling.apply_output_multiplier). Pass tied='embedding' to accept this silently, or "
            f"tied='output' to use the output-layer rule.",
            TiedWeightsWarning,
            stacklevel=_user_stacklevel(),
        )
    return result
