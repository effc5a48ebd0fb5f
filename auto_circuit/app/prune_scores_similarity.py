"""AutoCircuit's ``auto_circuit.metrics.prune_scores_similarity``: top-k overlap of
:mod:`auto_circuit.evaluation.prune_scores_similarity` by task key, with the official
circuit sizes from the task registry, and its heatmap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from auto_circuit.app.tasks import task_by_key
from auto_circuit.evaluation import prune_scores_similarity as similarity
from auto_circuit.evaluation.prune_scores_similarity import Similarities, prune_score_similarities
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PruneScores

__all__ = [
    "Similarities",
    "prune_score_similarities",
    "prune_score_similarities_plotly",
    "task_prune_scores_similarities",
]


def _official_edge_count(task_key: str) -> int:
    count = task_by_key(task_key).true_edge_count
    if count is None:
        raise CircuitError(f"Task {task_key!r} has no official circuit to take the size of.")
    return count


def task_prune_scores_similarities(
    task_prune_scores: Mapping[str, Mapping[str, PruneScores]],
    edge_counts: Sequence[int],
    true_edge_counts: bool | Mapping[str, int] = False,
) -> dict[str, Similarities]:
    """``{task: prune_score_similarities(algos of the task, edge_counts)}``; with
    ``true_edge_counts=True`` each task's official circuit size (from ``TASK_DICT``) comes
    first (a mapping ``{task: size}`` gives the sizes directly)."""
    counts: Mapping[str, int] | None
    if isinstance(true_edge_counts, Mapping):
        counts = true_edge_counts
    elif true_edge_counts:
        counts = {task: _official_edge_count(task) for task in task_prune_scores}
    else:
        counts = None
    return similarity.task_prune_scores_similarities(task_prune_scores, edge_counts, counts)


def prune_score_similarities_plotly(
    task_prune_scores: Mapping[str, Mapping[str, PruneScores]],
    edge_counts: Sequence[int],
    ground_truths: bool = False,
) -> Any:
    """AutoCircuit's heatmaps of top-k overlap (``auto_circuit.figures.plots.
    prune_score_similarities_plot``). With ``ground_truths`` the tasks' official circuit
    size comes first; the tasks must then share it (one column per size)."""
    from auto_circuit.figures.plots import prune_score_similarities_plot

    counts = list(edge_counts)
    if ground_truths:
        sizes = {_official_edge_count(task) for task in task_prune_scores}
        if len(sizes) != 1:
            raise CircuitError(
                f"ground_truths=True needs tasks with one official circuit size, got "
                f"{sorted(sizes)}; plot the tasks one at a time."
            )
        counts = [*sizes, *counts]
    return prune_score_similarities_plot(task_prune_scores, counts)
