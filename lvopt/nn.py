"""lvopt.nn.Embedding: a drop-in ``nn.Embedding`` whose gradient is row-sparse and whose rows
are brought current (exact sparse mode) before the forward pass reads them."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import _backend

__all__ = ["Embedding", "ReferenceCoalesceWarning", "ShardedEmbedding", "sparsify_embeddings"]


class ReferenceCoalesceWarning(UserWarning):
    """lvopt.nn.Embedding's backward summed duplicate rows with the pure-PyTorch reference
    because no native coalesce_rows kernel serves the gradient's device and dtype."""


_reference_coalesce_warned: set = set()


def _coalesce_rows(flat: Tensor, values: Tensor, v: int) -> tuple:
    """(sorted distinct rows, their summed gradient rows): lvopt::coalesce_rows where a native
    kernel serves the device and dtype, else the reference, with a warning once per (device
    type, dtype, reason) that says why and how to get the native kernel: on a GPU the
    reference's index_add_ does not sum duplicates in input order, so it is not deterministic."""
    dev = values.device.type
    if dev not in ("cpu", "cuda"):
        why = f"lvopt has no native kernels for device type {dev!r}"
    elif values.dtype not in (torch.float32, torch.bfloat16):
        why = f"the native kernels take float32 and bfloat16, not {values.dtype}"
    else:
        why = _backend.unavailable_reason(dev)
        if why is not None and dev == "cuda":
            why += f"; to get the native kernels, {_backend.NATIVE_CUDA_HOWTO}"
    if why is None:
        return torch.ops.lvopt.coalesce_rows(flat, values.contiguous(), v)
    key = (dev, values.dtype, why)
    if key not in _reference_coalesce_warned:
        _reference_coalesce_warned.add(key)
        warnings.warn(
            f"lvopt.nn.Embedding: the gradient's duplicate rows are summed by the pure-PyTorch "
            f"reference (lvopt.reference.coalesce_rows; on a GPU its order of summation is not "
            f"deterministic) because {why}",
            ReferenceCoalesceWarning,
            stacklevel=3,
        )
    from .reference import coalesce_rows

    return coalesce_rows(flat, values, v)


class _RowSparseEmbedding(torch.autograd.Function):
    """Forward: weight[ids]. Backward: a torch.sparse_coo gradient, never a dense V x d tensor:
    on the CPU coalesced over the distinct ids (lvopt::coalesce_rows: sorted, duplicates summed
    in input order), U x d values; on a GPU the N ids as given with their gradient rows (padding
    entries zeroed), since coalescing there would size a tensor by the data (a host read); the
    optimizer's row-sparse step sorts and sums them in input order, so the result is the same.
    With padding_idx on a GPU the padding row is then a touched row with a zero gradient: in
    exact mode that is what it is anyway (dense AdamW steps it with g = 0); in lazy mode its
    moments decay and its weight decays when it appears in a batch."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, padding_idx: int | None):
        ctx.save_for_backward(ids)
        ctx.shape = weight.shape
        ctx.padding_idx = padding_idx
        return weight.index_select(0, ids.reshape(-1)).reshape(*ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ids,) = ctx.saved_tensors
        v, d = ctx.shape
        flat = ids.reshape(-1)
        values = grad_out.reshape(-1, d)
        if values.device.type != "cpu":
            # On a GPU the gradient is not coalesced here: the number of distinct ids is the
            # data's, and sizing a tensor by it reads device memory on the host. The N ids as
            # given (padding entries' rows zeroed) go to the optimizer, whose step sorts them once
            # (lvopt/sparse.py: no host read anywhere).
            if ctx.padding_idx is not None:
                values = values.masked_fill((flat == ctx.padding_idx).unsqueeze(1), 0)
            # check_invariants=False: forward's index_select has range-checked the ids, and a
            # check here would read them on the host (and warn that checks are off by default).
            grad = torch.sparse_coo_tensor(flat.unsqueeze(0), values, (v, d), check_invariants=False)
            return grad, None, None
        if ctx.padding_idx is not None:
            keep = flat != ctx.padding_idx
            flat, values = flat[keep], values[keep]
        rows, summed = _coalesce_rows(flat, values, v)
        grad = torch.sparse_coo_tensor(rows.unsqueeze(0), summed, (v, d), is_coalesced=True, check_invariants=False)
        return grad, None, None


class Embedding(nn.Embedding):
    """``nn.Embedding`` with row-sparse gradients for lvopt.AdamW.

    The gradient is a coalesced ``torch.sparse_coo`` tensor over the batch's distinct ids (as
    ``nn.Embedding(sparse=True)`` gives, but coalesced deterministically), so no V x d gradient
    exists. In ``sparse_mode="exact"`` the optimizer keeps each row's last step; the forward
    pass asks it to bring the batch's rows current before reading them, so every value read
    equals what dense AdamW would hold. ``max_norm`` and ``scale_grad_by_freq`` are not
    supported. If the weight is tied to an output layer its gradient is dense, and lvopt.AdamW
    steps it densely (with a warning that says so).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = True,
        _weight: Tensor | None = None,
        _freeze: bool = False,
        device=None,
        dtype=None,
    ):
        if max_norm is not None or scale_grad_by_freq:
            raise NotImplementedError("lvopt.nn.Embedding supports neither max_norm nor scale_grad_by_freq")
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, None, norm_type, False, True, _weight, _freeze, device, dtype
        )
        self.weight._lvopt_embedding = True

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Embedding":
        """An lvopt.nn.Embedding sharing ``emb``'s weight tensor."""
        new = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
            _weight=emb.weight.data,
            device=emb.weight.device,
            dtype=emb.weight.dtype,
        )
        new.weight = emb.weight
        emb.weight._lvopt_embedding = True
        return new

    def forward(self, ids: Tensor) -> Tensor:
        w = self.weight
        owner_ref = getattr(w, "_lvopt_row_owner", None)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None:
            owner.catch_up(w, ids)
        if ids.dtype != torch.int64:
            ids = ids.long()
        return _RowSparseEmbedding.apply(w, ids, self.padding_idx)


