"""Host memory for optimizer state: transparent huge pages on the CPU moments lvopt allocates.

An optimizer step streams its tensors once, so on the CPU every 4 KiB page of every stream costs
a TLB miss and a page walk; with several optimizers' states alive (or a model bigger than the
page-walk caches cover) the walks, not DRAM, set the pace. Linux backs an address range with
2 MiB pages when it is marked ``madvise(MADV_HUGEPAGE)`` before it is first touched (the
kernel's ``transparent_hugepage/enabled`` set to ``madvise``, the common default, or
``always``). :func:`zeros` allocates the state uninitialised, marks its whole 2 MiB pages, then
zeroes it: the first touch faults in huge pages. Only lvopt's own state is marked (exp_avg,
exp_avg_sq, max_exp_avg_sq); parameters and gradients belong to the caller.

Off by default: measured side by side (benchmarks/RESULTS.md), huge-page moments were no faster
on an AVX-512 machine (a 64 Mi bf16 AdamW step: 43.4 against 42.6 ms, and 51.0 against 47.2 ms
under load), nor on an AVX2-only EPYC (six states of one step in one process, 2 MiB and 4 KiB
alternating: medians within 2% for fp32 and bf16 AdamW and for AdamH), so it does not earn a
default. ``LVOPT_CPU_HUGEPAGES=1`` turns
it on (read at import); :data:`ENABLED` is the switch the benchmark flips to time both. Values and layout are unchanged either way: only the page size
of the backing memory differs. Not on CUDA tensors, not for tensors under 4 MiB, not where the
kernel has THP turned off (``never``) or the platform is not Linux: plain ``torch.zeros`` there.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 2 * HUGE_PAGE  # below this at most one whole huge page fits: not worth a syscall
_MADV_HUGEPAGE = 14
ENABLED = os.environ.get("LVOPT_CPU_HUGEPAGES", "0") == "1"


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where
    there is no such setting (not Linux)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


_MODE = thp_mode()
_LIBC = None


def _madvise():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        _LIBC = fn
    return _LIBC


def mark_hugepages(t: torch.Tensor) -> int:
    """Marks the whole 2 MiB pages inside ``t``'s storage for transparent huge pages; returns the
    bytes marked (0 when nothing was: too small, THP off, not Linux, or the call refused)."""
    if not sys.platform.startswith("linux") or _MODE not in ("always", "madvise") or t.device.type != "cpu":
        return 0
    begin = t.untyped_storage().data_ptr()
    end = begin + t.untyped_storage().nbytes()
    lo = (begin + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    hi = end // HUGE_PAGE * HUGE_PAGE
    if hi - lo < HUGE_PAGE:
        return 0
    return hi - lo if _madvise()(lo, hi - lo, _MADV_HUGEPAGE) == 0 else 0


def zeros(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros_like(like, dtype=dtype)`` (same layout), backed by transparent huge pages
    when :data:`ENABLED` and ``like`` is a plain CPU tensor of at least 4 MiB in ``dtype``."""
    plain = type(like) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor, FakeTensor, ...
    if not ENABLED or not plain or like.device.type != "cpu" or like.numel() * dtype.itemsize < MIN_BYTES:
        return torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
    out = torch.empty_like(like, dtype=dtype, memory_format=torch.preserve_format)
    mark_hugepages(out)
    return out.zero_()
