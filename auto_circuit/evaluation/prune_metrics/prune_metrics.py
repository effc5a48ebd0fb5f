"""The registry of prune metrics: how good is the circuit of the top-k edges?

A :class:`PruneMetric` pairs a metric function
``(model, dataloader, circuit_outs) -> Measurements`` (``[(circuit size, value)]``) with
its per-prompt form ``(model, dataloader, circuit_outs) -> list[MetricResult]`` and how
its curve should be read (log axes, which direction is better, the smallest value).
``PRUNE_METRIC_DICT`` maps each key to its metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.prune_metrics.answer_diff import answer_diff_results
from auto_circuit.evaluation.prune_metrics.answer_diff_percent import answer_diff_percent_results
from auto_circuit.evaluation.prune_metrics.answer_value import answer_value_results
from auto_circuit.evaluation.prune_metrics.correct_answer_percent import (
    correct_answer_percent_results,
)
from auto_circuit.evaluation.prune_metrics.kl_div import kl_div_results
from auto_circuit.evaluation.prune_metrics.metric_result import MetricResult, to_measurements
from auto_circuit.evaluation.prune_metrics.outputs import ProbFunc
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean
from auto_circuit.vocabulary.types import CircuitOutputs, Measurements

MetricFunc = Callable[[PatchableModel, Any, CircuitOutputs], Measurements]
ResultsFunc = Callable[[PatchableModel, Any, CircuitOutputs], list[MetricResult]]


@dataclass(frozen=True)
class PruneMetric:
    """A metric of circuits and how to read its curve over circuit sizes.

    Attributes:
        key: The registry key (unique).
        name: A human-readable name (axis titles).
        metric_func: ``(model, dataloader, circuit_outs) -> [(circuit size, value)]``.
        log_x: Circuit sizes are best shown on a log axis.
        log_y: Values are best shown (and integrated, see ``measurements_auc``) on a log
            axis; needs ``y_min``.
        lower_better: Smaller values mean a more faithful circuit.
        y_axes_match: Curves of different tasks share a scale (e.g. percentages).
        y_min: The smallest value the metric takes (None if unbounded below).
        results_func: The per-prompt form (None if the metric has none).
    """

    key: str
    name: str
    metric_func: MetricFunc
    log_x: bool = False
    log_y: bool = False
    lower_better: bool = False
    y_axes_match: bool = False
    y_min: float | None = None
    results_func: ResultsFunc | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise CircuitError(f"PruneMetric.key must be a non-empty string, got {self.key!r}.")
        if not isinstance(self.name, str) or not self.name:
            raise CircuitError(f"PruneMetric {self.key!r}: name must be a non-empty string.")
        if not callable(self.metric_func):
            raise CircuitError(f"PruneMetric {self.key!r}: metric_func must be callable.")
        if self.results_func is not None and not callable(self.results_func):
            raise CircuitError(f"PruneMetric {self.key!r}: results_func must be callable or None.")
        if self.log_y and self.y_min is None:
            raise CircuitError(
                f"PruneMetric {self.key!r}: log_y=True needs y_min (the floor of the log "
                "axis), e.g. y_min=0.0 for a divergence."
            )

    def results(
        self, model: PatchableModel, dataloader: Any, circuit_outs: CircuitOutputs
    ) -> list[MetricResult]:
        """The per-prompt results of every circuit size."""
        if self.results_func is None:
            raise CircuitError(f"PruneMetric {self.key!r} has no per-prompt form.")
        return self.results_func(model, dataloader, circuit_outs)


def _metric(key: str, name: str, results_func: ResultsFunc, **kwargs: Any) -> PruneMetric:
    def metric_func(
        model: PatchableModel, dataloader: Any, circuit_outs: CircuitOutputs
    ) -> Measurements:
        return to_measurements(results_func(model, dataloader, circuit_outs))

    metric_func.__name__ = f"measure_{key.lower().replace(' ', '_')}"
    metric_func.__doc__ = f"``[(circuit size, {name})]``."
    return PruneMetric(key, name, metric_func, results_func=results_func, **kwargs)


_PROB_NAMES: dict[ProbFunc, str] = {
    "logits": "Logit",
    "softmax": "Prob",
    "log_softmax": "Logprob",
}


def _answer_metric(prob_func: ProbFunc, wrong_answer: bool) -> PruneMetric:
    noun = _PROB_NAMES[prob_func]
    prefix = "Wrong Answer" if wrong_answer else "Answer"
    return _metric(
        f"{prefix} {noun}",
        f"{prefix} {noun}",
        partial(answer_value_results, prob_func=prob_func, wrong_answer=wrong_answer),
        log_x=True,
        lower_better=wrong_answer,
        y_min=0.0 if prob_func == "softmax" else None,
    )


def _diff_metric(prob_func: ProbFunc) -> PruneMetric:
    noun = _PROB_NAMES[prob_func]
    return _metric(
        f"{noun} Diff",
        f"{noun} Difference",
        partial(answer_diff_results, prob_func=prob_func),
        log_x=True,
    )


def _diff_percent_metric(prob_func: ProbFunc, diff_of_means: bool) -> PruneMetric:
    noun = _PROB_NAMES[prob_func]
    suffix = "" if diff_of_means else " Mean Of Ratios"
    how = "ratio of means" if diff_of_means else "mean of ratios"
    return _metric(
        f"{noun} Diff Percent{suffix}",
        f"{noun} Difference Percent ({how})",
        partial(answer_diff_percent_results, prob_func=prob_func, diff_of_means=diff_of_means),
        log_x=True,
        y_axes_match=True,
    )


CLEAN_KL_DIV_METRIC = _metric(
    "Clean KL Div",
    "KL Divergence to the Clean Model",
    partial(kl_div_results, compare_to_clean=True),
    log_x=True,
    log_y=True,
    lower_better=True,
    y_min=0.0,
)
CORRUPT_KL_DIV_METRIC = _metric(
    "Corrupt KL Div",
    "KL Divergence to the Corrupt Model",
    partial(kl_div_results, compare_to_clean=False),
    log_x=True,
    log_y=True,
    y_min=0.0,
)
ANSWER_LOGIT_METRIC = _answer_metric("logits", wrong_answer=False)
ANSWER_PROB_METRIC = _answer_metric("softmax", wrong_answer=False)
ANSWER_LOGPROB_METRIC = _answer_metric("log_softmax", wrong_answer=False)
WRONG_ANSWER_LOGIT_METRIC = _answer_metric("logits", wrong_answer=True)
WRONG_ANSWER_PROB_METRIC = _answer_metric("softmax", wrong_answer=True)
WRONG_ANSWER_LOGPROB_METRIC = _answer_metric("log_softmax", wrong_answer=True)
LOGIT_DIFF_METRIC = _diff_metric("logits")
PROB_DIFF_METRIC = _diff_metric("softmax")
LOGPROB_DIFF_METRIC = _diff_metric("log_softmax")
LOGIT_DIFF_PERCENT_METRIC = _diff_percent_metric("logits", diff_of_means=True)
PROB_DIFF_PERCENT_METRIC = _diff_percent_metric("softmax", diff_of_means=True)
LOGPROB_DIFF_PERCENT_METRIC = _diff_percent_metric("log_softmax", diff_of_means=True)
LOGIT_DIFF_PERCENT_MEAN_OF_RATIOS_METRIC = _diff_percent_metric("logits", diff_of_means=False)
PROB_DIFF_PERCENT_MEAN_OF_RATIOS_METRIC = _diff_percent_metric("softmax", diff_of_means=False)
LOGPROB_DIFF_PERCENT_MEAN_OF_RATIOS_METRIC = _diff_percent_metric(
    "log_softmax", diff_of_means=False
)
CORRECT_ANSWER_PERCENT_METRIC = _metric(
    "Correct Answer Percent",
    "Correct Answer Percent (argmax over the vocabulary)",
    partial(correct_answer_percent_results, out_of_correct_and_incorrect_answers=False),
    log_x=True,
    y_axes_match=True,
    y_min=0.0,
)
CORRECT_ANSWER_GREATER_THAN_INCORRECT_PERCENT_METRIC = _metric(
    "Correct Answer Greater Than Incorrect Percent",
    "Correct Answer Percent (answer beats every wrong answer)",
    partial(correct_answer_percent_results, out_of_correct_and_incorrect_answers=True),
    log_x=True,
    y_axes_match=True,
    y_min=0.0,
)

PRUNE_METRICS: tuple[PruneMetric, ...] = (
    CLEAN_KL_DIV_METRIC,
    CORRUPT_KL_DIV_METRIC,
    ANSWER_LOGIT_METRIC,
    ANSWER_PROB_METRIC,
    ANSWER_LOGPROB_METRIC,
    WRONG_ANSWER_LOGIT_METRIC,
    WRONG_ANSWER_PROB_METRIC,
    WRONG_ANSWER_LOGPROB_METRIC,
    LOGIT_DIFF_METRIC,
    PROB_DIFF_METRIC,
    LOGPROB_DIFF_METRIC,
    LOGIT_DIFF_PERCENT_METRIC,
    PROB_DIFF_PERCENT_METRIC,
    LOGPROB_DIFF_PERCENT_METRIC,
    LOGIT_DIFF_PERCENT_MEAN_OF_RATIOS_METRIC,
    PROB_DIFF_PERCENT_MEAN_OF_RATIOS_METRIC,
    LOGPROB_DIFF_PERCENT_MEAN_OF_RATIOS_METRIC,
    CORRECT_ANSWER_PERCENT_METRIC,
    CORRECT_ANSWER_GREATER_THAN_INCORRECT_PERCENT_METRIC,
)
PRUNE_METRIC_DICT: dict[str, PruneMetric] = {metric.key: metric for metric in PRUNE_METRICS}
assert len(PRUNE_METRIC_DICT) == len(PRUNE_METRICS), "registry keys must be unique"


def prune_metric(key: str) -> PruneMetric:
    """The registered metric ``key``; unknown keys list the registered ones."""
    if key not in PRUNE_METRIC_DICT:
        raise CircuitError(
            f"No prune metric {key!r}.{did_you_mean(key, PRUNE_METRIC_DICT)} Registered "
            f"metrics: {sorted(PRUNE_METRIC_DICT)}."
        )
    return PRUNE_METRIC_DICT[key]
