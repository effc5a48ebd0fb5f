"""AutoCircuit's completeness metrics by task ("same under knockouts").

``auto_circuit.metrics.completeness_metrics.same_under_knockouts`` and
``...train_same_under_knockouts`` resolve here. The measurements are
:func:`auto_circuit.evaluation.completeness_metrics.knockouts.knockout_kl_divs` and
:func:`~auto_circuit.evaluation.completeness_metrics.knockouts.learn_knockouts` run on a
task's model and test prompts; the task-keyed forms look tasks up in ``TASK_DICT``.

Fixed from AutoCircuit: the model's masks are as before afterwards (AutoCircuit left
them at the last knockouts); batches of different sizes are fine (it stacked them);
training never shows a figure or prints (pass ``step_callback`` for the losses), the
penalty uses the expected number of knockouts (AutoCircuit: one noisy hard-concrete
sample), a circuit of fewer than 5 edges still has a knockout target of 1 (AutoCircuit
divided by zero), the gate samples are seeded without touching the global RNG, and the
learnt scores are ``-inf`` outside the circuit (AutoCircuit: -99).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from auto_circuit.app.tasks import TASK_DICT, task_by_key
from auto_circuit.evaluation.completeness_metrics.knockouts import (
    KnockoutScore,
    KnockoutStep,
    KnockoutTarget,
    knockout_kl_divs,
    learn_knockouts,
)
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import MaskFn, PruneScores

CompletenessScores = list[KnockoutScore]
"""``[(circuit size, n_knockouts, KL, knockout KL)]`` (named tuples-alikes)."""
AlgoCompletenessScores = dict[str, CompletenessScores]
TaskCompletenessScores = dict[str, AlgoCompletenessScores]


def _true_edge_count(task: Any) -> int:
    count = task.true_edge_count
    if count is None:
        raise CircuitError(
            f"Task {task.key!r} has no official circuit, so there is no circuit size to "
            "measure completeness at."
        )
    return count


def same_under_knockout(
    task: Any,
    circuit_ps: PruneScores,
    knockout_ps: PruneScores,
    circuit_size: int,
    knockout_threshold: float = 0.0,
) -> CompletenessScores:
    """``[KnockoutScore]`` (one) of the circuit of ``circuit_ps`` on ``task``'s test
    prompts, knocking out the circuit edges with ``knockout_ps >= knockout_threshold``.

    See :func:`~auto_circuit.evaluation.completeness_metrics.knockouts.knockout_kl_divs`.
    """
    score = knockout_kl_divs(
        task.model, task.test_loader, circuit_ps, knockout_ps, circuit_size, knockout_threshold
    )
    return [score]


def measure_same_under_knockouts(
    circuit_ps: Mapping[str, Mapping[str, PruneScores]],
    knockout_ps: Mapping[str, Mapping[str, PruneScores]],
) -> TaskCompletenessScores:
    """``{task: {algo: same_under_knockout(...)}}`` for every task and algorithm of
    ``knockout_ps`` (keys of ``TASK_DICT``), at the size of the task's official circuit."""
    results: TaskCompletenessScores = {}
    for task_key, algo_knockouts in knockout_ps.items():
        task = task_by_key(task_key)
        size = _true_edge_count(task)
        if task_key not in circuit_ps:
            raise CircuitError(f"circuit_ps has no scores for task {task_key!r}.")
        results[task_key] = {}
        for algo_key, algo_knockout_ps in algo_knockouts.items():
            if algo_key not in circuit_ps[task_key]:
                raise CircuitError(f"circuit_ps[{task_key!r}] has no scores for {algo_key!r}.")
            results[task_key][algo_key] = same_under_knockout(
                task, circuit_ps[task_key][algo_key], algo_knockout_ps, size
            )
    return results


def same_under_knockouts_fig(task_completeness_scores: Mapping[str, Mapping[str, Any]]) -> Any:
    """The figure of :func:`measure_same_under_knockouts`' results
    (``auto_circuit.figures.completeness.completeness_fig``), with the registered task
    and algorithm names."""
    from auto_circuit.algorithms.registry import PRUNE_ALGO_DICT
    from auto_circuit.figures.completeness import completeness_fig

    task_names = {k: TASK_DICT[k].name for k in task_completeness_scores if k in TASK_DICT}
    algo_names = {
        a: PRUNE_ALGO_DICT[a].name
        for algos in task_completeness_scores.values()
        for a in algos
        if a in PRUNE_ALGO_DICT
    }
    return completeness_fig(task_completeness_scores, task_names, algo_names)


def train_same_under_knockout_prune_scores(
    task: Any,
    algo: Any,
    algo_ps: PruneScores,
    circuit_size: int,
    learning_rate: float,
    epochs: int,
    regularize_lambda: float,
    mask_fn: MaskFn = "hard_concrete",
    faithfulness_target: KnockoutTarget = "kl_div",
    step_callback: Callable[[KnockoutStep], None] | None = None,
) -> PruneScores:
    """Learn the knockouts of the circuit of ``algo_ps`` that most separate it from the
    model, on ``task``'s test prompts (as AutoCircuit trained them).

    ``algo`` (the ``PruneAlgo`` that made ``algo_ps``) only named AutoCircuit's loss
    figure; it is accepted and unused. See
    :func:`~auto_circuit.evaluation.completeness_metrics.knockouts.learn_knockouts`.
    """
    del algo
    return learn_knockouts(
        task.model,
        task.test_loader,
        algo_ps,
        circuit_size,
        learning_rate=learning_rate,
        epochs=epochs,
        regularize_lambda=regularize_lambda,
        mask_fn=mask_fn,
        faithfulness_target=faithfulness_target,
        step_callback=step_callback,
    )


def train_same_under_knockouts(
    task_prune_scores: Mapping[str, Mapping[str, PruneScores]],
    algo_keys: Sequence[str] | None,
    learning_rate: float,
    epochs: int,
    regularize_lambda: float,
    faithfulness_target: KnockoutTarget = "kl_div",
) -> dict[str, dict[str, PruneScores]]:
    """``{task: {algo: learnt knockout scores}}`` at each task's official circuit size.

    ``algo_keys``: the algorithms to train for (None: all). AutoCircuit ignored this
    argument and trained every algorithm.
    """
    results: dict[str, dict[str, PruneScores]] = {}
    for task_key, algo_prune_scores in task_prune_scores.items():
        task = task_by_key(task_key)
        size = _true_edge_count(task)
        results[task_key] = {
            algo_key: train_same_under_knockout_prune_scores(
                task,
                algo_key,
                prune_scores,
                size,
                learning_rate,
                epochs,
                regularize_lambda,
                faithfulness_target=faithfulness_target,
            )
            for algo_key, prune_scores in algo_prune_scores.items()
            if algo_keys is None or algo_key in algo_keys
        }
    return results
