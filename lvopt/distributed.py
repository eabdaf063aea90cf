"""A row-sharded embedding with exact sparse rows across ranks (docs/distributed.md).

:class:`ShardedEmbedding` splits a V x d table by rows over the ranks of a process group: rank r
holds rows ``[r*B, min((r+1)*B, V))`` with ``B = ceil(V/P)`` (the layout of a DTensor
``Shard(0)``, so a checkpoint saved on P ranks loads on any other number), and only an optimizer
on rank r holds (and steps) their moments. One step, per rank, with U distinct ids in its batch:

forward
    the distinct ids are grouped by owner (they are sorted, and owners hold contiguous blocks);
    one ``all_to_all_single`` exchanges, per pair of ranks, ``[count, bad, lo, hi]`` (how many
    ids go there, and the sender's id range: every rank learns whether any rank holds an id
    outside [0, V) and raises before anything is written); a second sends the ids to their
    owners; each owner brings the rows it was asked for current (exact mode: the optimizer's
    catch-up, as :class:`lvopt.nn.Embedding` does) and a third sends the rows back.
backward
    each rank sums its gradient rows per distinct id (lvopt::coalesce_rows: in input order), a
    fourth ``all_to_all_single`` sends them to the owners, and each owner merges what it got
    (coalesce_rows again: sorted, duplicates summed in the order of the sending ranks) into a
    coalesced ``torch.sparse_coo`` gradient of its local shard. A plain :class:`lvopt.AdamW`
    with a ``sparse_mode`` of ``"exact"`` or ``"lazy"`` steps it: the row-sparse step, on the
    owner's rows only.

Everything goes through ``torch.distributed`` collectives on the weight's device: the code is the
same for gloo (CPU) and NCCL (CUDA); only the process group's backend differs. The split sizes
of an all-to-all must be known on the host, so a forward reads the counts and the ranks' verdicts
on the host once, after the first exchange (and ``torch.unique`` sizes its output by the data):
on a GPU two synchronisations per forward, as in every row-wise sharded embedding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn import _coalesce_rows

__all__ = ["ShardedEmbedding", "shard_bounds"]

GRAD_REDUCTIONS = ("mean", "sum")
_INIT_CHUNK = 4096  # rows drawn from one seeded generator by the default initialisation


def shard_bounds(num_embeddings: int, world_size: int) -> list:
    """The first row of each rank's block and V at the end (P + 1 numbers): ``B = ceil(V/P)``
    rows a rank, the last blocks shorter (possibly empty), as ``torch.chunk`` and a DTensor
    ``Shard(0)`` lay rows out."""
    block = -(-num_embeddings // world_size)
    return [min(r * block, num_embeddings) for r in range(world_size)] + [num_embeddings]


class _Route:
    """Where one forward's ids went: the sender's distinct ids and each id's position among them,
    the split sizes of both directions, and (on the owner) the local rows it was asked for."""

    __slots__ = ("uniq", "inverse", "send", "recv", "local", "keep")


class _ShardedLookup(torch.autograd.Function):
    """weight (the local shard) -> the batch's rows, routed through the owners; backward: a
    coalesced row-sparse gradient of the local shard (see the module docstring)."""

    @staticmethod
    def forward(ctx, weight: Tensor, emb: "ShardedEmbedding", route: _Route):
        ctx.emb, ctx.route, ctx.shape = emb, route, weight.shape
        rows = weight.index_select(0, route.local)
        got = weight.new_empty((route.uniq.numel(), weight.shape[1]))
        emb._all_to_all(got, rows, route.send, route.recv, "rows")
        return got.index_select(0, route.inverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        emb, route = ctx.emb, ctx.route
        v_local, d = ctx.shape
        g = grad_out.reshape(-1, d)
        # Per distinct id: its rows summed in input order (every id of uniq occurs in inverse,
        # so the sums come out in uniq's order).
        _, summed = _coalesce_rows(route.inverse, g, route.uniq.numel())
        if emb.grad_reduction == "mean" and emb.world_size > 1:
            summed = summed / emb.world_size
        got = summed.new_empty((route.local.numel(), d))
        emb._all_to_all(got, summed.contiguous(), route.recv, route.send, "grads")
        rows, vals = route.local, got
        if route.keep is not None:
            rows, vals = rows[route.keep], vals[route.keep]
        rows, vals = _coalesce_rows(rows, vals, v_local)
        grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (v_local, d), is_coalesced=True, check_invariants=False)
        return grad, None, None


class ShardedEmbedding(nn.Module):
    """An embedding whose V x d table is split by rows over the ranks of ``process_group`` (the
    default group if None), with row-sparse gradients for :class:`lvopt.AdamW` on each rank's
    own block: per-rank memory for the table and its moments is about 1/P of the whole.

    Call it on every rank with that rank's ids (any shape, int64 or int32): every rank's
    forward (and backward) takes part in collectives, so all ranks must call it, the same
    number of times, in the same order. ``self.weight`` is the local block, an ordinary
    ``Parameter`` of ``rows_local x d``; give it to an :class:`lvopt.AdamW` param group with the
    ``sparse_mode`` you want (in exact mode the forward brings the rows it reads current).

    ``grad_reduction``: ``"mean"`` (default) divides the gradient by the world size, as
    DistributedDataParallel averages the rest of a data-parallel model's gradients (each rank's
    loss is the mean over its own batch); ``"sum"`` leaves it summed over ranks.

    ``padding_idx``: that row gets no gradient (and is zero at initialisation), as in
    ``nn.Embedding``. ``max_norm`` and ``scale_grad_by_freq`` are not supported (refused).

    Initialisation: N(0, 1) rows as ``nn.Embedding``, drawn in chunks of 4096 rows from
    generators seeded by ``seed + chunk`` (``seed``: drawn from rank 0's default generator and
    broadcast, if not given), so the table is the same for every number of ranks. ``_weight``
    (the full V x d table, on every rank) initialises from given values instead.

    Checkpoints: :meth:`state_dict` gives the weight as a DTensor ``Shard(0)`` (after
    :meth:`flush`), and :meth:`optim_state_dict` the moments, for ``torch.distributed.checkpoint``,
    which saves them on P ranks and loads them on any other number (see docs/distributed.md).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        max_norm: float | None = None,
        scale_grad_by_freq: bool = False,
        process_group=None,
        grad_reduction: str = "mean",
        seed: int | None = None,
        _weight: Tensor | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if max_norm is not None or scale_grad_by_freq:
            raise NotImplementedError(
                "lvopt.nn.ShardedEmbedding supports neither max_norm nor scale_grad_by_freq "
                f"(got max_norm={max_norm}, scale_grad_by_freq={scale_grad_by_freq})"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "lvopt.nn.ShardedEmbedding needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        if int(num_embeddings) <= 0 or int(embedding_dim) <= 0:
            raise ValueError(
                f"lvopt.nn.ShardedEmbedding: num_embeddings and embedding_dim must be positive, got "
                f"{num_embeddings} x {embedding_dim}"
            )
        if grad_reduction not in GRAD_REDUCTIONS:
            raise ValueError(
                f"lvopt.nn.ShardedEmbedding: grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}"
            )
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"lvopt.nn.ShardedEmbedding: padding_idx {padding_idx} is outside "
                    f"[-{num_embeddings}, {num_embeddings})"
                )
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self.grad_reduction = grad_reduction
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        self.bounds = shard_bounds(self.num_embeddings, self.world_size)
        self.row_start, self.row_end = self.bounds[self.rank], self.bounds[self.rank + 1]
        #: Bytes this rank sent to other ranks, by kind (meta, ids, rows, grads): what crossed
        #: between ranks, not a rank's copy to itself.
        self.bytes_sent: dict = {"meta": 0, "ids": 0, "rows": 0, "grads": 0}
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.get_default_dtype()
        local = torch.empty((self.row_end - self.row_start, self.embedding_dim), device=device, dtype=dtype)
        if _weight is not None:
            if tuple(_weight.shape) != (self.num_embeddings, self.embedding_dim):
                raise ValueError(
                    f"lvopt.nn.ShardedEmbedding: _weight has shape {tuple(_weight.shape)}, expected "
                    f"{(self.num_embeddings, self.embedding_dim)}"
                )
            with torch.no_grad():
                local.copy_(_weight[self.row_start : self.row_end])
        else:
            self._init_rows(local, seed)
        self.weight = nn.Parameter(local)
        self.weight._lvopt_embedding = True
        self._mesh = None

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def _init_rows(self, local: Tensor, seed: int | None) -> None:
        if seed is None:
            s = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(local.device)
            dist.broadcast(s, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
            seed = int(s.item())
        first = self.row_start // _INIT_CHUNK
        for chunk in range(first, math.ceil(self.row_end / _INIT_CHUNK)):
            lo, hi = chunk * _INIT_CHUNK, min((chunk + 1) * _INIT_CHUNK, self.num_embeddings)
            gen = torch.Generator().manual_seed(seed + chunk)
            rows = torch.randn((hi - lo, self.embedding_dim), generator=gen)
            a, b = max(lo, self.row_start), min(hi, self.row_end)
            local[a - self.row_start : b - self.row_start].copy_(rows[a - lo : b - lo])
        if self.padding_idx is not None and self.row_start <= self.padding_idx < self.row_end:
            local[self.padding_idx - self.row_start].zero_()

    # -- communication ------------------------------------------------------------------------
    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list, in_splits: list, kind: str) -> None:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.process_group)
        per_row = math.prod(inp.shape[1:]) * inp.element_size()
        self.bytes_sent[kind] += per_row * (sum(in_splits) - in_splits[self.rank])

    def _route(self, flat: Tensor) -> _Route:
        """The forward's first two exchanges (see the module docstring). Raises on every rank,
        having written nothing, if any rank holds an id outside [0, V)."""
        p, v = self.world_size, self.num_embeddings
        dev = self.weight.device
        flat = flat.to(dev)
        r = _Route()
        r.uniq, r.inverse = torch.unique(flat, sorted=True, return_inverse=True)
        # [count for that rank, bad, lo, hi] per destination, built on the device; the split sizes
        # and every rank's verdict come to the host in one read, after the exchange.
        meta = torch.zeros((p, 4), dtype=torch.int64, device=dev)
        bounds = torch.tensor(self.bounds, dtype=torch.int64, device=dev)
        meta[:, 0] = torch.searchsorted(r.uniq, bounds).diff()
        if r.uniq.numel():
            lo, hi = r.uniq[0], r.uniq[-1]
            meta[:, 1] = ((lo < 0) | (hi >= v)).to(torch.int64)
            meta[:, 2], meta[:, 3] = lo, hi
        else:
            meta[:, 3] = -1
        got = torch.empty_like(meta)
        self._all_to_all(got, meta, [1] * p, [1] * p, "meta")
        host = torch.cat([meta[:, 0], got.reshape(-1)]).tolist()  # the one host read of a forward
        got = [host[p + 4 * s : p + 4 * s + 4] for s in range(p)]
        offenders = [(s, m[2], m[3]) for s, m in enumerate(got) if m[1]]
        if offenders:
            where = ", ".join(f"rank {s} [{a}, {b}]" for s, a, b in offenders)
            raise ValueError(
                f"lvopt.nn.ShardedEmbedding: ids outside [0, {v}) (num_embeddings) on {where}; "
                f"refused on every rank before anything was looked up, exchanged or written"
            )
        r.send = host[:p]
        r.recv = [m[0] for m in got]
        ids = torch.empty(sum(r.recv), dtype=torch.int64, device=dev)
        self._all_to_all(ids, r.uniq, r.recv, r.send, "ids")
        r.keep = None
        if self.padding_idx is not None:
            r.keep = ids != self.padding_idx
        r.local = ids - self.row_start
        return r

    # -- forward ------------------------------------------------------------------------------
    def forward(self, ids: Tensor) -> Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"lvopt.nn.ShardedEmbedding: ids must be int64 or int32, got {ids.dtype}")
        route = self._route(ids.reshape(-1).long())
        w = self.weight
        owner_ref = getattr(w, "_lvopt_row_owner", None)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None and route.local.numel():
            owner.catch_up(w, route.local)  # exact mode: the rows asked for, current before they are read
        out = _ShardedLookup.apply(w, self, route)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.row_start}, {self.row_end}) of rank "
            f"{self.rank}/{self.world_size}"
        )
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s

    # -- exact-mode rows and checkpoints ------------------------------------------------------
    def _owner(self):
        ref = getattr(self.weight, "_lvopt_row_owner", None)
        return ref() if ref is not None else None

    @torch.no_grad()
    def flush(self) -> None:
        """Brings every row of this rank's block current (exact mode: the skipped zero-gradient
        steps of rows not touched since their last step); a no-op otherwise. Local: no
        communication. :meth:`state_dict` and :meth:`optim_state_dict` call it."""
        opt = self._owner()
        if opt is not None:
            opt._rows.raise_pending()
            opt._rows.flush_param(self.weight)

    def device_mesh(self):
        """The 1-D DeviceMesh of the process group, on the weight's device type."""
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            self._mesh = DeviceMesh.from_group(self.process_group, self.weight.device.type)
        return self._mesh

    def _sharded(self, local: Tensor):
        from torch.distributed.tensor import DTensor, Shard

        shape = (self.num_embeddings, *local.shape[1:])
        stride = tuple(int(math.prod(shape[i + 1 :])) for i in range(len(shape)))
        return DTensor.from_local(
            local, self.device_mesh(), [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )

    def _local_of(self, value, name: str) -> Tensor:
        """This rank's block of a saved table: a DTensor's local shard when it is laid out as
        this module's, else the rows [row_start, row_end) of the full tensor."""
        shape = (self.num_embeddings, self.embedding_dim)
        if tuple(value.shape) != shape:
            raise ValueError(f"lvopt.nn.ShardedEmbedding: {name} has shape {tuple(value.shape)}, expected {shape}")
        if hasattr(value, "to_local") and hasattr(value, "placements"):
            from torch.distributed.tensor import Shard

            if (
                tuple(value.placements) == (Shard(0),)
                and value.device_mesh.size() == self.world_size
                and value.to_local().shape[0] == self.row_end - self.row_start
            ):
                return value.to_local()
            value = value.full_tensor()
        return value[self.row_start : self.row_end]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush()
        w = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "weight"] = self._sharded(w)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        try:
            local = self._local_of(state_dict[key], key)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        with torch.no_grad():
            if local.data_ptr() != self.weight.data_ptr():
                self.weight.copy_(local)
        opt = self._owner()
        if opt is not None and opt.state.get(self.weight):
            opt._rows.drop(self.weight)  # every row is current at the step the state holds

    @torch.no_grad()
    def optim_state_dict(self, optimizer) -> dict:
        """``{"exp_avg", "exp_avg_sq": DTensor Shard(0), "step": tensor}``: ``optimizer``'s state
        of this table after :meth:`flush` (every row current, so no per-row bookkeeping is
        needed). With no state yet it is created (zeros at step 0), so that a fresh optimizer
        gives ``torch.distributed.checkpoint.load`` tensors to load into; then pass the loaded
        dict to :meth:`load_optim_state_dict`."""
        p = self.weight
        if not any(q is p for g in optimizer.param_groups for q in g["params"]):
            raise ValueError(
                "lvopt.nn.ShardedEmbedding.optim_state_dict: the optimizer does not hold this embedding's weight"
            )
        self.flush()
        st = optimizer._init_state(p, "adamw")
        return {
            "exp_avg": self._sharded(st["exp_avg"]),
            "exp_avg_sq": self._sharded(st["exp_avg_sq"]),
            "step": st["step"],
        }

    @torch.no_grad()
    def load_optim_state_dict(self, optimizer, state: dict) -> None:
        """Puts a state from :meth:`optim_state_dict` (as loaded by
        ``torch.distributed.checkpoint``, on any number of ranks; or full tensors) into
        ``optimizer``: this rank's rows of the moments and the step count; every row is then
        current at that step. Checked before anything is written."""
        p = self.weight
        missing = [k for k in ("exp_avg", "exp_avg_sq", "step") if k not in state]
        if missing:
            raise ValueError(f"lvopt.nn.ShardedEmbedding.load_optim_state_dict: missing {missing}")
        m = self._local_of(state["exp_avg"], "exp_avg")
        v = self._local_of(state["exp_avg_sq"], "exp_avg_sq")
        step = float(state["step"])
        st = optimizer._init_state(p, "adamw")
        for key, val in (("exp_avg", m), ("exp_avg_sq", v)):
            if val.data_ptr() != st[key].data_ptr():
                st[key].copy_(val)
        st["step"].fill_(step)
        optimizer._rows.drop(p)
