"""Backend selection: explicit, visible, never a silent fallback.

``"cpu"`` and ``"cuda"`` are the native kernels of lvopt._C (csrc/cpu, csrc/cuda), reached
through the ``torch.ops.lvopt`` dispatcher; ``"triton"`` the kernels of lvopt/triton;
``"reference"`` the pure-PyTorch oracle of lvopt/reference.py. The default for a device is
the native kernel built for it; if that was not built, the optimizer raises, says how to get
the native kernels and which backends are available (an explicit ``backend="triton"`` or
``"reference"`` is always honoured). Nothing here picks a different backend than asked for.
"""

from __future__ import annotations

import os
import torch

from . import _ops, reference

BACKENDS = ("cpu", "cuda", "triton", "reference")


def _native_cuda() -> bool:
    return _ops.native_available() and bool(_ops._C.build_info()["cuda"])


# Answers of unavailable_reason, once per process (what it looks at does not change once triton
# is imported), so that a step traced by torch.compile finds them in a dict instead of tracing
# importlib.
_REASONS: dict = {}
_TRITON_OPS = None


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run in this process, else why not."""
    if name in _REASONS:
        return _REASONS[name]
    why = _unavailable_reason(name)
    if name == "triton" and why is None:
        _REASONS[name] = why  # the others are cheap; a missing triton may be installed later
    elif name != "triton":
        _REASONS[name] = why
    return why


def _unavailable_reason(name: str) -> str | None:
    if name == "reference":
        return None
    if name == "cpu":
        if not _ops.native_available():
            return f"the native extension lvopt._C did not load ({_ops.NATIVE_ERROR}); rebuild with `make dev`"
        return None
    if name == "cuda":
        if not _ops.native_available():
            return f"the native extension lvopt._C did not load ({_ops.NATIVE_ERROR})"
        if not _native_cuda():
            return "lvopt._C was built without CUDA kernels (see lvopt.build_info())"
        return None
    if name == "triton":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            return (
                "the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 (set before triton is "
                "imported) to run on CPU tensors"
            )
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def check_available(name: str) -> None:
    why = unavailable_reason(name)
    if why is not None:
        raise RuntimeError(f"lvopt backend {name!r} is not available: {why}. Available here: {available()}")
    if name == "triton" and _TRITON_OPS is None:
        _import_triton_ops()  # now, not inside a step that torch.compile traces


def available() -> list:
    """The backends that can run in this process (CUDA only with a device)."""
    return [b for b in BACKENDS if backend_status(b) == "available"]


# How to get the native CUDA kernels, for the error of a CUDA default without them.
NATIVE_CUDA_HOWTO = (
    "rebuild lvopt with CUDA kernels (`make dev` or `pip install --no-build-isolation -e .` "
    "with nvcc on PATH or CUDA_HOME set, torch a CUDA build, LVOPT_NO_CUDA unset), or install "
    "a +cu wheel; or choose a backend explicitly: backend='triton' (the Triton kernels, "
    "slower than the CUDA ones) or backend='reference'"
)


def default_for(device: torch.device) -> str:
    """The backend used for tensors on ``device`` when none was requested: the native kernels
    for that device. Raises if they were not built: a CPU-only build on a GPU machine must not
    run the (slower) Triton kernels without being asked to."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        why = unavailable_reason("cuda")
        if why is not None:
            raise RuntimeError(
                f"lvopt has no native kernels for {device}: {why}. To get them, {NATIVE_CUDA_HOWTO}. "
                f"Available here: {available()}"
            )
        return "cuda"
    raise RuntimeError(
        f"lvopt has no kernels for device type {device.type!r}; pass backend='reference' to run the pure-PyTorch step"
    )


