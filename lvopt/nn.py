"""lvopt.nn.Embedding: a drop-in ``nn.Embedding`` whose gradient is row-sparse and whose rows
are brought current (exact sparse mode) before the forward pass reads them."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _backend

__all__ = ["Embedding"]


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
            return torch.sparse_coo_tensor(flat.unsqueeze(0), values, (v, d)), None, None
        if ctx.padding_idx is not None:
            keep = flat != ctx.padding_idx
            flat, values = flat[keep], values[keep]
        native = values.device.type if values.device.type in ("cpu", "cuda") else None
        if native and values.dtype in (torch.float32, torch.bfloat16) and _backend.unavailable_reason(native) is None:
            rows, summed = torch.ops.lvopt.coalesce_rows(flat, values.contiguous(), v)
        else:
            from .reference import coalesce_rows

            rows, summed = coalesce_rows(flat, values, v)
        grad = torch.sparse_coo_tensor(rows.unsqueeze(0), summed, (v, d), is_coalesced=True)
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

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = True, _weight: Tensor | None = None, _freeze: bool = False,
                 device=None, dtype=None):
        if max_norm is not None or scale_grad_by_freq:
            raise NotImplementedError("lvopt.nn.Embedding supports neither max_norm nor scale_grad_by_freq")
        super().__init__(num_embeddings, embedding_dim, padding_idx, None, norm_type, False, True,
                         _weight, _freeze, device, dtype)
        self.weight._lvopt_embedding = True

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Embedding":
        """An lvopt.nn.Embedding sharing ``emb``'s weight tensor."""
        new = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, _weight=emb.weight.data,
                  device=emb.weight.device, dtype=emb.weight.dtype)
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
