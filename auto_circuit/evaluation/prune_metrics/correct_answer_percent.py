"""The percentage of prompts the circuit answers correctly.

A prompt is answered correctly when its best-scoring answer has a strictly larger logit,
at the task position (the last position the model's ``out_slice`` keeps), than

- every other token of the vocabulary (``out_of_correct_and_incorrect_answers=False``:
  the argmax is one of the answers), or
- every wrong answer (``True``: the answer beats the wrong answers, as in the sports
  players task).

With one answer per prompt this is "the answer is the argmax" (over the vocabulary or
over the answer and the wrong answers). A tie counts as wrong. Each prompt's value is
100 or 0; the aggregate is their mean.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.prune_metrics.metric_result import (
    MetricResult,
    result_from_prompts,
    to_measurements,
)
from auto_circuit.evaluation.prune_metrics.outputs import (
    answer_mask,
    iter_circuit_batches,
    task_logits,
)
from auto_circuit.vocabulary.tensor_ops import answer_values
from auto_circuit.vocabulary.types import CircuitOutputs, Measurements


def correct_answers(
    out: Tensor, batch: Any, out_of_correct_and_incorrect_answers: bool = False
) -> Bool[Tensor, " batch"]:
    """Per prompt, whether the best answer beats every other token (or wrong answer)."""
    logits = task_logits(out)
    best_answer = answer_values(logits, batch.answers, reduce="max")
    if out_of_correct_and_incorrect_answers:
        best_rival = answer_values(logits, batch.wrong_answers, reduce="max")
    else:
        mask = answer_mask(batch.answers, *logits.shape, device=logits.device)
        best_rival = logits.masked_fill(mask, float("-inf")).amax(dim=-1)
    return best_answer > best_rival


def correct_answer_percent_results(
    model: PatchableModel,
    dataloader: Any,
    circuit_outs: CircuitOutputs,
    out_of_correct_and_incorrect_answers: bool = False,
) -> list[MetricResult]:
    """Per prompt, 100 if the circuit answers correctly else 0, for each circuit size.

    Args:
        model: The patchable model (unused: the circuit outputs hold everything).
        dataloader: The loader ``run_circuits`` ran on.
        circuit_outs: ``{circuit size: {batch key: outputs}}``.
        out_of_correct_and_incorrect_answers: Compare with the wrong answers only,
            instead of the whole vocabulary.
    """
    per_prompt: dict[int, list] = {size: [] for size in circuit_outs}
    for batch, _, outs in iter_circuit_batches(model, dataloader, circuit_outs):
        for size, out in outs.items():
            correct = correct_answers(out, batch, out_of_correct_and_incorrect_answers)
            per_prompt[size].append(100.0 * correct.float())
    return [result_from_prompts(size, values) for size, values in sorted(per_prompt.items())]


def measure_correct_ans_percent(
    model: PatchableModel,
    dataloader: Any,
    pruned_outs: CircuitOutputs | None = None,
    out_of_correct_and_incorrect_answers: bool = False,
    *,
    circuit_outs: CircuitOutputs | None = None,
) -> Measurements:
    """``[(circuit size, % of prompts answered correctly)]``; see
    :func:`correct_answer_percent_results`.

    ``pruned_outs`` is AutoCircuit's name for the circuit outputs; ``circuit_outs`` (the
    name the other metrics use) is accepted too, but not both.
    """
    if (pruned_outs is None) == (circuit_outs is None):
        raise TypeError(
            "measure_correct_ans_percent: pass the circuit outputs once, as pruned_outs "
            "(AutoCircuit's name) or circuit_outs."
        )
    outs = pruned_outs if pruned_outs is not None else circuit_outs
    assert outs is not None
    return to_measurements(
        correct_answer_percent_results(
            model, dataloader, outs, out_of_correct_and_incorrect_answers
        )
    )
