"""How much do two algorithms agree? The overlap of their top-k edges.

For a circuit size k, the overlap of two prune scores is the fraction of the k edges
with the largest ``|score|`` under one that are also among the k largest under the other:
``|top_k(a) & top_k(b)| / k``, 1 for identical rankings. When the k-th and the
(k+1)-th largest ``|score|`` of either algorithm are equal, its top k is not defined (it
depends on how ties are broken) and the overlap is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch as t
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import flat_prune_scores
from auto_circuit.vocabulary.types import PruneScores

Similarities = dict[int, dict[str, dict[str, float]]]
"""``{k: {algo_a: {algo_b: overlap}}}``."""


def _ranks(prune_scores: PruneScores) -> tuple[Tensor, Tensor]:
    """Each edge's rank by decreasing ``|score|`` (ties broken by position) and the
    sorted ``|score|``."""
    scores = flat_prune_scores(prune_scores).abs().float().cpu()
    order = scores.argsort(descending=True, stable=True)
    ranks = t.empty_like(order)
    ranks[order] = t.arange(order.numel())
    return ranks, scores[order]


def _ambiguous(sorted_scores: Tensor, k: int) -> bool:
    return k < sorted_scores.numel() and bool(sorted_scores[k - 1] == sorted_scores[k])


def prune_score_similarities(
    algo_prune_scores: Mapping[str, PruneScores], edge_counts: Sequence[int]
) -> Similarities:
    """Top-k overlap of every pair of algorithms, for each k in ``edge_counts``.

    Args:
        algo_prune_scores: ``{algo: prune scores}``, all of the same graph.
        edge_counts: Circuit sizes k, each in ``[1, n_edges]``.

    Returns:
        ``{k: {algo_a: {algo_b: overlap}}}``, NaN where ties make a top k ambiguous.
    """
    if not algo_prune_scores:
        raise CircuitError("algo_prune_scores is empty.")
    ranked = {algo: _ranks(scores) for algo, scores in algo_prune_scores.items()}
    sizes = {algo: ranks.numel() for algo, (ranks, _) in ranked.items()}
    if len(set(sizes.values())) != 1:
        raise CircuitError(f"The prune scores cover different numbers of edges: {sizes}.")
    n = next(iter(sizes.values()))
    for k in edge_counts:
        if not isinstance(k, int) or not 1 <= k <= n:
            raise CircuitError(f"Edge counts must be ints in [1, {n}], got {k!r}.")
    similarities: Similarities = {}
    for k in edge_counts:
        in_top = {algo: ranks < k for algo, (ranks, _) in ranked.items()}
        ambiguous = {algo: _ambiguous(s, k) for algo, (_, s) in ranked.items()}
        similarities[k] = {
            a: {
                b: math.nan
                if ambiguous[a] or ambiguous[b]
                else int((in_top[a] & in_top[b]).sum()) / k
                for b in ranked
            }
            for a in ranked
        }
    return similarities


def task_prune_scores_similarities(
    task_prune_scores: Mapping[str, Mapping[str, PruneScores]],
    edge_counts: Sequence[int],
    true_edge_counts: Mapping[str, int] | None = None,
) -> dict[str, Similarities]:
    """``{task: prune_score_similarities(algos of the task, edge_counts)}``.

    ``true_edge_counts`` (``{task: official circuit size}``) puts each task's size first.
    (AutoCircuit's form, ``true_edge_counts=True`` reading the sizes from the task
    registry, is ``auto_circuit.app.prune_scores_similarity``, which AutoCircuit's path
    ``auto_circuit.metrics.prune_scores_similarity`` gives.)
    """
    results: dict[str, Similarities] = {}
    for task, algo_scores in task_prune_scores.items():
        counts = list(edge_counts)
        if true_edge_counts is not None:
            if task not in true_edge_counts:
                raise CircuitError(f"true_edge_counts has no size for task {task!r}.")
            counts = [true_edge_counts[task], *counts]
        results[task] = prune_score_similarities(algo_scores, counts)
    return results
