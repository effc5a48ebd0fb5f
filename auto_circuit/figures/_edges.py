"""The edges a figure draws, selected from prune scores without looping over the graph.

A graph can hold hundreds of thousands of edges (GPT-2 with token positions), while a
figure draws a few hundred. The edges are therefore selected on the score tensors
(``|score| >= threshold``, then the ``top_k`` largest) and only the selected mask
indices are mapped back to ``Edge`` objects: mask ``[(seq,) (head,) src]`` of module
``m`` at index ``(p, h, i)`` is the edge from source ``in_srcs.start + i`` of
``engine.dest_sites[m]`` to the destination node of ``m`` with head ``h``, at position
``p``.

Figures draw *components*, not graph nodes: a head's query, key and value inputs
(``A1.0.Q``, ``A1.0.K``, ``A1.0.V``) are destinations of the same head ``A1.0`` that is
also a source, so they are drawn as one node and flow passes through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch as t

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import DestNode, Edge, Node, PruneScores, SrcNode


@dataclass(frozen=True)
class DrawnEdge:
    """An edge of the graph and its score, as a figure draws it."""

    edge: Edge
    score: float

    @property
    def name(self) -> str:
        return self.edge.name

    @property
    def seq_idx(self) -> int | None:
        return self.edge.seq_idx

    def edge_nodes(self) -> tuple[SrcNode, DestNode]:
        return self.edge.src, self.edge.dest


def check_prune_scores(model: PatchableModel, prune_scores: PruneScores) -> None:
    """Raise unless ``prune_scores`` has exactly the model's mask modules and shapes."""
    masks = model.patch_masks
    if set(prune_scores) != set(masks):
        missing = sorted(set(masks) - set(prune_scores))
        extra = sorted(set(prune_scores) - set(masks))
        raise CircuitError(
            "prune_scores do not match the model's masks (missing modules: "
            f"{missing[:5]}, unknown modules: {extra[:5]}). Pass scores of this "
            "PatchableModel, e.g. from model.new_prune_scores() or an algorithm run on it."
        )
    for name in sorted(masks):
        mask = masks[name]
        if tuple(prune_scores[name].shape) != tuple(mask.shape):
            raise CircuitError(
                f"prune_scores[{name!r}] has shape {list(prune_scores[name].shape)} but the "
                f"mask has shape {list(mask.shape)}."
            )


def select_edges(
    model: PatchableModel,
    prune_scores: PruneScores,
    threshold: float = 0.0,
    top_k: int | None = None,
) -> list[DrawnEdge]:
    """The edges with ``|score| >= threshold`` and ``score != 0``, at most ``top_k`` of them.

    Args:
        model: The patchable model the scores belong to.
        prune_scores: Scores shaped like the model's masks (booleans count as 0/1).
        threshold: The smallest ``|score|`` kept (``>= 0``).
        top_k: Keep only the ``top_k`` largest ``|score|`` (None: all).

    Returns:
        The edges by decreasing ``|score|``; ties keep the order of the sorted module
        names and then of the mask elements.
    """
    check_prune_scores(model, prune_scores)
    if not math.isfinite(threshold) or threshold < 0:
        raise CircuitError(f"The score threshold must be finite and >= 0, got {threshold}.")
    if top_k is not None and top_k < 0:
        raise CircuitError(f"top_k must be >= 0, got {top_k}.")
    names = sorted(prune_scores)
    flat = t.cat([prune_scores[n].detach().flatten().float().cpu() for n in names])
    if bool(flat.isnan().any()):
        raise CircuitError("prune_scores contain NaN; replace them before drawing a circuit.")
    magnitude = flat.abs()
    chosen = ((magnitude >= threshold) & (magnitude > 0)).nonzero().flatten()
    order = magnitude[chosen].argsort(descending=True, stable=True)
    chosen = chosen[order if top_k is None else order[:top_k]]

    sizes = t.tensor([prune_scores[n].numel() for n in names])
    ends = sizes.cumsum(0)
    module_of = t.searchsorted(ends, chosen, right=True)
    local = chosen - (ends - sizes)[module_of]
    srcs = {s.src_idx: s for s in model.srcs}
    dests = _dests_by_module(model)

    coords: dict[int, list[tuple[int, ...]]] = {}
    for m in module_of.unique().tolist():
        pick = local[module_of == m]
        unravelled = t.unravel_index(pick, tuple(prune_scores[names[m]].shape))
        coords[m] = list(zip(*(c.tolist() for c in unravelled), strict=True))
    cursor = dict.fromkeys(coords, 0)
    values = flat[chosen].tolist()
    drawn: list[DrawnEdge] = []
    for m, value in zip(module_of.tolist(), values, strict=True):
        idx = coords[m][cursor[m]]
        cursor[m] += 1
        drawn.append(DrawnEdge(_edge(model, names[m], idx, srcs, dests), value))
    return drawn


def _dests_by_module(model: PatchableModel) -> dict[str, dict[int | None, DestNode]]:
    table: dict[str, dict[int | None, DestNode]] = {}
    for dest in model.dests:
        table.setdefault(dest.module_name, {})[dest.head_idx] = dest
    return table


def _edge(
    model: PatchableModel,
    module: str,
    idx: Sequence[int],
    srcs: dict[int, SrcNode],
    dests: dict[str, dict[int | None, DestNode]],
) -> Edge:
    site = model.mask_site(module)
    rest = list(idx)
    seq_idx = rest.pop(0) if model.seq_len is not None else None
    head = rest.pop(0) if site.n_heads is not None else None
    src = srcs[site.in_srcs.start + rest[0]]
    return Edge(src, dests[module][head], seq_idx)


def finite_magnitudes(scores: Sequence[float]) -> list[float]:
    """``|score|`` with infinite scores (e.g. ACDC's always-kept edges) replaced by the
    largest finite magnitude (1 when there is none), so they can be drawn as widths."""
    finite = [abs(s) for s in scores if math.isfinite(s)]
    cap = max(finite) if finite else 1.0
    return [abs(s) if math.isfinite(s) else cap for s in scores]


def format_score(score: float) -> str:
    return f"{score:.4g}"


class Components:
    """Figure nodes of a graph: each source, and each destination merged into the source
    of the same component (see the module docstring).

    Attributes:
        layer: ``{component name: layer}`` for every component of the graph.
        order: ``{component name: sort key}`` to order components within a layer
            (topological source order, then destinations by name).
    """

    def __init__(self, model: PatchableModel):
        src_names = {s.name: s for s in model.srcs}
        self._dest_component: dict[str, str] = {}
        self.layer: dict[str, int] = {s.name: s.layer for s in model.srcs}
        self.order: dict[str, tuple[int, str]] = {s.name: (s.src_idx, s.name) for s in model.srcs}
        n_srcs = len(src_names)
        for dest in sorted(model.dests, key=lambda d: d.name):
            name = _component_name(dest, src_names)
            self._dest_component[dest.name] = name
            if name not in self.layer:
                self.layer[name] = dest.layer
                self.order[name] = (n_srcs, name)

    def of(self, node: Node) -> str:
        """The component drawing ``node``."""
        if isinstance(node, DestNode):
            return self._dest_component[node.name]
        return node.name

    def layers(self) -> list[int]:
        """Every layer holding a component, ascending."""
        return sorted(set(self.layer.values()))


def _component_name(dest: DestNode, src_names: dict[str, SrcNode]) -> str:
    if dest.name in src_names:
        return dest.name
    head_name, _, suffix = dest.name.rpartition(".")
    if dest.head_idx is not None and suffix in ("Q", "K", "V") and head_name in src_names:
        return head_name
    return dest.name
