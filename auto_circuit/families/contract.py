"""What a model family must tell the patching engine: the plain contract.

Patching means one thing (``auto_circuit.engine.reference``): at every destination,

    input += sum over incoming edges (src -> dest) of mask[edge] * (patch[src] - current[src])

so a family says only where those pieces live in its models:

- the graph: ``SrcNode``s and ``DestNode``s;
- ``SrcSite``s: a module whose forward output holds a contiguous block of sources, and how
  to read them as ``[n_src, batch, seq, d_model]`` residual-stream contributions;
- ``DestSite``s: the module(s) where a destination's input is read (``DestHook``), and how
  to add a delta ``[batch, seq, (head,) d_model]`` there (plain addition by default);
- probes: modules whose outputs an ``apply`` needs to rebuild a destination's input (a
  block's residual stream, to rebuild one head's query input).

A family that implements this is complete: every algorithm works on it, exactly. Faster
ways to do the same (``auto_circuit.families.fast_paths``) and what some algorithms need
beyond patching (``auto_circuit.families.block_forward``) are optional capabilities on
``FamilyGraph``; the MicroModel family (``auto_circuit.families.micro``) is the example
of a family with neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch as t
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import DestNode, SrcNode

if TYPE_CHECKING:
    from auto_circuit.families.block_forward import BlockForward
    from auto_circuit.families.fast_paths import FastPaths

ReadSources = Callable[[Tensor], Tensor]
"""Hooked module output -> ``[n_src, batch, seq, d_model]`` source contributions."""

AddDelta = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]
"""(hooked tensor, the destination's delta ``[batch, seq, (head,) d_model]``, probe
outputs of this forward by module name) -> the patched tensor."""


@dataclass(frozen=True)
class SrcSite:
    """A module whose output holds the sources ``src_idxs`` (contiguous, topological).

    ``module_name`` names the sources (their nodes' ``module_name``); ``hook_module`` is
    the module whose output is read (they differ where the family reads something
    cheaper, such as a head's ``z`` before its output projection)."""

    module_name: str
    hook_module: str
    src_idxs: range
    read: ReadSources


@dataclass(frozen=True)
class DestHook:
    """One place where a destination's delta is applied.

    ``where="input"`` changes the first positional input of ``hook_module``;
    ``where="output"`` its output. ``add=None`` means plain addition."""

    hook_module: str
    where: Literal["input", "output"]
    add: AddDelta | None = None


@dataclass(frozen=True)
class DestSite:
    """A module whose destination nodes share one mask ``[(seq,) (head,) n_in]`` over the
    sources ``in_srcs`` (contiguous)."""

    module_name: str
    hooks: tuple[DestHook, ...]
    n_heads: int | None
    in_srcs: range


@dataclass(frozen=True)
class FamilyGraph:
    """Everything the engine needs to patch one model, and the family's optional
    capabilities (None where it has none)."""

    srcs: set[SrcNode]
    dests: set[DestNode]
    src_sites: list[SrcSite]
    dest_sites: list[DestSite]
    probes: list[str]
    is_transformer: bool
    separate_qkv: bool | None
    fast_paths: FastPaths | None = None
    block_forward: BlockForward | None = None


class ModelFamily(Protocol):
    """A model family: a name, a test for membership and a graph builder."""

    name: str
    description: str

    def accepts(self, model: t.nn.Module) -> bool: ...

    def build(
        self, model: t.nn.Module, factorized: bool, separate_qkv: bool | None
    ) -> FamilyGraph: ...


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
