"""Area under a metric's curve over circuit sizes, and that area relative to Random.

A faithfulness curve ``[(circuit size, metric value)]`` is summarised by its area, by
the trapezoid rule, optionally with log axes (circuit sizes span orders of magnitude,
divergences too):

- x is the circuit size, or ``log10(size)`` with ``log_x``. With ``log_x`` points at
  size 0 are dropped (``log 0`` is ``-inf``), so the area starts at the smallest
  non-empty circuit.
- y is the height above the floor ``y_min`` (0 when None): ``y - y_min``. With
  ``log_y`` it is the number of decades above the floor at resolution ``eps``:
  ``log10(max(y - y_min, 0) + eps) - log10(eps)``, which is 0 at the floor and never
  negative. ``log_y`` needs ``y_min``.

A larger area means a curve that is higher over more circuit sizes: better for metrics
where higher is better, worse for ``lower_better`` metrics (KL divergence). Dividing by
the area of the Random algorithm's curve on the same task makes areas comparable across
tasks (AutoCircuit's "average AUC"; Miller et al. 2024, "Transformer Circuit
Faithfulness Metrics are not Robust").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise

from auto_circuit.vocabulary.errors import CircuitError

Points = Sequence[tuple[float, float]]
"""``[(x, y)]`` points; any sequence of pairs (``Measurements`` included)."""


def measurements_auc(
    points: Points,
    log_x: bool = False,
    log_y: bool = False,
    y_min: float | None = None,
    eps: float = 1e-3,
) -> float:
    """Trapezoid-rule area under ``points`` (see the module docstring for the axes).

    Args:
        points: ``[(x, y)]`` in any order.
        log_x: Integrate over ``log10(x)``; points with ``x <= 0`` are dropped.
        log_y: Integrate ``log10(max(y - y_min, 0) + eps) - log10(eps)``.
        y_min: The floor the height is measured from (0 when None; required with log_y).
        eps: The resolution of the log-y axis (heights far below it count as 0).

    Returns:
        The area (0 when fewer than two points are left).
    """
    if log_y and y_min is None:
        raise CircuitError("measurements_auc: log_y=True needs y_min (the floor of the log axis).")
    if eps <= 0:
        raise CircuitError(f"measurements_auc: eps must be positive, got {eps}.")
    if any(not (math.isfinite(x) and math.isfinite(y)) for x, y in points):
        raise CircuitError(f"measurements_auc: points must be finite, got {points}.")
    floor = 0.0 if y_min is None else y_min
    xs, ys = [], []
    for x, y in sorted(points):
        if log_x and x <= 0:
            continue
        xs.append(math.log10(x) if log_x else float(x))
        height = y - floor
        ys.append(math.log10(max(height, 0.0) + eps) - math.log10(eps) if log_y else height)
    segments = pairwise(zip(xs, ys, strict=True))
    return sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in segments)


def normalised_aucs(
    task_measurements: Mapping[str, Mapping[str, Points]],
    log_x: bool = False,
    log_y: bool = False,
    y_min: float | None = None,
    eps: float = 1e-3,
    baseline_algo: str = "Random",
) -> dict[str, dict[str, float]]:
    """``{task: {algo: AUC(algo) / AUC(baseline_algo)}}`` (pass a metric's ``log_x``,
    ``log_y`` and ``y_min``).

    Args:
        task_measurements: ``{task: {algo: [(circuit size, value)]}}``; every task needs
            the ``baseline_algo`` curve.
        baseline_algo: The algorithm the areas are divided by (usually Random).
    """
    ratios: dict[str, dict[str, float]] = {}
    for task, algo_measurements in task_measurements.items():
        if baseline_algo not in algo_measurements:
            raise CircuitError(
                f"Task {task!r} has no measurements of the baseline algorithm "
                f"{baseline_algo!r} (algorithms: {sorted(algo_measurements)}); run it too "
                "or pass baseline_algo."
            )
        aucs = {
            algo: measurements_auc(points, log_x, log_y, y_min, eps)
            for algo, points in algo_measurements.items()
        }
        if aucs[baseline_algo] == 0:
            raise CircuitError(
                f"Task {task!r}: the {baseline_algo!r} curve has zero area, so areas cannot be "
                "normalised by it."
            )
        ratios[task] = {algo: auc / aucs[baseline_algo] for algo, auc in aucs.items()}
    return ratios


def average_auc(
    task_measurements: Mapping[str, Mapping[str, Points]],
    log_x: bool = False,
    log_y: bool = False,
    y_min: float | None = None,
    eps: float = 1e-3,
    baseline_algo: str = "Random",
) -> dict[str, float]:
    """``{algo: mean over tasks of AUC(algo) / AUC(baseline_algo)}``.

    An algorithm is averaged over the tasks it was measured on; see
    :func:`normalised_aucs`.
    """
    per_task = normalised_aucs(task_measurements, log_x, log_y, y_min, eps, baseline_algo)
    by_algo: dict[str, list[float]] = {}
    for ratios in per_task.values():
        for algo, ratio in ratios.items():
            by_algo.setdefault(algo, []).append(ratio)
    return {algo: sum(values) / len(values) for algo, values in by_algo.items()}


def algo_measurements_auc(
    algo_measurements: Mapping[str, Points],
    log_x: bool,
    log_y: bool,
    y_min: float | None = None,
) -> dict[str, float]:
    """``{algo: measurements_auc(points)}`` for every algorithm with more than one point
    (a single point, e.g. an official circuit's size, has no area)."""
    return {
        algo: measurements_auc(points, log_x, log_y, y_min)
        for algo, points in algo_measurements.items()
        if len(points) > 1
    }


def task_measurements_auc(
    task_measurements: Mapping[str, Mapping[str, Points]],
    log_x: bool,
    log_y: bool,
    y_min: float | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: algo_measurements_auc(...)}``."""
    return {
        task: algo_measurements_auc(algo_measurements, log_x, log_y, y_min)
        for task, algo_measurements in task_measurements.items()
    }


def metric_measurements_auc(
    points: Mapping[str, Mapping[str, Mapping[str, Points]]],
    log_x: bool,
    log_y: bool,
    y_min: float | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{metric: task_measurements_auc(...)}`` (every metric read with the same axes)."""
    return {
        metric: task_measurements_auc(task_measurements, log_x, log_y, y_min)
        for metric, task_measurements in points.items()
    }
