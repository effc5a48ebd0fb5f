"""The official circuit as prune scores: the reference point for evaluating methods."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge, PruneScores


def ground_truth_prune_scores(
    model: PatchableModel,
    dataloader: Any,
    official_edges: Collection[Edge | str] | None,
) -> PruneScores:
    """1 on the official edges, 0 elsewhere.

    Args:
        model: the patchable model.
        dataloader: unused (the common signature of prune algorithms).
        official_edges: the circuit, as ``Edge`` objects of this model (one position
            each in per-position graphs) or edge names (every position).

    Returns:
        Scores shaped like the masks (larger = more important).
    """
    if official_edges is None:
        raise CircuitError(
            "ground_truth_prune_scores needs official_edges (the official circuit), got None. "
            "Pass the official circuit's edges (Edge objects or edge names)."
        )
    foreign = [e for e in official_edges if isinstance(e, Edge) and e not in model.edges]
    if foreign:
        raise CircuitError(
            f"{len(foreign)} official edges are not edges of this model's graph, e.g. "
            f"{foreign[0]!r}. Build them from this model (model.edge(name, seq_idx)) or pass "
            "edge names."
        )
    return model.circuit_prune_scores(edges=official_edges)
