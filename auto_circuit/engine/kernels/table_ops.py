"""The engine's products on its table of source differences as native CPU kernels
(``table_ops.c``): an optional fast path beside torch, off unless asked for.

Axis names: ``batch``, ``seq`` (token positions), ``head`` (destination rows of one
product: heads, or a block's Q/K/V heads and its riders), ``n`` (sources), ``d_model``,
``d_head``.

- ``masked_sum``: ``out[b, s] = m[b, s] @ rows[b, s]``, every destination's delta (a
  drop-in for ``torch.matmul(m, rows, out=out)``);
- ``head_differences``: ``out[h] = patch[h] - z[:, :, h] @ W_O[h]``, the heads' rows of
  the table (a drop-in for a copy of ``patch`` and a ``baddbmm``).

Both compute in float32 on the CPU the same sums in the same order as torch's BLAS
calls (fused multiply-adds over the inner dimension in order). Where they do not apply
(other dtypes, devices or layouts, gradients, no kernel) they return None or False,
write nothing, and the engine uses torch: results are the same either way. They are
off by default: measured on 2 cores at GPT-2 small's shapes they did not make the
random-mask forward faster than torch (``benchmarks/README.md``, ``bench_kernels.py``).

Using them takes two steps:

1. ``python -m auto_circuit.engine.kernels build`` compiles ``table_ops.c`` with the C
   compiler ``$CC`` or ``cc`` (``-O3 -march=native -fopenmp``: the kernels run on
   torch's own OpenMP threads) into ``$AUTO_CIRCUIT_CACHE_DIR``, default
   ``$XDG_CACHE_HOME/auto_circuit`` or ``~/.cache/auto_circuit`` (created ``0700``),
   and records the library's SHA-256 beside it. The library's name hashes the source
   and the CPU, so that a shared home directory never serves a build for another CPU.
2. ``AUTO_CIRCUIT_NATIVE=1`` in the environment (read at the first product), or
   ``enable()``, loads it. Nothing is ever compiled inside a forward.

A library is loaded into the process only if the directory it is in, and each
directory above that, is owned by this user (or root, for those above) and writable by
nobody else (a directory above may be world-writable if it is sticky, as ``/tmp`` is),
the library and its record are regular files of this user that nobody else can write
to, and the library's SHA-256 matches the record. All of this is checked on the open
file before it is handed to the dynamic loader, so a truncated or replaced library is
never mapped (no SIGBUS) and no foreign constructor runs. Anything else falls back to
torch with one warning per process saying why and how to fix it; ``native_status()``
says which path is in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
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
_SETTING = "AUTO_CIRCUIT_NATIVE"
_BUILD = "python -m auto_circuit.engine.kernels build"


class _Kernel:
    """The loaded library, or why there is none (loaded at most once per process)."""

    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.vector_floats = 0
        self.reason = f"off: set {_SETTING}=1 (after `{_BUILD}`) to use the native kernels"
        self.tried = False
        self.asked = False

    def get(self) -> ctypes.CDLL | None:
        if not self.asked:
            self.asked = True
            if os.environ.get(_SETTING, "0") == "1":
                self.load(None)
        return self.lib

    def load(self, cache_dir: Path | None) -> None:
        """Load the verified library from ``cache_dir`` (default: the cache), once; on
        failure, warn once and stay on torch."""
        self.asked = True
        if self.lib is not None or self.tried:
            return
        self.tried = True
        try:
            self.lib, self.reason = _load(cache_dir)
        except OSError as error:  # a file that vanished, an unreadable directory, ...
            self.lib, self.reason = None, f"could not load: {error}; rebuild with `{_BUILD}`"
        if self.lib is None:
            warnings.warn(
                f"auto_circuit's native table kernels are not used, the engine runs on "
                f"torch (same results): {self.reason}",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            self.vector_floats = self.lib.vector_floats()


_KERNEL = _Kernel()


def enable(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Use the native kernels in this process from now on, as ``AUTO_CIRCUIT_NATIVE=1``
    does, from ``cache_dir`` (default: the cache ``build`` writes to). Warns once and
    stays on torch where no verified library is there. Returns ``native_status()``."""
    _KERNEL.load(None if cache_dir is None else Path(cache_dir))
    return native_status()


def native_status() -> str:
    """Which path the engine's table products take in this process, and if not the
    native kernels, why."""
    lib = _KERNEL.get()
    if lib is None:
        return f"torch ({_KERNEL.reason})"
    return f"native ({_KERNEL.vector_floats} floats per vector; {_KERNEL.reason})"


def vector_floats() -> int:
    """Floats per vector of the native kernels (``d_model`` must be a multiple of it);
    0 without them."""
    return _KERNEL.vector_floats if _KERNEL.get() is not None else 0


