"""The one recorder of host traffic that the sync-free and capturable tests use
(tests/test_sync_free.py, test_sparse_capture.py, test_capturable.py, test_triton_capturable.py):
a dispatch mode that sees every aten op under it and records what a CUDA graph or a
sync-free step may not do.

* ``reads``: every host read of a tensor's value, whatever its device (``.item()``, ``float()``,
  ``bool()``, ``torch.equal``: the ops in HOST_READ_OPS; ``.tolist()``, which a real CPU tensor
  answers without dispatching an op, as "tolist"). On CPU tensors this is the read a GPU run
  would make; on fake CUDA tensors FakeTensorMode raises DataDependentOutputException there too,
  after the recorder has seen it.
* ``downloads``: host reads of device memory and copies from a device to the host.
* ``uploads``: every copy from the host to a CUDA device, ``(op, shape, "blocking" | "async")``;
  a copy is asynchronous only with non_blocking=True from pinned memory (from pageable memory
  CUDA copies synchronously). ``blocking_uploads``: the op names of the blocking ones.
* ``ops``: every op's name, in order; ``lvopt_calls``: per lvopt op, ``(name, host arguments)``
  (the numbers and flags it gets from the host), to compare the host's work between steps.

The recorder answers pin_memory by marking the tensor pinned (a view of it counts as pinned
memory too): fake tensors do not implement it, and the real CPU tensors that lvopt makes outside
the fake mode (RowClock's host tables) cannot be pinned without a GPU. ``reset()`` starts a new
record; the pinned marks stay. tests/test_sync_free.py's test_a_host_read_is_caught checks that
each kind of traffic is caught.
"""

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal"})
COPY_OPS = frozenset({"_to_copy", "copy_", "to"})
LVOPT_NAMESPACES = ("lvopt", "lvopt_triton")


class _Tolist(TorchFunctionMode):
    """Tensor.tolist of a real CPU tensor reads its memory without dispatching an op (a fake
    tensor's dispatches _local_scalar_dense per element): recorded here, at the function level."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.recorder.reads.append("tolist")
        return func(*args, **(kwargs or {}))


class HostTraffic(TorchDispatchMode):
    """Use as ``with HostTraffic() as rec: ...``; the record is in its lists (module docstring)."""

    def __init__(self):
        super().__init__()
        self.pinned = {}  # id -> tensor (kept alive, so that ids stay unique)
        self.reset()

    def __enter__(self):
        self._tolist = _Tolist(self)
        self._tolist.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._tolist.__exit__(*exc)

    def reset(self):
        self.ops, self.lvopt_calls = [], []
        self.reads, self.downloads, self.uploads = [], [], []

    @property
    def blocking_uploads(self):
        return [name for name, _, kind in self.uploads if kind == "blocking"]

    def _is_pinned(self, t):
        return id(t) in self.pinned or (t._base is not None and id(t._base) in self.pinned)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._pin_memory.default:
            self.pinned[id(args[0])] = args[0]
            return args[0]
        name = str(func.overloadpacket.__name__)
        self.ops.append(name)
        if name in HOST_READ_OPS:
            self.reads.append(name)
            if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                self.downloads.append(name)
        if name in COPY_OPS:
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
            if name == "copy_":
                nb = bool((len(args) > 2 and args[2]) or kwargs.get("non_blocking", False))
            else:
                nb = bool(kwargs.get("non_blocking", False))
            if src.device.type == "cpu" and dst.type == "cuda":
                kind = "async" if nb and self._is_pinned(src) else "blocking"
                self.uploads.append((name, tuple(src.shape), kind))
            if src.device.type == "cuda" and dst.type == "cpu":
                self.downloads.append(name)
        if getattr(func, "namespace", None) in LVOPT_NAMESPACES:
            plain = (int, float, bool, str, type(None))
            bound = dict(zip((a.name for a in func._schema.arguments), args))
            bound.update(kwargs)
            self.lvopt_calls.append((name, tuple(sorted((k, v) for k, v in bound.items() if isinstance(v, plain)))))
        return func(*args, **kwargs)


def fake_embedding_step(emb, lin, opt, V: int, N: int) -> None:
    """One training step of ``emb`` (an lvopt.nn.Embedding) and ``lin`` on fake CUDA tensors:
    N random ids, lvopt.nn.Embedding's own backward (its autograd Function called directly, as
    fake mode runs no autograd graph), unit gradients for ``lin``, ``opt.step()``, grads cleared."""
    from types import SimpleNamespace

    from lvopt.nn import _RowSparseEmbedding

    ids = torch.randint(0, V, (4, N // 4), device="cuda")
    out = emb(ids)
    ctx = SimpleNamespace(saved_tensors=(ids,), shape=emb.weight.shape, padding_idx=emb.padding_idx)
    emb.weight.grad, _, _ = _RowSparseEmbedding.backward(ctx, torch.ones_like(out))
    for q in lin.parameters():
        q.grad = torch.ones_like(q)
    opt.step()
    opt.zero_grad(set_to_none=True)