def device_ok(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return False


def ops(name: str):
    """The step functions of backend ``name``, looked up by op name (``ops(b).fused_adamw_``):
    ``torch.ops.lvopt`` for the native kernels, the lvopt.reference module for the reference,
    the lvopt.triton package for Triton. Every backend offers every op under the same name and
    signature, so a new op needs no change here."""
    check_available(name)
    if name == "reference":
        return reference
    if name == "triton":
        return _TRITON_OPS
    return torch.ops.lvopt


def _import_triton_ops() -> None:
    global _TRITON_OPS
    import importlib

    _TRITON_OPS = importlib.import_module("lvopt.triton")


def supported_dtypes(name: str) -> tuple:
    if name == "reference":
        return (torch.float32, torch.bfloat16, torch.float64)
    return (torch.float32, torch.bfloat16)


def build_info() -> dict:
    """What this build of lvopt contains and which backends can run here."""
    info = {
        "version": __import__("lvopt").__version__,
        "torch": torch.__version__,
        "built_for": _ops.built_for(),
        "native": _ops.native_available(),
        "native_error": _ops.NATIVE_ERROR,
        "cpu_isa_compiled": [],
        "cpu_isa_hardware": None,
        "cpu_isa_active": None,
        "cpu_hugepages": _cpu_hugepages(),
        "cpu_workspace_limit_mb": None,
        "cpu_workspace_held_mb": None,
        "cuda": False,
        "cuda_archs": [],
        "parallel": None,
    }
    if _ops.native_available():
        native = _ops._C.build_info()
        info.update(
            cpu_isa_compiled=native["cpu_isa_compiled"].split(","),
            cpu_isa_hardware=native["cpu_isa_hardware"],
            cpu_isa_active=native["cpu_isa_active"],
            cpu_workspace_limit_mb=native["cpu_workspace_limit_mb"],
            cpu_workspace_held_mb=native["cpu_workspace_held_mb"],
            cuda=bool(native["cuda"]),
            cuda_archs=[a for a in native["cuda_archs"].split(";") if a],
            parallel=native["parallel"],
        )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["backends"] = {b: backend_status(b) for b in BACKENDS}
    return info


def backend_status(name: str) -> str:
    """``"available"``; ``"compiled, no device"`` for CUDA kernels built into lvopt._C in a
    process that sees no CUDA device (they cannot run, nor be ruled out for another machine);
    else why ``name`` cannot run here."""
    why = unavailable_reason(name)
    if why is not None:
        return why
    if name == "cuda" and not torch.cuda.is_available():
        return "compiled, no device"
    return "available"


def cpu_isa_levels() -> list[str]:
    """The CPU ISA levels the native kernels can run at on this machine, lowest first (those
    compiled into lvopt._C, up to the hardware's level); empty without the native build."""
    if not _ops.native_available():
        return []
    native = _ops._C.build_info()
    order = ["baseline", "avx2", "avx512"]
    hw = order.index(native["cpu_isa_hardware"])
    return [i for i in order if i in native["cpu_isa_compiled"].split(",") and order.index(i) <= hw]


class set_cpu_isa:
    """Runs lvopt's CPU kernels at ISA ``level`` (``"baseline"``, ``"avx2"``, ``"avx512"``) from
    now on, in this process, as ``LVOPT_CPU_ISA=level`` does at start-up; every level computes
    the same bits, so only the speed changes. Also a context manager that restores the previous
    level on exit::

        with lvopt.set_cpu_isa("avx2"):
            opt.step()

    Raises ValueError for an unknown level or one above this CPU's (``build_info()``'s
    ``cpu_isa_hardware``), RuntimeError without the native build."""

    def __init__(self, level: str):
        if not _ops.native_available():
            raise RuntimeError(f"lvopt.set_cpu_isa: the native CPU kernels are not built ({_ops.NATIVE_ERROR})")
        self.previous = _ops._C.build_info()["cpu_isa_active"]
        self.level = _ops._C.set_cpu_isa(str(level))

    def __enter__(self) -> "set_cpu_isa":
        return self

    def __exit__(self, *exc) -> None:
        _ops._C.set_cpu_isa(self.previous)

    def __repr__(self) -> str:
        return f"lvopt.set_cpu_isa({self.level!r})"


class set_cpu_workspace_limit:
    """Caps the scratch buffer lvopt's CPU kernels keep between steps (csrc/cpu/workspace.h) at
    ``mb`` MiB from now on, as ``LVOPT_CPU_WORKSPACE_MB=mb`` does at start-up (default 512); 0
    turns it off and frees it. AdamH keeps its direction u there between its two passes, which
    makes its CPU step read 24 instead of 28 bytes per parameter (docs/backends.md); tensors
    whose u does not fit recompute it. The bits are the same either way: only speed and memory
    change. Also a context manager that restores the previous limit on exit. Raises ValueError
    for a negative limit, RuntimeError without the native build."""

    def __init__(self, mb: float):
        if not _ops.native_available():
            raise RuntimeError(
                f"lvopt.set_cpu_workspace_limit: the native CPU kernels are not built ({_ops.NATIVE_ERROR})"
            )
        if not mb >= 0:
            raise ValueError(f"lvopt.set_cpu_workspace_limit: the limit must be >= 0 MiB, got {mb!r}")
        self.previous = _ops._C.set_cpu_workspace_limit(int(mb * (1 << 20)))
        self.mb = mb

    def __enter__(self) -> "set_cpu_workspace_limit":
        return self

    def __exit__(self, *exc) -> None:
        _ops._C.set_cpu_workspace_limit(self.previous)

    def __repr__(self) -> str:
        return f"lvopt.set_cpu_workspace_limit({self.mb!r})"


def _cpu_hugepages() -> str:
    """Whether lvopt's CPU moments get transparent huge pages (lvopt/_memory.py), and why not."""
    from . import _memory

    mode = _memory.thp_mode()
    if not _memory.ENABLED:
        return "off (the default; LVOPT_CPU_HUGEPAGES=1 turns it on)"
    if mode in ("always", "madvise"):
        return f"on (kernel THP mode {mode!r})"
    return "off (no transparent huge pages in this kernel)" if mode is None else f"off (kernel THP mode {mode!r})"
