"""Measurement helpers for the benchmarks: CPU time split, resident memory, peaks.

Memory is read from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) and
``resource.getrusage``. The peak (``VmHWM``, which is also what ``ru_maxrss`` reports)
can be reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``
(Linux >= 4.0), so the peak of one step can be measured without earlier peaks
(building the model, a warm-up) hiding it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import statistics
import time
from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_kb("VmRSS") * KIB


def hwm_bytes() -> int:
    """Peak resident set size since the process started or the last ``reset_peak``."""
    return _status_kb("VmHWM") * KIB


def maxrss_bytes() -> int:
    """``ru_maxrss`` (KiB on Linux) in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def reset_peak() -> bool:
    """Reset ``VmHWM``/``ru_maxrss`` to the current RSS; False where the kernel can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return hwm_bytes() <= rss_bytes() + 64 * KIB


def trim_heap() -> bool:
    """Collect garbage and hand free glibc heap memory back to the kernel."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def cpu_times() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


@dataclass
class Samples:
    """Wall, user and sys seconds of repeated runs of one thing."""

    wall: list[float] = field(default_factory=list)
    user: list[float] = field(default_factory=list)
    sys: list[float] = field(default_factory=list)

    def add(self, wall: float, user: float, sys_: float) -> None:
        self.wall.append(wall)
        self.user.append(user)
        self.sys.append(sys_)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        """Median of user+sys seconds."""
        return statistics.median(u + s for u, s in zip(self.user, self.sys, strict=True))

    @property
    def mean_user(self) -> float:
        return statistics.fmean(self.user)

    @property
    def mean_sys(self) -> float:
        return statistics.fmean(self.sys)

    @property
    def spread(self) -> str:
        return f"{min(self.wall):.3f}-{max(self.wall):.3f}"


class Timer:
    """``with Timer() as tm: ...`` then ``tm.wall``, ``tm.user``, ``tm.sys`` (seconds)."""

    wall = user = sys = 0.0

    def __enter__(self) -> Timer:
        self._u, self._s = cpu_times()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t
        u, s = cpu_times()
        self.user, self.sys = u - self._u, s - self._s


def fmt_bytes(n: float) -> str:
    if abs(n) >= 1024 * MIB:
        return f"{n / (1024 * MIB):.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.3f} s"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
