"""The circuit's answer difference: mean over answers minus mean over wrong answers.

Per prompt, of the logits, probabilities or log-probabilities at the task position (the
last position the model's ``out_slice`` keeps): ``mean(answers) - mean(wrong answers)``
(the logit difference of Wang et al. 2022 for one answer each). The aggregate is the mean
over prompts.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.prune_metrics.metric_result import (
    MetricResult,
    result_from_prompts,
    to_measurements,
)
from auto_circuit.evaluation.prune_metrics.outputs import (
    ProbFunc,
    apply_prob_func,
    iter_circuit_batches,
    task_logits,
)
from auto_circuit.vocabulary.tensor_ops import answer_values
from auto_circuit.vocabulary.types import CircuitOutputs, Measurements


def answer_diffs(out: Tensor, batch: Any, prob_func: ProbFunc) -> Float[Tensor, " batch"]:
    """Per prompt: mean value of the answers minus mean value of the wrong answers."""
    vals = apply_prob_func(task_logits(out), prob_func)
    return answer_values(vals, batch.answers) - answer_values(vals, batch.wrong_answers)


def answer_diff_results(
    model: PatchableModel,
    dataloader: Any,
    circuit_outs: CircuitOutputs,
    prob_func: ProbFunc = "logits",
) -> list[MetricResult]:
    """Per-prompt answer difference for each circuit size.

    Args:
        model: The patchable model (unused: the circuit outputs hold everything).
        dataloader: The loader ``run_circuits`` ran on.
        circuit_outs: ``{circuit size: {batch key: outputs}}``.
        prob_func: ``"logits"``, ``"softmax"`` (probabilities) or ``"log_softmax"``.
    """
    per_prompt: dict[int, list] = {size: [] for size in circuit_outs}
    for batch, _, outs in iter_circuit_batches(model, dataloader, circuit_outs):
        for size, out in outs.items():
            per_prompt[size].append(answer_diffs(out, batch, prob_func))
    return [result_from_prompts(size, values) for size, values in sorted(per_prompt.items())]


def measure_answer_diff(
    model: PatchableModel,
    test_loader: Any,
    circuit_outs: CircuitOutputs,
    prob_func: ProbFunc = "logits",
) -> Measurements:
    """``[(circuit size, mean answer difference)]``; see :func:`answer_diff_results`."""
    return to_measurements(answer_diff_results(model, test_loader, circuit_outs, prob_func))


def identity(*args: Any, **kwargs: Any) -> Any:
    """The first positional argument, unchanged (AutoCircuit's ``prob_func`` for logits)."""
    if not args:
        raise TypeError("identity() needs one positional argument, the value to return.")
    return args[0]
