"""Scores saved safely, with what they belong to: safetensors plus JSON metadata.

A scores file records the format and its version, the package version, the model's
identity (its family, class and a hash of its configuration), the graph (factorized,
``separate_qkv``, ``seq_len``, every mask's name and shape), the algorithm and its
arguments, and the task. ``load_prune_scores(path, model)`` refuses a file made for
another model or graph and says what differs; nothing is ever unpickled. Scores files
of older versions (``torch.save`` pickles) are converted once by
``convert_legacy_scores``, which reads them with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.safe_files import read_safe, write_safe
from auto_circuit.vocabulary.types import PruneScores

FORMAT = "auto_circuit.prune_scores"
FORMAT_VERSION = 1
_IGNORED_CONFIG_KEYS = {"device", "n_devices", "dtype"}  # where it runs, not what it is


@dataclass(frozen=True)
class SavedScores:
    """Scores read from a file, and the file's metadata."""

    scores: PruneScores
    metadata: dict[str, Any]

    @property
    def algorithm(self) -> str | None:
        return self.metadata.get("algorithm")

    @property
    def task(self) -> str | None:
        return self.metadata.get("task")


def package_version() -> str:
    try:
        return package_metadata.version("auto_circuit")
    except package_metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def model_identity(model: PatchableModel) -> dict[str, Any]:
    """The wrapped model's family, class and a hash of its configuration (its
    TransformerLens config, else its parameters' names and shapes)."""
    wrapped = model.wrapped_model
    cfg = getattr(wrapped, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        config = {k: v for k, v in cfg.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    else:
        config = {name: list(p.shape) for name, p in wrapped.named_parameters()}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "family": model.family_name,
        "architecture": f"{type(wrapped).__module__}.{type(wrapped).__qualname__}",
        "config_sha256": digest,
    }


def graph_identity(model: PatchableModel) -> dict[str, Any]:
    """The graph's kind and every mask's shape."""
    return {
        "factorized": model.is_factorized,
        "separate_qkv": model.separate_qkv,
        "seq_len": model.seq_len,
        "n_edges": model.n_edges,
        "masks": {name: list(mask.shape) for name, mask in sorted(model.patch_masks.items())},
    }


def check_scores(model: PatchableModel, scores: PruneScores, what: str = "prune scores") -> None:
    """``scores`` has exactly the model's mask names and shapes, and no NaN (infinite
    scores are meaningful: ACDC gives ``+inf`` to edges every threshold kept)."""
    expected = {name: tuple(mask.shape) for name, mask in model.patch_masks.items()}
    if set(scores) != set(expected):
        extra, lacking = sorted(set(scores) - set(expected)), sorted(set(expected) - set(scores))
        raise CircuitError(
            f"{what} do not fit this model's graph: unknown masks {extra[:3]}, missing "
            f"masks {lacking[:3]}. Make them with model.new_prune_scores() or an algorithm "
            "run on this model."
        )
    for name, value in scores.items():
        if tuple(value.shape) != expected[name]:
            raise CircuitError(
                f"{what}[{name!r}] has shape {list(value.shape)}, but the mask has "
                f"{list(expected[name])} (another graph: seq_len or separate_qkv differs?)."
            )
        if value.is_floating_point() and bool(t.isnan(value).any()):
            raise CircuitError(
                f"{what}[{name!r}] holds NaN values; circuits built from them would be "
                "wrong. Fix the algorithm's inputs or drop those scores."
            )


def save_prune_scores(
    path: str | Path,
    model: PatchableModel,
    scores: PruneScores,
    *,
    algorithm: str | None = None,
    algorithm_args: dict[str, Any] | None = None,
    task: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``scores`` of ``model``'s graph to ``path`` (safetensors + metadata)."""
    check_scores(model, scores)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "model": model_identity(model),
        "graph": graph_identity(model),
        "algorithm": algorithm,
        "algorithm_args": _jsonable(algorithm_args or {}),
        "task": task,
        "extra": _jsonable(extra or {}),
    }
    return write_safe(path, dict(scores), meta)


def load_prune_scores(
    path: str | Path, model: PatchableModel | None = None, device: t.device | str | None = None
) -> SavedScores:
    """Read a scores file; with ``model``, refuse it unless it was made for that model's
    graph (the error lists what differs). Scores go to ``device`` (default: the
    model's, else the CPU)."""
    if device is None:
        device = model.device if model is not None else "cpu"
    tensors, meta = read_safe(path, device)
    if meta.get("format") != FORMAT:
        raise CircuitError(f"{path} is not a scores file (format {meta.get('format')!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CircuitError(
            f"{path} has scores format version {version!r}; this auto_circuit reads up to "
            f"{FORMAT_VERSION}. Upgrade auto_circuit."
        )
    saved = SavedScores(tensors, meta)
    if model is not None:
        check_file_fits(path, saved, model)
    return saved


def check_file_fits(path: str | Path, saved: SavedScores, model: PatchableModel) -> None:
    """Refuse scores saved for another model or graph, naming each difference."""
    differences = []
    for section, now in (("model", model_identity(model)), ("graph", graph_identity(model))):
        then = saved.metadata.get(section, {})
        for key, value in now.items():
            if then.get(key) != value:
                shown = "differ" if key == "masks" else f"file {then.get(key)!r}, model {value!r}"
                differences.append(f"{section} {key}: {shown}")
    if differences:
        raise CircuitError(
            f"{path} holds scores for another model or graph: " + "; ".join(differences) + "."
        )
    check_scores(model, saved.scores, f"scores in {path}")


def convert_legacy_scores(
    path: str | Path, out: str | Path, model: PatchableModel, task: str | None = None
) -> Path:
    """Convert a ``torch.save`` scores file of an older version to the safe format.

    Read with ``torch.load(weights_only=True)``, which loads tensors and plain containers
    and refuses anything that would run code."""
    try:
        legacy = t.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure: refuse, with the reason
        raise CircuitError(
            f"{path} cannot be read safely (torch.load(weights_only=True) refused it: "
            f"{str(err).splitlines()[0][:200]}). It is not converted."
        ) from None
    scores = legacy.get("scores") if isinstance(legacy, dict) else None
    if not isinstance(scores, dict) or not all(isinstance(v, Tensor) for v in scores.values()):
        raise CircuitError(f"{path} is not a scores file of an older auto_circuit.")
    return save_prune_scores(
        out,
        model,
        scores,
        algorithm=legacy.get("algorithm"),
        task=task or legacy.get("task"),
        extra={"converted_from": str(path)},
    )


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold written as its repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
