"""How a model family tells the patching engine where its graph lives.

The engine (``auto_circuit.engine.patch_wrapper``) knows nothing about any model
library. A *family* module (one per model family: the MicroModel, TransformerLens
``HookedTransformer``, ...) describes, for a given model:

- the graph: source and destination nodes;
- ``SrcSite``s: a module whose forward output holds a contiguous block of sources, and
  how to read them as ``[n_src, batch, seq, d_model]`` residual contributions;
- ``DestSite``s: the module(s) where a destination's input is read, and how to add a
  patch ``delta`` (``[batch, seq, (head,) d_model]``) there;
- probes: modules whose outputs a destination needs to rebuild its input;
- optional interceptors: family code installed on the model that asks the engine for
  this forward's deltas (e.g. to skip computing what a destination hook replaces).

Families register themselves with ``register_family``; ``family_for`` finds the one
that accepts a model, or raises an error listing the supported families.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Literal, Protocol

import torch as t
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import DestNode, SrcNode

ReadSources = Callable[[Tensor], Tensor]
"""Hooked module output -> ``[n_src, batch, seq, d_model]`` source contributions."""


@dataclass(frozen=True)
class DiffWriter:
    """Writes ``patch - read(output)`` straight into the engine's table of differences,
    without forming the contributions as a tensor of their own (forwards without
    gradients; e.g. heads: one ``baddbmm`` of ``z`` and ``W_O`` into the table rows).

    ``shape``: hooked output -> the ``[n_src, batch, seq, d_model]`` shape ``read`` would
    give. ``write(output, patch, out)``: ``patch`` broadcasts to ``out`` (batch and seq
    may be 1); ``out`` is a strided view of the table whose batch and seq dimensions
    merge (``out.view(n_src, batch * seq, d_model)`` works).
    """

    shape: Callable[[Tensor], tuple[int, int, int, int]]
    write: Callable[[Tensor, Tensor, Tensor], None]


@dataclass(frozen=True)
class Delta:
    """A destination's patch delta ``[batch, seq, (head,) d_model]``, computed on call.

    A function rather than a tensor so that a family can recompute it inside an
    activation checkpoint instead of keeping per-head copies for the backward pass.
    ``is_zero``: every mask of the destination is 0 in this forward (mask-gradient
    attribution), so the value is 0 and only its gradient matters; a family may then
    keep the hooked tensor and give the delta its gradient directly. ``owned``: the
    caller is the tensor's only reader in this forward (no gradients), so it may
    overwrite it instead of allocating a new one. ``includes_base``: the value already
    holds the site's ``base_probe`` tensor (broadcast over heads) added to the delta;
    the family must not add it again. ``row_stats``: None, or (with ``includes_base``)
    ``[batch, seq, head, 2]``, the sum and the sum of squares over ``d_model`` of each
    row of the value, computed with it.
    """

    compute: Callable[[], Tensor]
    is_zero: bool = False
    owned: bool = False
    includes_base: bool = False
    row_stats: Tensor | None = None

    def __call__(self) -> Tensor:
        return self.compute()


ApplyDelta = Callable[[Tensor, Delta, Mapping[str, Tensor]], Tensor]
"""(hooked tensor, the destination's ``Delta``, probe outputs of this forward) ->
patched tensor."""


@dataclass(frozen=True)
class SrcSite:
    """A module whose output holds the sources ``src_idxs`` (contiguous, topological)."""

    module_name: str
    hook_module: str
    src_idxs: range
    read: ReadSources
    diff_writer: DiffWriter | None = None


@dataclass(frozen=True)
class DestHook:
    """One place where a destination's delta is applied.

    ``where="input"`` adds to the first positional input of ``hook_module``;
    ``where="output"`` replaces its output. ``apply=None`` means plain addition.
    """

    hook_module: str
    where: Literal["input", "output"]
    apply: ApplyDelta | None = None


@dataclass(frozen=True)
class DestSite:
    """A module whose destination nodes share one mask ``[(head,) n_in]``."""

    module_name: str
    hooks: tuple[DestHook, ...]
    n_heads: int | None
    in_srcs: range
    fuse_key: str | None = None
    """Sites with the same key and sources (a block's Q, K and V inputs) may have their
    deltas computed by one matmul, reading the sources' differences once."""
    base_probe: str | None = None
    """A probe whose output ``[batch, seq, d_model]`` the family adds to every head's
    delta before using it (a block's ``resid_pre`` for its Q/K/V rebuild). Without
    gradients the engine may fold it into the masked sum as one more table row, saving
    a pass over the per-head tensor; the ``Delta`` then says ``includes_base``."""


GetDelta = Callable[[str], "Delta | None"]
"""During a forward pass: the ``Delta`` of the destination site with this module name,
or None when it is unchanged in this forward (or patch mode is off)."""

Interceptor = Callable[[t.nn.Module, GetDelta], Callable[[], None]]
"""Installs family-specific code on the model that may ask the engine for deltas (say,
to skip computing a tensor its destination hook will replace); returns an uninstaller."""


@dataclass(frozen=True)
class FamilyGraph:
    """Everything the engine needs to patch one model."""

    srcs: set[SrcNode]
    dests: set[DestNode]
    src_sites: list[SrcSite]
    dest_sites: list[DestSite]
    probes: list[str]
    is_transformer: bool
    separate_qkv: bool | None
    interceptors: tuple[Interceptor, ...] = ()


class ModelFamily(Protocol):
    """A model family: a name, a test for membership and a graph builder."""

    name: str
    description: str

    def accepts(self, model: t.nn.Module) -> bool: ...

    def build(
        self, model: t.nn.Module, factorized: bool, separate_qkv: bool | None
    ) -> FamilyGraph: ...


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


def contiguous_range(idxs: list[int], what: str) -> range:
    """``idxs`` as a range, or an error if they are not contiguous and increasing."""
    if not idxs:
        return range(0)
    span = range(idxs[0], idxs[-1] + 1)
    if list(span) != idxs:
        raise CircuitError(f"{what}: source indices {idxs} are not contiguous.")
    return span


def dests_by_module(model: t.nn.Module, dests: set[DestNode]) -> dict[str, list[DestNode]]:
    """``dests`` grouped by hosting module, modules in the order the model registers them
    and heads by index within each: the same order in every process (iterating the set
    itself would follow its hashes, which vary between processes, and so would the
    order of the masks built from it)."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def key(dest: DestNode) -> tuple[int, str, int]:
        return position.get(dest.module_name, len(position)), dest.module_name, dest.head_idx or 0

    by_module: dict[str, list[DestNode]] = {}
    for dest in sorted(dests, key=key):
        by_module.setdefault(dest.module_name, []).append(dest)
    return by_module


def in_edge(src: SrcNode, dest: DestNode, factorized: bool) -> bool:
    """Whether ``src -> dest`` is an edge: any earlier layer (factorized graph), or only
    the layer just before (unfactorized, node-level graph)."""
    return src.layer < dest.layer if factorized else src.layer + 1 == dest.layer


def dest_in_srcs(srcs: set[SrcNode], dest: DestNode, factorized: bool) -> range:
    """The contiguous source indices feeding ``dest``; checks ``dest.min_src_idx``."""
    idxs = sorted(s.src_idx for s in srcs if in_edge(s, dest, factorized))
    span = contiguous_range(idxs, dest.name)
    if idxs and span.start != dest.min_src_idx:
        raise CircuitError(
            f"DestNode {dest.name!r}: min_src_idx is {dest.min_src_idx} but its first "
            f"input source has src_idx {span.start}."
        )
    return span
