"""Small helpers shared across the package."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch as t

from auto_circuit.vocabulary.errors import CircuitError


def module_by_name(model: t.nn.Module, module_name: str) -> t.nn.Module:
    """The submodule at dotted path ``module_name`` (e.g. ``blocks.3.attn.hook_z``)."""
    try:
        return model.get_submodule(module_name)
    except AttributeError as err:
        names = [name for name, _ in model.named_modules()]
        raise CircuitError(
            f"The model has no module {module_name!r}.{did_you_mean(module_name, names)}"
        ) from err


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix naming the closest candidates, or ''."""
    close: list[str] = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def repo_path_to_abs_path(path: str | Path) -> Path:
    """Resolve a path of packaged data (e.g. ``datasets/ioi/ioi_prompts.json``).

    Data ships inside the package, so this works after ``pip install``: the path is
    looked up in the installed package first, then taken as given.
    """
    packaged = Path(str(resources.files("auto_circuit"))) / path
    if packaged.exists():
        return packaged
    return Path(path).resolve()
