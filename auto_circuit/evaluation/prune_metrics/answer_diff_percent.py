"""The circuit's answer difference as a percentage of the full model's.

The model's answer difference (see :mod:`answer_diff`) is taken from the unpatched
model on the clean prompts, computed once per batch. Two aggregates:

- ratio of means (``diff_of_means=True``, the IOI paper's "logit difference recovered",
  Wang et al. 2022): ``100 * mean_i(circuit_i) / mean_i(model_i)``. Each prompt's value
  is ``100 * circuit_i / mean_j(model_j)``, so their mean is the aggregate.
- mean of ratios (``diff_of_means=False``): each prompt's value is
  ``100 * circuit_i / model_i`` and the aggregate is their mean (``MetricResult.std``
  gives the spread). A prompt whose model difference is 0 gives an infinite or NaN ratio.
"""

from __future__ import annotations

from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.prune_metrics.answer_diff import answer_diffs
from auto_circuit.evaluation.prune_metrics.metric_result import MetricResult, to_measurements
from auto_circuit.evaluation.prune_metrics.outputs import ProbFunc, iter_circuit_batches
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import CircuitOutputs, Measurements


def answer_diff_percent_results(
    model: PatchableModel,
    dataloader: Any,
    circuit_outs: CircuitOutputs,
    prob_func: ProbFunc = "logits",
    diff_of_means: bool = True,
) -> list[MetricResult]:
    """Per-prompt answer difference of each circuit, in percent of the model's.

    Args:
        model: The patchable model, run unpatched on the clean prompts.
        dataloader: The loader ``run_circuits`` ran on.
        circuit_outs: ``{circuit size: {batch key: outputs}}``.
        prob_func: ``"logits"``, ``"softmax"`` (probabilities) or ``"log_softmax"``.
        diff_of_means: ``True``: the ratio of the means (IOI-paper style);
            ``False``: the mean of the per-prompt ratios.
    """
    model_diffs: list[Tensor] = []
    circuit_diffs: dict[int, list[Tensor]] = {size: [] for size in circuit_outs}
    for batch, base, outs in iter_circuit_batches(model, dataloader, circuit_outs, "clean"):
        assert base is not None
        model_diffs.append(answer_diffs(base, batch, prob_func))
        for size, out in outs.items():
            circuit_diffs[size].append(answer_diffs(out, batch, prob_func))
    model_diff = t.cat(model_diffs).cpu()
    if diff_of_means:
        denominator = model_diff.mean()
        if float(denominator) == 0.0:
            raise CircuitError(
                "The model's mean answer difference on the clean prompts is 0, so no "
                "percentage of it can be taken; check the answers and wrong answers."
            )
    else:
        denominator = model_diff
    results = []
    for size, diffs in sorted(circuit_diffs.items()):
        percent = 100.0 * t.cat(diffs).cpu() / denominator
        results.append(MetricResult(size=size, value=float(percent.mean()), per_prompt=percent))
    return results


def measure_answer_diff_percent(
    model: PatchableModel,
    test_loader: Any,
    circuit_outs: CircuitOutputs,
    prob_func: ProbFunc = "logits",
    diff_of_means: bool = True,
) -> Measurements:
    """``[(circuit size, % of the model's answer difference)]``; see
    :func:`answer_diff_percent_results`."""
    return to_measurements(
        answer_diff_percent_results(model, test_loader, circuit_outs, prob_func, diff_of_means)
    )


def answer_diff_percent(
    model: PatchableModel,
    test_loader: Any,
    circuit_outs: CircuitOutputs,
    prob_func: ProbFunc = "logits",
    diff_of_means: bool = True,
) -> list[MetricResult]:
    """AutoCircuit's name for :func:`answer_diff_percent_results`: per circuit size, the
    aggregate percentage, its spread (``MetricResult.std``) and every prompt's value."""
    return answer_diff_percent_results(model, test_loader, circuit_outs, prob_func, diff_of_means)


def identity(*args: Any, **kwargs: Any) -> Any:
    """The first positional argument, unchanged (AutoCircuit's ``prob_func`` for logits)."""
    if not args:
        raise TypeError("identity() needs one positional argument, the value to return.")
    return args[0]
