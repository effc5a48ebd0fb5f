"""MIB's integrated faithfulness scores: CPR and CMD (Mueller et al. 2025).

The Mechanistic Interpretability Benchmark (MIB, circuit localization track) measures a
circuit C of the top-k edges by its faithfulness

    f(C) = (m(C) - m(empty)) / (m(model) - m(empty)),

where m is the task metric averaged over prompts (the logit difference), m(model) the
unpatched model on the clean prompts and m(empty) the circuit with no edge. It evaluates
circuits holding the fractions ``MIB_EDGE_FRACTIONS`` = 0.1%, 0.2%, 0.5%, 1%, 2%, 5%,
10%, 20%, 50% and 100% of the edges, and integrates over the fraction of edges x with
the trapezoid rule on a linear axis, between the smallest and the largest fraction:

    CPR = sum_i (x_{i+1} - x_i) * (f_i + f_{i+1}) / 2           (higher is better)
    CMD = sum_i (x_{i+1} - x_i) * (|1 - f_i| + |1 - f_{i+1}|) / 2  (0 is best)

CPR ("integrated circuit performance ratio") can exceed 1 when circuits that leave out
negatively acting edges beat the model. CMD ("integrated circuit-model difference") is
what MIB ranks by. As in MIB, the trapezoid is taken over the endpoint values of
``|1 - f|`` (where f crosses 1 between two points this is larger than the area of the
piecewise linear ``|1 - f|``). Here x is the real circuit size divided by the number of
edges (MIB uses the nominal fraction; the two differ by the rounding of
``int(fraction * n_edges)``, and tied scores can make a circuit larger than asked).
The empty circuit is used for m(empty) but not integrated (MIB's first point is 0.1%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch as t

from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.area_under_curve import Points
from auto_circuit.evaluation.prune_metrics.answer_diff import answer_diff_results, answer_diffs
from auto_circuit.evaluation.prune_metrics.metric_result import to_measurements
from auto_circuit.evaluation.prune_metrics.outputs import ProbFunc, as_float, model_outputs
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, Measurements, PatchType, PruneScores

MIB_EDGE_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class MIBScores:
    """CPR, CMD and the faithfulness curve ``[(fraction of edges, f)]`` they integrate."""

    cpr: float
    cmd: float
    curve: Measurements


def mib_edge_counts(n_edges: int, fractions: Sequence[float] = MIB_EDGE_FRACTIONS) -> list[int]:
    """The circuit sizes to evaluate: 0 (for m(empty)) and ``int(f * n_edges)`` per fraction."""
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise CircuitError(f"Edge fractions must lie in (0, 1], got {list(fractions)}.")
    return sorted({0} | {int(f * n_edges) for f in fractions})


def faithfulness_curve(
    measurements: Points,
    n_edges: int,
    model_value: float | None = None,
    empty_value: float | None = None,
) -> Measurements:
    """``[(size / n_edges, f)]`` for every non-empty circuit of ``measurements``.

    Args:
        measurements: ``[(circuit size, mean metric value)]``.
        n_edges: The number of edges of the graph.
        model_value: m(model); default: the value of the circuit of all ``n_edges``.
        empty_value: m(empty); default: the value of the circuit of size 0.
    """
    values = dict(measurements)
    if n_edges <= 0:
        raise CircuitError(f"n_edges must be positive, got {n_edges}.")
    if empty_value is None:
        if 0 not in values:
            raise CircuitError(
                "The measurements have no empty circuit (size 0); include it or pass empty_value."
            )
        empty_value = values[0]
    if model_value is None:
        if n_edges not in values:
            raise CircuitError(
                f"The measurements have no full circuit (size {n_edges}); include it or pass "
                "model_value."
            )
        model_value = values[n_edges]
    span = model_value - empty_value
    if span == 0:
        raise CircuitError(
            f"The model and the empty circuit score the same ({model_value}), so "
            "faithfulness is undefined."
        )
    return [
        (size / n_edges, (value - empty_value) / span)
        for size, value in sorted(values.items())
        if size > 0
    ]


def integrated_cpr(curve: Points) -> float:
    """CPR: trapezoid area under the faithfulness curve ``[(fraction, f)]``."""
    return _trapezoid(curve, lambda f: f)


def integrated_cmd(curve: Points) -> float:
    """CMD: trapezoid area under ``|1 - f|`` of the curve ``[(fraction, f)]``."""
    return _trapezoid(curve, lambda f: abs(1.0 - f))


def _trapezoid(curve: Points, height: Any) -> float:
    points = sorted(curve)
    if len(points) < 2:
        raise CircuitError(
            f"Integrating a faithfulness curve needs at least two circuit sizes, got {points}."
        )
    return sum((x2 - x1) * (height(f1) + height(f2)) / 2 for (x1, f1), (x2, f2) in pairwise(points))


def mib_scores(
    measurements: Points,
    n_edges: int,
    model_value: float | None = None,
    empty_value: float | None = None,
) -> MIBScores:
    """CPR and CMD of ``[(circuit size, mean metric value)]``; see the module docstring."""
    curve = faithfulness_curve(measurements, n_edges, model_value, empty_value)
    return MIBScores(cpr=integrated_cpr(curve), cmd=integrated_cmd(curve), curve=curve)


def measure_mib_scores(
    model: PatchableModel,
    dataloader: Any,
    prune_scores: PruneScores,
    patch_type: PatchType = PatchType.TREE_PATCH,
    ablation_type: AblationType = AblationType.RESAMPLE,
    prob_func: ProbFunc = "logits",
    fractions: Sequence[float] = MIB_EDGE_FRACTIONS,
) -> MIBScores:
    """Run MIB's circuits of ``prune_scores`` and score them with CPR and CMD.

    The metric is the answer difference (logit difference by default) averaged over
    prompts; m(model) is the unpatched model on the clean prompts. The defaults
    (TREE_PATCH with RESAMPLE: clean prompts, every edge outside the circuit takes its
    corrupt value) are MIB's counterfactual ablation.
    """
    counts = mib_edge_counts(model.n_edges, fractions)
    outs = run_circuits(
        model, dataloader, counts, prune_scores, patch_type, ablation_type, show_progress=False
    )
    measurements = to_measurements(answer_diff_results(model, dataloader, outs, prob_func))
    diffs = [
        answer_diffs(as_float(model_outputs(model, batch.clean)).cpu(), batch, prob_func)
        for batch in dataloader
    ]
    model_value = float(t.cat(diffs).mean())
    return mib_scores(measurements, model.n_edges, model_value=model_value)
