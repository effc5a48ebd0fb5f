"""ROC curves of an edge ranking against an official circuit (Conmy et al. 2023, ACDC).

Growing a circuit edge by edge in order of decreasing ``|score|``, every circuit size
gives a point (false positive rate, true positive rate) against the official edges:
TPR = official edges in the circuit / official edges, FPR = other edges in the circuit
/ other edges. Edges with tied ``|score|`` enter together (one step, a diagonal
segment), so the curve does not depend on how ties are broken. The curve runs from
(0, 0) (no edge) to (1, 1) (every edge), and its trapezoid-rule area (AUC) is 1 for a
ranking that puts every official edge first, 0 for the reverse, and 0.5 in expectation
for a random one. With ties handled as one step the AUC equals the probability that an
official edge outscores another edge, counting ties as one half (the Mann-Whitney U
statistic).

Everything is vectorised: one boolean mask of the official edges shaped like the prune
scores, one sort of the scores.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from itertools import pairwise

import torch as t
from torch import Tensor

from auto_circuit.engine.graph_utils import edge_counts_util
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge, Measurements, PruneScores, TestEdges


def official_edge_mask(
    model: PatchableModel, official_edges: Collection[Edge | str]
) -> dict[str, Tensor]:
    """Boolean tensors shaped like the masks, True at the official edges.

    An ``Edge`` marks its own token position; a name (``"A0.1->MLP 2"``) marks the edge
    at every position. Unknown names raise with close matches.
    """
    if len(official_edges) == 0:
        raise CircuitError("official_edges is empty: an ROC curve needs at least one edge.")
    return model.circuit_prune_scores(edges=official_edges, bool=True)


def _flat(scores: dict[str, Tensor], keys: list[str]) -> Tensor:
    return t.cat([scores[k].flatten() for k in keys])


def _sorted_labels(
    model: PatchableModel, official_edges: Collection[Edge | str], prune_scores: PruneScores
) -> tuple[Tensor, Tensor]:
    """``|score|`` in descending order and whether each of those edges is official."""
    mask = official_edge_mask(model, official_edges)
    if set(mask) != set(prune_scores):
        raise CircuitError(
            "prune_scores and the model's masks have different modules: "
            f"{sorted(set(mask) ^ set(prune_scores))}. Score the same PatchableModel."
        )
    keys = sorted(mask)
    for k in keys:
        if prune_scores[k].shape != mask[k].shape:
            raise CircuitError(
                f"prune_scores[{k!r}] has shape {list(prune_scores[k].shape)} but the mask "
                f"{list(mask[k].shape)}."
            )
    scores = _flat(prune_scores, keys).abs().float().cpu()
    if bool(scores.isnan().any()):
        raise CircuitError("prune_scores contain NaN; an ROC curve needs an order of the edges.")
    labels = _flat(mask, keys).cpu()
    order = scores.argsort(descending=True, stable=True)
    return scores[order], labels[order]


def measure_roc(
    model: PatchableModel,
    official_edges: Collection[Edge | str],
    prune_scores: PruneScores,
    all_edges: bool = False,
    test_edge_counts: TestEdges | None = None,
) -> Measurements:
    """ROC points ``[(FPR, TPR)]`` of the circuits of the top edges by ``|score|``.

    Args:
        model: The patchable model the scores are for.
        official_edges: The official circuit: ``Edge`` objects (with their ``seq_idx`` in
            per-position graphs) or edge names (every position).
        prune_scores: Edge scores; larger ``|score|`` = earlier in the circuit.
        all_edges: A point after every group of tied scores (the exact curve). Otherwise
            only at the circuit sizes of ``edge_counts_util(n_edges, test_edge_counts,
            prune_scores)`` (the sizes faithfulness curves use), each rounded up to the
            end of its tie group as ``run_circuits`` does.
        test_edge_counts: The sizes when not ``all_edges`` (default: chosen by
            ``edge_counts_util``).

    Returns:
        Points sorted from (0, 0) to (1, 1).
    """
    scores, labels = _sorted_labels(model, official_edges, prune_scores)
    n = scores.numel()
    n_pos = int(labels.sum())
    n_neg = n - n_pos
    if n_neg == 0:
        raise CircuitError("Every edge is official, so there is no false positive rate.")
    true_pos = labels.long().cumsum(0)
    # The last index of each group of tied scores: a circuit holds whole tie groups.
    group_end = t.ones(n, dtype=t.bool)
    group_end[:-1] = scores[1:] != scores[:-1]
    if all_edges:
        ends = group_end.nonzero().flatten()
    else:
        counts = [c for c in edge_counts_util(n, test_edge_counts, prune_scores) if c > 0]
        # run_circuits keeps every edge with |score| >= the k-th score: the end of its group.
        next_end = _next_group_end(group_end)
        ends = next_end[t.tensor(counts, dtype=t.long) - 1].unique()
    tp = t.cat([t.zeros(1, dtype=t.long), true_pos[ends]])
    fp = t.cat([t.zeros(1, dtype=t.long), ends + 1 - true_pos[ends]])
    points = [(f / n_neg, p / n_pos) for f, p in zip(fp.tolist(), tp.tolist(), strict=True)]
    if points[-1] != (1.0, 1.0):
        points.append((1.0, 1.0))
    return points


measure_task_roc = measure_roc
"""AutoCircuit's name for :func:`measure_roc`."""


def _next_group_end(group_end: Tensor) -> Tensor:
    """For each sorted position, the index of the last edge of its tie group."""
    n = group_end.numel()
    end_idxs = t.where(group_end, t.arange(n), n)
    # Reverse cumulative minimum: the first group end at or after each position.
    return end_idxs.flip(0).cummin(0).values.flip(0)


def roc_auc(points: Sequence[tuple[float, float]]) -> float:
    """Trapezoid-rule area under ROC points ``[(FPR, TPR)]``."""
    pts = sorted(points)
    if len(pts) < 2:
        raise CircuitError(f"An ROC curve needs at least two points, got {pts}.")
    return sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in pairwise(pts))


def measure_roc_auc(
    model: PatchableModel,
    official_edges: Collection[Edge | str],
    prune_scores: PruneScores,
) -> float:
    """The exact ROC AUC (every tie group a point) of ``prune_scores`` against
    ``official_edges``."""
    return roc_auc(measure_roc(model, official_edges, prune_scores, all_edges=True))
