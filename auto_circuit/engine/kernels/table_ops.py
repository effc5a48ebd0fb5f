"""The engine's products on its table of source differences as native CPU kernels
(``table_ops.c``), built at first use.

Axis names: ``batch``, ``seq`` (token positions), ``head`` (destination rows of one
product: heads, or a block's Q/K/V heads and its riders), ``n`` (sources), ``d_model``,
``d_head``.

- ``masked_sum``: ``out[b, s] = m[b, s] @ rows[b, s]``, every destination's delta;
- ``head_differences``: ``out[h] = patch[h] - z[:, :, h] @ W_O[h]``, the heads' rows of
  the table.

Both compute in float32 on the CPU the same sums in the same order as torch's BLAS
calls (fused multiply-adds over the inner dimension in order), in about half the time
for the engine's shapes: a BLAS packs both operands of each small product and then
reads the table from memory while computing; the kernels read their operands in place,
prefetch the next panel and write with streaming stores (see ``benchmarks/README.md``).

They are compiled once per machine with the C compiler found as ``$CC``, or ``cc``
(``-O3 -march=native -fopenmp``: the kernels then run on torch's own OpenMP threads),
into ``$AUTO_CIRCUIT_CACHE_DIR`` (default ``~/.cache/auto_circuit``; a per-user
temporary directory when that is not writable), under a name that hashes the source,
the compiler and the CPU, so that a shared home directory never serves a build for
another CPU. Without a compiler, or with ``AUTO_CIRCUIT_NATIVE=0``, or for other
dtypes, devices and layouts, the functions return None or False and the engine uses
torch: results are the same either way.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch as t
from jaxtyping import Float
from torch import Tensor

_SOURCE = Path(__file__).with_name("table_ops.c")
# OpenMP first: with it the kernels run on torch's own thread pool (see table_ops.c).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
# Below this many multiply-adds per thread, another thread costs more than it saves.
_MIN_MACS_PER_THREAD = 500_000

log = logging.getLogger(__name__)


class _Kernel:
    """The loaded library, or why there is none (loaded once per process)."""

    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.vector_floats = 0
        self.reason = "not loaded yet"
        self.loaded = False

    def get(self) -> ctypes.CDLL | None:
        if not self.loaded:
            self.loaded = True
            try:
                self.lib, self.reason = _load()
            except OSError as error:  # a broken cache entry, a full disk, ...
                self.lib, self.reason = None, f"could not build or load: {error}"
            if self.lib is None:
                log.info("auto_circuit native table kernels unavailable (%s)", self.reason)
            else:
                self.vector_floats = self.lib.vector_floats()
        return self.lib


_KERNEL = _Kernel()


def native_status() -> str:
    """Whether the native kernels are in use in this process, and if not, why."""
    lib = _KERNEL.get()
    return f"native ({_KERNEL.vector_floats} floats per vector)" if lib else _KERNEL.reason


def vector_floats() -> int:
    """Floats per vector of the native kernels (``d_model`` must be a multiple of it);
    0 without them."""
    return _KERNEL.vector_floats if _KERNEL.get() is not None else 0


def masked_sum(
    m: Float[Tensor, "batch_or_1 seq_or_1 head n"],
    rows: Float[Tensor, "batch seq n d_model"],
    out: Float[Tensor, "batch seq head d_model"] | None = None,
    stats: Float[Tensor, "batch seq head 2"] | None = None,
) -> Float[Tensor, "batch seq head d_model"] | None:
    """``m @ rows`` batched over tokens by the native kernel, written into ``out``
    (contiguous; allocated when None), and with ``stats`` (contiguous) each result
    row's sum and sum of squares over ``d_model``. None where the kernel does not apply
    (then nothing was written): not float32 on the CPU, gradients required, ``d_model``
    not a multiple of the vector width, rows whose tokens are not evenly strided, or no
    kernel on this machine."""
    batch, seq, n, d_model = rows.shape
    heads = m.shape[-2]
    shape = (batch, seq, heads, d_model)
    if (
        m.shape[-1] != n
        or m.shape[0] not in (1, batch)
        or m.shape[1] not in (1, seq)
        or rows.stride(-1) != 1
        or rows.stride(0) != seq * rows.stride(1)
        or not _fits(out, shape)
        or not _fits(stats, shape[:3] + (2,))
    ):
        return None
    lib = _kernel_for([m, rows, *(x for x in (out, stats) if x is not None)], d_model)
    if lib is None:
        return None
    if m.stride(-1) != 1:
        m = m.contiguous()
    if out is None:
        out = t.empty(shape, dtype=t.float32)
    status = lib.masked_sum(
        m.data_ptr(),
        _stride(m, 0),
        _stride(m, 1),
        m.stride(2),
        rows.data_ptr(),
        rows.stride(1),
        rows.stride(2),
        out.data_ptr(),
        None if stats is None else stats.data_ptr(),
        batch,
        seq,
        heads,
        n,
        d_model,
        _threads(batch * seq * heads * n * d_model),
    )
    return out if status == 0 else None


def head_differences(
    z: Float[Tensor, "batch seq head d_head"],
    w_o: Float[Tensor, "head d_head d_model"],
    patch: Float[Tensor, "head batch_or_1 seq_or_1 d_model"],
    out: Float[Tensor, "head batch seq d_model"],
) -> bool:
    """Write ``patch[h] - z[:, :, h] @ w_o[h]`` into ``out[h]`` for every head (``out``:
    rows of the engine's table, batch and seq merging). False where the kernel does
    not apply (then nothing was written), under the same conditions as ``masked_sum``."""
    heads, batch, seq, d_model = out.shape
    d_head = z.shape[-1]
    if (
        z.shape[:3] != (batch, seq, heads)
        or tuple(w_o.shape) != (heads, d_head, d_model)
        or patch.shape[0] != heads
        or patch.shape[-1] != d_model
        or patch.shape[1] not in (1, batch)
        or patch.shape[2] not in (1, seq)
        or any(x.stride(-1) != 1 for x in (w_o, patch, out))
        or out.stride(1) != seq * out.stride(2)
    ):
        return False
    lib = _kernel_for([z, w_o, patch, out], d_model)
    if lib is None:
        return False
    z_neg = t.neg(z).contiguous()  # [batch, seq, head, d_head]: tokens evenly strided
    status = lib.head_differences(
        z_neg.data_ptr(),
        z_neg.stride(2),
        z_neg.stride(1),
        w_o.data_ptr(),
        w_o.stride(0),
        w_o.stride(1),
        patch.data_ptr(),
        patch.stride(0),
        _stride(patch, 1),
        _stride(patch, 2),
        out.data_ptr(),
        out.stride(0),
        out.stride(2),
        heads,
        batch,
        seq,
        d_head,
        d_model,
        _threads(batch * seq * heads * d_head * d_model),
    )
    return status == 0


def _kernel_for(tensors: list[Tensor], d_model: int) -> ctypes.CDLL | None:
    """The library, where every operand is float32 on the CPU, none needs gradients, and
    ``d_model`` is a multiple of the vector width."""
    if any(x.device.type != "cpu" or x.dtype != t.float32 for x in tensors) or (
        t.is_grad_enabled() and any(x.requires_grad for x in tensors)
    ):
        return None
    lib = _KERNEL.get()
    return lib if lib is not None and d_model % _KERNEL.vector_floats == 0 else None


def _fits(x: Tensor | None, shape: tuple[int, ...]) -> bool:
    """No buffer given, or a contiguous one of ``shape``."""
    return x is None or (tuple(x.shape) == shape and x.is_contiguous())


def _stride(x: Tensor, dim: int) -> int:
    """The stride of ``dim``, 0 where it has size 1 (the kernels broadcast it)."""
    return x.stride(dim) if x.shape[dim] > 1 else 0


def _threads(macs: int) -> int:
    return max(1, min(t.get_num_threads(), macs // _MIN_MACS_PER_THREAD))


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("AUTO_CIRCUIT_NATIVE", "1") == "0":
        return None, "disabled by AUTO_CIRCUIT_NATIVE=0"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, "no C compiler found ($CC or cc)"
    build = [_SOURCE.read_bytes(), compiler.encode(), _compiler_version(compiler).encode()]
    build.append(_cpu_fingerprint().encode())
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([*build, " ".join(flags).encode()])).hexdigest()[:16]
        path = _cache_dir() / f"table_ops-{key}.so"
        if not path.exists() and not _compile(compiler, flags, path):
            continue
        lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.masked_sum.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr] + [i64] * 5
        lib.masked_sum.argtypes.append(ctypes.c_int)
        lib.masked_sum.restype = ctypes.c_int
        lib.head_differences.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64]
        lib.head_differences.argtypes += [ptr, i64, i64] + [i64] * 5 + [ctypes.c_int]
        lib.head_differences.restype = ctypes.c_int
        lib.vector_floats.restype = ctypes.c_int
        return lib, "loaded"
    return None, f"{compiler} could not compile {_SOURCE.name}"


def _compile(compiler: str, flags: list[str], path: Path) -> bool:
    """Compile into a temporary file next to ``path``, then rename it into place (so
    that processes building at the same time never load a half-written library)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    command = [compiler, *flags, "-shared", "-fPIC", "-pthread", "-o", tmp, str(_SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log.info("%s failed: %s", " ".join(command), done.stderr.strip()[-2000:])
            return False
        os.replace(tmp, path)
        return True
    except (OSError, subprocess.TimeoutExpired) as error:
        log.info("%s failed: %s", " ".join(command), error)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's model and instruction-set flags."""
    parts = [platform.machine(), platform.processor(), sys.platform]
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first CPU's block is enough
    except OSError:
        pass
    return "\n".join(parts)


def _cache_dir() -> Path:
    configured = os.environ.get("AUTO_CIRCUIT_CACHE_DIR")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "auto_circuit"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    return _private_temp_dir()


def _private_temp_dir() -> Path:
    """A per-user directory in the shared temporary directory, used only if this user
    owns it and nobody else can write to it: a library found there is loaded into the
    process."""
    user = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / f"auto_circuit-{user if user is not None else 'user'}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or (user is not None and info.st_uid != user) or info.st_mode & 0o022:
        raise OSError(f"{path} is not a private directory of this user; not loading from it")
    return path
