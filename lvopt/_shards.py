"""AdamH on sharded (FSDP2 DTensor) matrices: the collectives between the two passes.

AdamH's second pass needs three sums over the whole matrix (||u||^2, <W,u>, ||W||^2,
docs/design.md section 2.2) and its radius R = ||W_0||. Every Shard placement of a DTensor
splits the elements of the matrix among the ranks of one mesh dimension (Shard(0) by rows,
Shard(1) by columns, FSDP2's strided shards alike), so the sums of the whole matrix are the sums
of the ranks' local sums: lvopt.AdamH runs pass 1 (lvopt::fused_adamh_reduce_) on each rank's
local shard, all-reduces the [n, 3] fp64 sums of all its sharded matrices in ONE collective (24
bytes per matrix), and runs pass 2 (lvopt::fused_adamh_apply_) with the whole matrices' sums.
The step is then the unsharded step, up to the order of fp64 additions. R is set the same way
at a matrix's first step: one all-reduce of the local ||W_0||^2 of every new sharded matrix.

Nothing here depends on the backend of the process group: the same code runs on gloo (CPU
tensors) and NCCL (CUDA tensors), the sums living where the kernels put them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def _dist():
    import torch.distributed as dist

    return dist


def shard_group(p: Tensor, where: Callable[[], str]):
    """The process group over which the local sums of the DTensor hyperball matrix ``p`` are
    all-reduced: the one mesh dimension it is sharded along; None when every placement is
    Replicate (each rank holds the whole matrix). Raises TypeError for a layout AdamH cannot
    step: a Partial placement (a pending reduction: the local values are not the matrix's), or
    shards along more than one mesh dimension (2-D sharding: the sums would need a group
    spanning several mesh dimensions)."""
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            dims.append(i)
        elif not isinstance(pl, Replicate):
            raise TypeError(
                f"{where()}: AdamH cannot step a hyperball matrix with a {type(pl).__name__} "
                f"placement ({pl}; placements {tuple(p.placements)}): its local values are not "
                f"elements of the matrix; only Shard and Replicate placements are supported. "
                f"Redistribute the parameter, or put it in a group with hyperball=False (AdamW)"
            )
    if not dims:
        return None
    if len(dims) > 1:
        raise TypeError(
            f"{where()}: AdamH steps a hyperball matrix sharded along one mesh dimension; "
            f"this one is sharded along mesh dimensions {dims} (placements "
            f"{tuple(p.placements)}); shard it along one dimension (FSDP2, HSDP), or put it in a "
            f"group with hyperball=False (AdamW)"
        )
    return p.device_mesh.get_group(mesh_dim=dims[0])


def hyperball_group(sharded: Iterable[tuple[Tensor, Callable[[], str]]]):
    """The one process group of a step's sharded hyperball matrices (``(param, where)`` pairs)
    and the parameters that need it: (group or None, set of ids). Raises before anything is
    written when two matrices are sharded over different groups of ranks: their sums would
    need one all-reduce per group, which lvopt does not do (one collective per step)."""
    group, first, ids = None, None, set()
    for p, where in sharded:
        g = shard_group(p, where)
        if g is None:
            continue
        ids.add(id(p))
        if group is None:
            group, first = g, where
            ranks = _dist().get_process_group_ranks(g)
        elif g is not group and _dist().get_process_group_ranks(g) != ranks:
            raise ValueError(
                f"{where()}: sharded over the ranks {_dist().get_process_group_ranks(g)}, "
                f"but {first()} is sharded over the ranks {ranks}; lvopt.AdamH all-reduces the "
                f"sums of all sharded hyperball matrices of a step in one collective, over one "
                f"group: shard them over the same ranks, or step them with separate optimizers"
            )
    return group, ids


def local_radius_squared(local: Tensor, device: torch.device) -> Tensor:
    """||W_0||^2 of a local shard in fp64: the radius before :func:`finish_radii`."""
    return torch.linalg.vector_norm(local.detach(), dtype=torch.float64).square().to(device)


def finish_radii(radii: list[Tensor], group) -> None:
    """Turns the local ||W_0||^2 in ``radii`` into the whole matrices' R = ||W_0||, in place:
    one all-reduce (8 bytes per new matrix) at the matrices' first step."""
    if not radii:
        return
    dev = radii[0].device
    total = torch.stack([r.reshape(()).to(dev) for r in radii])
    _dist().all_reduce(total, group=group)
    total.sqrt_()
    for r, x in zip(radii, total):
        r.copy_(x.reshape(r.shape))


def all_reduce_sums(sums: list[Tensor], group) -> list[Tensor]:
    """The [n_i, 3] fp64 sums of pass 1 of each batch, summed over ``group`` in ONE all-reduce
    (24 bytes per matrix); returned in the same pieces."""
    if len(sums) == 1:
        total = sums[0]
    else:
        dev = sums[0].device
        total = torch.cat([s.to(dev) for s in sums])
    _dist().all_reduce(total, group=group)
    if len(sums) == 1:
        return [total]
    out, i = [], 0
    for s in sums:
        out.append(total[i : i + s.shape[0]].to(s.device).contiguous())
        i += s.shape[0]
    return out
