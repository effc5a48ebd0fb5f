"""AutoCircuit's metric sweep: every task x algorithm x ablation x metric.

``auto_circuit.metrics.prune_metrics.measure_prune_metrics`` resolves here. Tasks and
algorithms are keys of ``TASK_DICT`` and ``PRUNE_ALGO_DICT``; each (task, algorithm,
ablation) is evaluated once with ``run_circuits`` on the task's test prompts and every
metric reads those outputs.

Fixed from AutoCircuit: ``measurement_figs`` skips an unknown metric with an error
listing the registered ones instead of printing; tasks with and without token circuits
may share a figure; the figures are plain data-in, figure-out (``auto_circuit.figures``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.algorithms.registry import PRUNE_ALGO_DICT
from auto_circuit.app.tasks import TASK_DICT, task_by_key
from auto_circuit.engine.graph_utils import edge_counts_util
from auto_circuit.evaluation.prune_metrics.prune_metrics import PruneMetric, prune_metric
from auto_circuit.vocabulary.types import AblationType, PatchType, PruneScores

AblationMeasurements = dict[AblationType, dict[str, dict[str, dict[str, Any]]]]
"""``{ablation: {metric key: {task key: {algo key: [(circuit size, value)]}}}}``."""


def default_factory() -> defaultdict[Any, dict[Any, Any]]:
    """A ``defaultdict(dict)``."""
    return defaultdict(dict)


def double_default_factory() -> defaultdict[Any, defaultdict[Any, dict[Any, Any]]]:
    """A ``defaultdict`` of :func:`default_factory`."""
    return defaultdict(default_factory)


def measure_prune_metrics(
    ablation_types: Sequence[AblationType],
    metrics: Sequence[PruneMetric],
    task_prune_scores: Mapping[str, Mapping[str, PruneScores]],
    patch_type: PatchType,
    reverse_clean_corrupt: bool = False,
    test_edge_counts: Sequence[int] | None = None,
    show_progress: bool = True,
) -> AblationMeasurements:
    """Measure every metric of the circuits of every task's prune scores.

    Args:
        ablation_types: The ablations to evaluate the circuits with.
        metrics: The metrics (``PruneMetric``), each read from the same outputs.
        task_prune_scores: ``{task key: {algo key: prune scores}}``.
        patch_type: EDGE_PATCH or TREE_PATCH (see ``run_circuits``).
        reverse_clean_corrupt: Swap clean and corrupt prompts.
        test_edge_counts: The circuit sizes (default: ``edge_counts_util`` for each
            task and scores, with the official circuit's size).
        show_progress: Show tqdm bars.

    Returns:
        ``{ablation: {metric key: {task key: {algo key: [(circuit size, value)]}}}}``
        (nested ``defaultdict``s, as AutoCircuit's).
    """
    measurements: Any = defaultdict(double_default_factory)
    for task_key, algo_prune_scores in tqdm(
        task_prune_scores.items(), desc="Tasks", disable=not show_progress
    ):
        task = task_by_key(task_key)
        model, test_loader = task.model, task.test_loader
        for algo_key, prune_scores in algo_prune_scores.items():
            counts = list(test_edge_counts) if test_edge_counts is not None else None
            if counts is None:
                counts = edge_counts_util(
                    model.n_edges, None, prune_scores, true_edge_count=task.true_edge_count
                )
            for ablation_type in ablation_types:
                circuit_outs = run_circuits(
                    model,
                    test_loader,
                    counts,
                    prune_scores,
                    patch_type,
                    ablation_type,
                    reverse_clean_corrupt,
                    show_progress=show_progress,
                )
                for metric in metrics:
                    measurements[ablation_type][metric.key][task_key][algo_key] = (
                        metric.metric_func(model, test_loader, circuit_outs)
                    )
                del circuit_outs
    return measurements


def measurement_figs(
    measurements: Mapping[Any, Mapping[str, Any]], auc_plots: bool = False
) -> tuple:
    """The figures of :func:`measure_prune_metrics`' results: per ablation and metric, an
    ``edge_patching_plot`` (algorithms with more than one point), and with ``auc_plots``
    an ``average_auc_plot`` (relative to Random; ``inverse`` for lower-is-better metrics).
    Task and algorithm keys are shown by their registered names."""
    from auto_circuit.figures.plots import average_auc_plot, edge_patching_plot

    figs = []
    for ablation_type, metric_measurements in measurements.items():
        for metric_key, task_measurements in metric_measurements.items():
            metric = prune_metric(metric_key)
            named = {
                _name(TASK_DICT, task): {
                    _name(PRUNE_ALGO_DICT, algo): points
                    for algo, points in algo_measurements.items()
                    if len(points) > 1
                }
                for task, algo_measurements in task_measurements.items()
            }
            fig = edge_patching_plot(named, metric)
            fig.update_layout(title=f"{metric.name} ({_ablation_name(ablation_type)} ablation)")
            figs.append(fig)
            if auc_plots:
                figs.append(average_auc_plot(named, metric, inverse=metric.lower_better))
    return tuple(figs)


def _name(registry: Mapping[str, Any], key: str) -> str:
    return registry[key].name if key in registry else key


def _ablation_name(ablation_type: Any) -> str:
    return getattr(ablation_type, "name", str(ablation_type))
