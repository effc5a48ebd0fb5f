"""The circuit's logit, probability or log-probability of the (wrong) answers.

Per prompt: the mean, over the prompt's answers (or wrong answers), of the logit,
softmax probability or log-softmax at the task position (the last position the model's
``out_slice`` keeps). The aggregate is the mean over prompts.
"""

from __future__ import annotations

from typing import Any

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


def answer_value_results(
    model: PatchableModel,
    dataloader: Any,
    circuit_outs: CircuitOutputs,
    prob_func: ProbFunc = "logits",
    wrong_answer: bool = False,
) -> list[MetricResult]:
    """Per-prompt mean value of the answers (or wrong answers) for each circuit size.

    Args:
        model: The patchable model (unused: the circuit outputs hold everything).
        dataloader: The loader ``run_circuits`` ran on.
        circuit_outs: ``{circuit size: {batch key: outputs}}``.
        prob_func: ``"logits"``, ``"softmax"`` (probabilities) or ``"log_softmax"``.
        wrong_answer: Read the wrong answers instead of the answers.
    """
    per_prompt: dict[int, list] = {size: [] for size in circuit_outs}
    for batch, _, outs in iter_circuit_batches(model, dataloader, circuit_outs):
        answers = batch.wrong_answers if wrong_answer else batch.answers
        for size, out in outs.items():
            vals = apply_prob_func(task_logits(out), prob_func)
            per_prompt[size].append(answer_values(vals, answers))
    return [result_from_prompts(size, values) for size, values in sorted(per_prompt.items())]


def measure_answer_val(
    model: PatchableModel,
    test_loader: Any,
    circuit_outs: CircuitOutputs,
    prob_func: ProbFunc = "logits",
    wrong_answer: bool = False,
) -> Measurements:
    """``[(circuit size, mean answer value)]``; see :func:`answer_value_results`."""
    return to_measurements(
        answer_value_results(model, test_loader, circuit_outs, prob_func, wrong_answer)
    )


def identity(*args: Any, **kwargs: Any) -> Any:
    """The first positional argument, unchanged (AutoCircuit's ``prob_func`` for logits)."""
    if not args:
        raise TypeError("identity() needs one positional argument, the value to return.")
    return args[0]
