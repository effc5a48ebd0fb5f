"""Exact per-edge activation patching: the true effect of ablating each edge alone.

Many edges are tested per forward pass: with per-example masks
(``set_mask_batch_size``) the batch holds ``k`` copies of the prompts, copy ``i`` with
only edge ``i`` ablated.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch as t
from tqdm.auto import tqdm

from auto_circuit.algorithms.mask_gradient import (
    AnswerFunction,
    GradFunction,
    apply_grad_function,
    per_prompt_metric,
)
from auto_circuit.engine.ablation_activations import iter_batch_ablations
from auto_circuit.engine.graph_utils import patch_mode, set_mask_batch_size
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, PruneScores


def exact_patching_prune_scores(
    model: PatchableModel,
    dataloader,
    official_edges=None,
    grad_function: GradFunction = "logit",
    answer_function: AnswerFunction = "avg_diff",
    ablation_type: AblationType = AblationType.RESAMPLE,
    edges_per_forward: int = 32,
    show_progress: bool = True,
) -> PruneScores:
    """Score each edge by ``metric(clean) - metric(clean with only that edge ablated)``,
    summed over batches (the metric is the mean over a batch's prompts).

    The sign convention matches the gradient scores (the change in the negated metric),
    so a first-order method's score approximates this one. Larger absolute score = more
    important. Cost: ``n_edges / edges_per_forward`` forwards of ``edges_per_forward``
    times the batch, per batch.
    """
    if edges_per_forward < 1:
        raise CircuitError(f"edges_per_forward must be >= 1, got {edges_per_forward}.")
    flat_index = [
        (name, idx) for name, mask in model.patch_masks.items() for idx in range(mask.numel())
    ]
    scores = model.new_prune_scores()
    flat_scores = {name: s.view(-1) for name, s in scores.items()}
    total = len(dataloader) * ((len(flat_index) + edges_per_forward - 1) // edges_per_forward)
    progress = tqdm(total=total, desc="exact patching", disable=not show_progress or total < 20)
    with t.no_grad():
        for batch, patch in iter_batch_ablations(model, dataloader, ablation_type):
            n = batch.clean.shape[0]
            clean_out = model(batch.clean)[model.out_slice]
            clean_vals = apply_grad_function(clean_out, grad_function)
            clean_metric = per_prompt_metric(clean_vals, batch, answer_function).mean()
            for start in range(0, len(flat_index), edges_per_forward):
                chunk = flat_index[start : start + edges_per_forward]
                k = len(chunk)
                inputs = batch.clean.repeat(k, *([1] * (batch.clean.ndim - 1)))
                repeated = patch.expand(-1, n, -1, -1).repeat(1, k, 1, 1)
                with set_mask_batch_size(model, k * n), patch_mode(model, repeated):
                    for i, (name, idx) in enumerate(chunk):
                        model.patch_masks[name].view(k * n, -1)[i * n : (i + 1) * n, idx] = 1.0
                    out = model(inputs)[model.out_slice]
                copies = SimpleNamespace(
                    answers=_repeat_answers(batch.answers, k),
                    wrong_answers=_repeat_answers(batch.wrong_answers, k),
                )
                vals = apply_grad_function(out, grad_function)
                metric = per_prompt_metric(vals, copies, answer_function)
                per_edge = metric.reshape(k, -1).mean(dim=1)
                for (name, idx), value in zip(
                    chunk, (clean_metric - per_edge).tolist(), strict=True
                ):
                    flat_scores[name][idx] += value
                progress.update()
    progress.close()
    return scores


def _repeat_answers(answers, k: int):
    if isinstance(answers, t.Tensor):
        return answers.repeat(k, *([1] * (answers.ndim - 1)))
    return list(answers) * k