def masked_sum(
    m: Float[Tensor, "batch_or_1 seq_or_1 head n"],
    rows: Float[Tensor, "batch seq n d_model"],
    out: Float[Tensor, "batch seq head d_model"] | None = None,
) -> Float[Tensor, "batch seq head d_model"] | None:
    """``torch.matmul(m, rows, out=out)`` by the native kernel: ``m @ rows`` batched over
    tokens, written into ``out`` (contiguous; allocated when None). None where the kernel
    does not apply (then nothing was written): not float32 on the CPU, gradients
    required, ``d_model`` not a multiple of the vector width, rows whose tokens are not
    evenly strided, or the kernels not in use (``native_status()``)."""
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
    ):
        return None
    lib = _kernel_for([m, rows, *(x for x in (out,) if x is not None)], d_model)
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
    not apply (then nothing was written), under the same conditions as ``masked_sum``; a
    drop-in for ``out.copy_(patch)`` and a ``baddbmm`` of ``-z_h`` and ``w_o[h]``."""
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


# ---------------------------------------------------------------------------------
# building ahead of time, and loading only what was built and verified


def build(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Compile ``table_ops.c`` for this CPU into ``cache_dir`` (default: the cache; made
    ``0700``) and record its SHA-256; returns the library's path. Raises RuntimeError
    without a C compiler or when no flag set compiles, PermissionError for a directory
    that is not private to this user."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC or cc); the engine uses torch without one")
    directory = Path(cache_dir) if cache_dir is not None else _cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = _untrusted_directory(directory)
    if problem:
        raise PermissionError(problem)
    key = _build_key()
    errors = []
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        command = [compiler, *flags, "-shared", "-fPIC", "-pthread", "-o", tmp, str(_SOURCE)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                errors.append(f"{' '.join(command)}: {done.stderr.strip()[-1000:]}")
                continue
            os.chmod(tmp, 0o500)  # nobody writes to it in place, not even this user
            digest = _sha256(Path(tmp).read_bytes())
            library = directory / f"table_ops-{key}-{digest[:16]}.so"
            os.replace(tmp, library)
            # The record is replaced last and names the library by its digest: a process
            # loading meanwhile sees the old pair or the new one, never a mix.
            _write_atomically(_record_path(directory, key), f"{digest}  {library.name}\n")
            return library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{compiler} could not compile {_SOURCE.name}:\n" + "\n".join(errors))


def _load(cache_dir: Path | None) -> tuple[ctypes.CDLL | None, str]:
    """The verified library (and where it came from), or None and why."""
    if not hasattr(os, "getuid"):
        return None, "the native kernels are built and loaded on POSIX systems only"
    directory = cache_dir if cache_dir is not None else _cache_dir()
    key = _build_key()
    record = _record_path(directory, key)
    if not os.path.lexists(record):
        return None, f"not built for this source and CPU in {directory}: run `{_BUILD}`"
    problem = _untrusted_directory(directory)
    if problem:
        return None, problem
    fd, problem = _open_private(record)
    if fd is None:
        return None, problem
    with os.fdopen(fd, "rb") as file:
        line = file.read(4096).decode("ascii", "replace")
    match = re.fullmatch(rf"([0-9a-f]{{64}})  (table_ops-{key}-[0-9a-f]{{16}}\.so)\n", line)
    if match is None:
        return None, f"{record} is not a record written by `{_BUILD}`: rebuild"
    digest, name = match.groups()
    fd, problem = _open_private(directory / name)
    if fd is None:
        return None, problem
    try:
        content = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            content.update(chunk)
        if content.hexdigest() != digest:
            return None, (
                f"{directory / name} does not match its recorded SHA-256 (truncated or "
                f"changed): rebuild with `{_BUILD}`"
            )
        # The file checked is the one loaded: through its descriptor where the system
        # names descriptors (Linux), so a rename in between cannot swap it.
        by_fd = f"/proc/self/fd/{fd}"
        lib = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(directory / name))
    finally:
        os.close(fd)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.masked_sum.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr] + [i64] * 5
    lib.masked_sum.argtypes.append(ctypes.c_int)
    lib.masked_sum.restype = ctypes.c_int
    lib.head_differences.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64]
    lib.head_differences.argtypes += [ptr, i64, i64] + [i64] * 5 + [ctypes.c_int]
    lib.head_differences.restype = ctypes.c_int
    lib.vector_floats.restype = ctypes.c_int
    return lib, f"loaded from {directory / name}"


def _untrusted_directory(directory: Path) -> str | None:
    """Why a library in ``directory`` could be changed by someone other than this user,
    or None: the directory must be this user's and writable by nobody else, and each one
    above it this user's or root's and writable by nobody else unless sticky."""
    uid = os.getuid()
    real = Path(os.path.realpath(directory))
    for level, path in enumerate([real, *real.parents]):
        info = os.stat(path)
        owners = (uid,) if level == 0 else (uid, 0)
        if info.st_uid not in owners:
            return (
                f"{path} belongs to uid {info.st_uid}, not to this user ({uid}): not loading "
                f"code from it; set AUTO_CIRCUIT_CACHE_DIR to a directory of your own and "
                f"run `{_BUILD}`"
            )
        sticky = level > 0 and info.st_mode & stat.S_ISVTX
        if info.st_mode & 0o022 and not sticky:
            return (
                f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): not "
                f"loading code from it; run `chmod go-w {path}`, or set "
                f"AUTO_CIRCUIT_CACHE_DIR to a private directory and run `{_BUILD}`"
            )
    return None


def _open_private(path: Path) -> tuple[int | None, str]:
    """A descriptor of ``path`` if it is a regular file (not a link) of this user that
    nobody else can write to, else None and why."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        return None, f"cannot open {path} ({error.strerror}): rebuild with `{_BUILD}`"
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        os.close(fd)
        return None, (
            f"{path} is not a regular file of this user that only this user can write to: "
            f"not loading it; delete it and run `{_BUILD}`"
        )
    return fd, ""


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _record_path(directory: Path, key: str) -> Path:
    return directory / f"table_ops-{key}.sha256"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_key() -> str:
    """What a build depends on: the source and, through ``-march=native``, the CPU."""
    return _sha256(_SOURCE.read_bytes() + b"\0" + _cpu_fingerprint().encode())[:16]


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
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "auto_circuit"
