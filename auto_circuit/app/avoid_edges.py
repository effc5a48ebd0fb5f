"""AutoCircuit's search for alternative circuits that avoid a found one.

``auto_circuit.metrics.avoid_edges`` resolves here. For each task's official circuit
and tree-probing circuit (at the official circuit's size), circuit tree probing is run
again with a penalty on using that circuit's edges: if it still finds a faithful
circuit, the behaviour has more than one mechanism.

Fixed from AutoCircuit: it sorted ``PruneScores`` as a ``{Edge: float}`` dict, an older
format, and crashed on the tensors every algorithm returns; here the avoided circuit is
read from the score tensors. It also ran 2,000 epochs with a training figure shown;
``epochs`` is a parameter here and nothing is shown.
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_circuit.algorithms.circuit_probing import circuit_probing_prune_scores
from auto_circuit.app.tasks import task_by_key
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import prune_scores_threshold
from auto_circuit.vocabulary.types import Edge, PruneScores

AVOIDED_ALGOS = ("Official Circuit", "Tree Probing", "Circuit Tree Probing")
"""The algorithms whose circuits are avoided (AutoCircuit's two and our tree prober)."""


def top_edges(model: PatchableModel, prune_scores: PruneScores, count: int) -> set[Edge]:
    """The edges of the ``count`` largest ``|score|`` (ties included)."""
    threshold = prune_scores_threshold(prune_scores, count)
    return {
        edge
        for edge in model.edges
        if bool(prune_scores[edge.dest.module_name][edge.patch_idx].abs() >= threshold)
    }


def run_constrained_prune_funcs(
    task_prune_scores: Mapping[str, Mapping[str, PruneScores]],
    epochs: int = 2000,
) -> dict[str, dict[str, PruneScores]]:
    """``{task key: {"Constrained Circuit Probing " + algo key: scores}}``: circuit tree
    probing at the official circuit's size, avoiding each circuit of
    :data:`AVOIDED_ALGOS` found in ``task_prune_scores`` (learning rate 0.1,
    ``regularize_lambda`` 0.1, ``avoid_lambda`` 0.3, as AutoCircuit)."""
    results: dict[str, dict[str, PruneScores]] = {}
    for task_key, algo_prune_scores in task_prune_scores.items():
        task = task_by_key(task_key)
        size = task.true_edge_count
        if size is None:
            raise CircuitError(f"Task {task_key!r} has no official circuit size to probe at.")
        results[task_key] = {}
        for algo_key, prune_scores in algo_prune_scores.items():
            if algo_key.startswith("Constrained") or algo_key not in AVOIDED_ALGOS:
                continue
            key = f"Constrained Circuit Probing {algo_key}"
            if key in algo_prune_scores:
                continue
            results[task_key][key] = circuit_probing_prune_scores(
                task.model,
                task.train_loader,
                task.true_edges,
                learning_rate=0.1,
                epochs=epochs,
                regularize_lambda=0.1,
                mask_fn="hard_concrete",
                circuit_sizes=["true_size"],
                tree_optimisation=True,
                avoid_edges=top_edges(task.model, prune_scores, size),
                avoid_lambda=0.3,
                show_progress=False,
            )
    return results
