"""Files that cannot run code: tensors in safetensors, everything else as JSON metadata.

Nothing the package reads is unpickled. ``write_safe`` writes atomically (a temporary
file renamed into place), so a crash never leaves a half-written file under the real
name; ``read_safe`` turns a missing, truncated, tampered or foreign file into one
``CircuitError`` that names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch as t
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError

METADATA_KEY = "auto_circuit"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle protocol header; torch.save's zip


def write_safe(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-serialisable ``metadata`` to ``path`` atomically."""
    path = Path(path)
    if path.is_dir():
        raise CircuitError(
            f"{path} is a directory; give a file name (e.g. {path}/scores.safetensors)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        meta = json.dumps(metadata, sort_keys=True)
    except TypeError as err:
        raise CircuitError(f"Metadata for {path} is not JSON-serialisable: {err}") from err
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata={METADATA_KEY: meta})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safe(path: str | Path, device: t.device | str = "cpu") -> tuple[dict[str, Tensor], dict]:
    """The tensors and metadata of a file written by ``write_safe``."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CircuitError(f"{path} {what}; give the path of a file written by auto_circuit.")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise CircuitError(
            f"{path} is a pickle (torch.save) file. auto_circuit never unpickles files, as "
            "loading a pickle can run code. If it is a scores file from an older "
            "auto_circuit, convert it once with `auto-circuit convert-scores TASK "
            f"{path} --out NEW.safetensors` (it is read with torch.load(weights_only=True), "
            "which runs no code)."
        )
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CircuitError(
            f"{path} is truncated, corrupt or not a safetensors file ({err}). Write it again "
            "(nothing was read from it)."
        ) from None
    if raw_meta is None:
        raise CircuitError(f"{path} is a safetensors file but not one written by auto_circuit.")
    try:
        metadata = json.loads(raw_meta)
    except json.JSONDecodeError as err:
        raise CircuitError(f"{path}: its auto_circuit metadata is corrupt ({err}).") from None
    if not isinstance(metadata, dict):
        raise CircuitError(f"{path}: its auto_circuit metadata is not a JSON object.")
    return tensors, metadata
