"""AutoCircuit's ``auto_circuit.metrics.area_under_curve``: the areas of
:mod:`auto_circuit.evaluation.area_under_curve` and their figure, ``average_auc_plot``
(the figure lives in the figures stage, so it is joined to the areas here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from auto_circuit.evaluation.area_under_curve import (
    Points,
    algo_measurements_auc,
    average_auc,
    measurements_auc,
    metric_measurements_auc,
    normalised_aucs,
    task_measurements_auc,
)

__all__ = [
    "Points",
    "algo_measurements_auc",
    "average_auc",
    "average_auc_plot",
    "measurements_auc",
    "metric_measurements_auc",
    "normalised_aucs",
    "task_measurements_auc",
]


def average_auc_plot(
    task_measurements: Mapping[str, Mapping[str, Points]],
    log_x: bool = False,
    log_y: bool = False,
    y_min: float | None = None,
    inverse: bool = False,
) -> Any:
    """AutoCircuit's ``average_auc_plot``: bars of each algorithm's area relative to
    Random's, averaged over tasks (``auto_circuit.figures.plots.average_auc_plot``).
    ``inverse=True`` (for metrics where lower is better) plots ``2 - AUC / AUC(Random)``,
    as AutoCircuit did, so that better is longer in both."""
    from auto_circuit.figures.plots import average_auc_plot as plot

    return plot(task_measurements, None, log_x, log_y, y_min, inverse=inverse)