def sparsify_embeddings(model: nn.Module) -> dict:
    """Makes every untied input embedding of ``model`` an :class:`Embedding` (row-sparse
    gradients), in place; returns ``{name: new module}`` of what it swapped (every name of a
    module that appears under several).

    Each ``torch.nn.Embedding`` whose weight no other module holds is replaced, at every place
    the model holds it, by an :class:`Embedding` that keeps *the same* ``Parameter`` object (so
    device, dtype, values, ``requires_grad``, optimizer references and tying detection are
    unchanged), ``padding_idx`` and the training flag. Call it before or after building the
    optimizer. Left as they are:

    * tied embeddings (the weight is also another module's, e.g. an output layer's): their
      gradient is dense anyway; a :class:`~lvopt.DenseEmbeddingGradWarning` names them;
    * frozen ones (``requires_grad=False``): no gradient, nothing to gain;
    * ones that already are an :class:`Embedding`.

    Refused, before anything is swapped (``ValueError``/``TypeError`` naming the module):
    ``max_norm`` and ``scale_grad_by_freq`` (lvopt's embedding supports neither), a subclass of
    ``nn.Embedding`` with its own ``forward`` (it would be lost), and forward hooks on the module.
    """
    from .optim import DenseEmbeddingGradWarning

    owners: dict = {}  # id(weight) -> ids of the modules holding it
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(mod))
    names: dict = {}  # id(module) -> every qualified name it has
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)

    todo, tied = [], []
    for mod in {id(m): m for m in model.modules()}.values():
        if not isinstance(mod, nn.Embedding) or isinstance(mod, Embedding):
            continue
        where = f"{' = '.join(repr(n or '<model>') for n in names[id(mod)])} ({type(mod).__name__})"
        if "" in names[id(mod)]:
            raise TypeError(
                "sparsify_embeddings: the model itself is an nn.Embedding; use lvopt.nn.Embedding.from_embedding(model)"
            )
        if len(owners.get(id(mod.weight), ())) > 1:
            tied.append(where)
            continue
        if not mod.weight.requires_grad:
            continue
        if mod.max_norm is not None or mod.scale_grad_by_freq:
            raise ValueError(
                f"sparsify_embeddings: embedding {where} has max_norm={mod.max_norm}, "
                f"scale_grad_by_freq={mod.scale_grad_by_freq}; lvopt.nn.Embedding supports "
                f"neither. Nothing was swapped"
            )
        if type(mod).forward is not nn.Embedding.forward:
            raise TypeError(
                f"sparsify_embeddings: embedding {where} is a subclass of nn.Embedding with its own "
                f"forward, which swapping would lose. Nothing was swapped"
            )
        if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks:
            raise TypeError(
                f"sparsify_embeddings: embedding {where} has hooks registered, which swapping would "
                f"lose. Nothing was swapped"
            )
        todo.append(mod)

    swapped = {}
    for old in todo:
        new = Embedding.from_embedding(old)
        new.train(old.training)
        for name in names[id(old)]:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            swapped[name] = new
    if tied:
        warnings.warn(
            f"lvopt: sparsify_embeddings left {', '.join(tied)} dense: the weight is tied to another "
            f"module (most likely the output layer, whose gradient covers all rows), so its gradient "
            f"is dense and lvopt.AdamW steps it densely; the row-sparse step applies to untied input "
            f"embeddings only",
            DenseEmbeddingGradWarning,
            stacklevel=2,
        )
    return swapped


from .distributed import ShardedEmbedding  # noqa: E402  (it builds on _coalesce_rows above)
