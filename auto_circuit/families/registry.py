"""The registry of model families: ``family_for(model)`` finds the family that accepts a
model, or raises an error listing the supported ones.

A family is a module that describes a kind of model's graph for the engine (the plain
contract, ``auto_circuit.families.contract``) and registers itself with
``register_family`` on import. Adding a family means adding such a module (and its
import path to ``_BUILTIN_FAMILY_MODULES`` if it ships with the package).
"""

from __future__ import annotations

from importlib import import_module

import torch as t

from auto_circuit.families.contract import ModelFamily
from auto_circuit.vocabulary.errors import CircuitError

_FAMILIES: dict[str, ModelFamily] = {}
_BUILTIN_FAMILY_MODULES = (
    "auto_circuit.families.micro",
    "auto_circuit.families.transformer_lens",
)


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a model family to the registry (a family module calls this on import)."""
    _FAMILIES[family.name] = family
    return family


def registered_families() -> list[ModelFamily]:
    for module in _BUILTIN_FAMILY_MODULES:
        import_module(module)
    return list(_FAMILIES.values())


def family_for(model: t.nn.Module) -> ModelFamily:
    """The family that accepts ``model``, or a CircuitError listing the supported ones."""
    families = registered_families()
    for family in families:
        if family.accepts(model):
            return family
    supported = "\n".join(f"  - {f.name}: {f.description}" for f in families)
    raise CircuitError(
        f"Unsupported model type {type(model).__module__}.{type(model).__qualname__}. "
        f"auto_circuit supports these model families:\n{supported}\n"
        "Wrap your model as one of them, or add a family module that calls "
        "auto_circuit.families.registry.register_family."
    )
