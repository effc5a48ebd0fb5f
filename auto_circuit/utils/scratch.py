"""Large scratch buffers that are cheap to touch for the first time.

A CPU tensor of more than 32 MiB is its own memory mapping (glibc), and each of its
4 KiB pages is faulted in and zeroed by the kernel on first write: for the patching
engine's table of source differences (100+ MiB for GPT-2 small, batch 16) that costs
more kernel time than the arithmetic done on it. Where Linux offers transparent huge
pages on request (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` or
``always``), asking for them turns ~30,000 faults into ~60. Elsewhere (other systems,
GPUs, THP off) this is a plain ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import torch as t
from torch import Tensor

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
_MIN_BYTES = 8 << 20  # below this the heap serves the tensor, already faulted in


@cache
def _madvise():  # -> the libc function, or None where there is none to call
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def empty_scratch(size: tuple[int, ...], dtype: t.dtype, device: t.device) -> Tensor:
    """``torch.empty(size)``, asking the kernel for huge pages when it is a large CPU
    tensor (advice only: the memory and its contents are those of ``torch.empty``)."""
    out = t.empty(size, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise()
    if out.device.type == "cpu" and nbytes >= _MIN_BYTES and madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # round up
        stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE  # round down
        if stop > start:
            madvise(start, stop - start, _MADV_HUGEPAGE)  # failure: ordinary pages
    return out
