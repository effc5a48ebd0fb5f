"""AutoCircuit's ``auto_circuit.metrics.official_circuits.measure_roc``: ROC curves of
:mod:`auto_circuit.evaluation.official_circuits.measure_roc`, and ``measure_roc``'s task
form, which reads official circuits from the task registry.

Fixed from AutoCircuit: its ``measure_roc(task_prune_scores)`` read
``task.model.true_edges``, which does not exist, so it always raised AttributeError;
this one reads ``task.true_edges``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from auto_circuit.app.tasks import task_by_key
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.measure_roc import (
    measure_roc_auc,
    measure_task_roc,
    official_edge_mask,
    roc_auc,
)
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge, Measurements, PruneScores, TestEdges

__all__ = [
    "measure_roc",
    "measure_roc_auc",
    "measure_task_roc",
    "official_edge_mask",
    "roc_auc",
]


def measure_roc(
    model: PatchableModel | Mapping[str, Mapping[str, PruneScores]] | None = None,
    official_edges: Collection[Edge | str] | None = None,
    prune_scores: PruneScores | None = None,
    all_edges: bool = False,
    test_edge_counts: TestEdges | None = None,
    *,
    task_prune_scores: Mapping[str, Mapping[str, PruneScores]] | None = None,
) -> Any:
    """AutoCircuit's task form ``measure_roc(task_prune_scores)`` (``{task key: {algo:
    scores}}``, positionally or by name): ``{task key: {algo: [(FPR, TPR)]}}`` against
    each task's official circuit. Given a model, official edges and scores instead, the
    points of :func:`measure_task_roc`."""
    if isinstance(model, Mapping):
        if task_prune_scores is not None:
            raise TypeError("measure_roc: task_prune_scores given twice.")
        task_prune_scores, model = model, None
    if task_prune_scores is None:
        if model is None or official_edges is None or prune_scores is None:
            raise TypeError(
                "measure_roc needs task_prune_scores, or model, official_edges and prune_scores."
            )
        return measure_task_roc(model, official_edges, prune_scores, all_edges, test_edge_counts)
    if model is not None or official_edges is not None or prune_scores is not None:
        raise TypeError(
            "measure_roc: pass either task_prune_scores (the task form) or model, "
            "official_edges and prune_scores, not both."
        )
    results: dict[str, dict[str, Measurements]] = {}
    for task_key, algo_scores in task_prune_scores.items():
        task = task_by_key(task_key)
        official = task.true_edges
        if official is None:
            raise CircuitError(f"Task {task_key!r} has no official circuit to draw ROC against.")
        results[task_key] = {
            algo: measure_task_roc(task.model, official, scores, all_edges, test_edge_counts)
            for algo, scores in algo_scores.items()
        }
    return results
