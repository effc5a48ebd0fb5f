"""Edge attribution patching through the gradients of the edge masks.

With every mask at 0 the patched model is the clean model, and the gradient of a
metric with respect to the mask of edge ``src -> dest`` is
``sum_{batch, pos} grad_dest . (patch_src - clean_src)``: the edge attribution patching
score of Syed et al. (2023), for every edge at once from one forward and one backward
pass. With ``integrated_grad_samples`` the gradient is averaged over masks set to
``0, 1/n, ..., 1`` together (integrated gradients along a global mask value, which
equals EAP-IG's "partial activations" variant).
"""

from __future__ import annotations

from typing import Literal

import torch as t
from torch import Tensor

from auto_circuit.engine.ablation_activations import iter_batch_ablations
from auto_circuit.engine.graph_utils import (
    patch_mode,
    set_all_masks,
    set_mask_batch_size,
    train_mask_mode,
)
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import (
    answer_values,
    batch_avg_answer_diff,
    batch_avg_answer_val,
)
from auto_circuit.vocabulary.types import AblationType, Edge, PruneScores

GradFunction = Literal["logit", "prob", "logprob", "logit_exp"]
AnswerFunction = Literal["avg_diff", "avg_val", "mse"]


def apply_grad_function(logits: Tensor, grad_function: GradFunction) -> Tensor:
    """Logits -> the values whose answers the metric reads."""
    if grad_function == "logit":
        return logits
    if grad_function == "prob":
        return t.softmax(logits, dim=-1)
    if grad_function == "logprob":
        return t.log_softmax(logits, dim=-1)
    if grad_function == "logit_exp":
        exp = t.exp(logits)
        return exp / exp.sum(dim=-1, keepdim=True).detach()
    raise CircuitError(
        f"grad_function must be 'logit', 'prob', 'logprob' or 'logit_exp', got {grad_function!r}."
    )


def answer_metric(vals: Tensor, batch, answer_function: AnswerFunction) -> Tensor:
    """The scalar a discovery algorithm attributes: larger = more of the behaviour."""
    if answer_function == "avg_diff":
        return batch_avg_answer_diff(vals, batch)
    if answer_function == "avg_val":
        return batch_avg_answer_val(vals, batch)
    if answer_function == "mse":
        target = batch.answers if isinstance(batch.answers, Tensor) else t.stack(batch.answers)
        return -t.nn.functional.mse_loss(vals, target.to(vals.device, vals.dtype).view_as(vals))
    raise CircuitError(
        f"answer_function must be 'avg_diff', 'avg_val' or 'mse', got {answer_function!r}."
    )


def mask_gradient_prune_scores(
    model: PatchableModel,
    dataloader,
    official_edges: set[Edge] | None = None,
    grad_function: GradFunction = "logit",
    answer_function: AnswerFunction = "avg_diff",
    mask_val: float | None = None,
    integrated_grad_samples: int | None = None,
    ablation_type: AblationType = AblationType.RESAMPLE,
    clean_corrupt: Literal["clean", "corrupt"] | None = "corrupt",
) -> PruneScores:
    """Score every edge by the gradient of the task metric with respect to its mask.

    Args:
        model: the patchable model.
        dataloader: a ``PromptDataLoader``; inputs are the clean prompts.
        official_edges: unused (the common signature of prune algorithms).
        grad_function: ``logit``, ``prob``, ``logprob`` or ``logit_exp`` (softmax with a
            stop-gradient on the normaliser) of the output.
        answer_function: ``avg_diff`` (answers minus wrong answers), ``avg_val``
            (answers) or ``mse`` (against float answers).
        mask_val: the value of every mask where the gradient is taken (0: plain EAP).
        integrated_grad_samples: instead of ``mask_val``, integrate gradients over a
            global mask value from 0 to 1 (trapezoid rule on ``0, 1/n, ..., 1``), so the
            scores sum to the metric change of ablating every edge (completeness).
        ablation_type: what ablated edges carry; ``clean_corrupt``: which prompts the
            per-batch ablations are computed from.

    Returns:
        Scores shaped like the masks: the summed gradient of the negated metric over
        batches (so with ``mask_val=0``, ``grad_function="logit"``,
        ``answer_function="avg_diff"`` this is edge attribution patching of the logit
        difference). Larger absolute score = more important.
    """
    if (mask_val is None) == (integrated_grad_samples is None):
        raise CircuitError("Give exactly one of mask_val and integrated_grad_samples.")
    if integrated_grad_samples is not None and integrated_grad_samples < 1:
        raise CircuitError("integrated_grad_samples must be >= 1.")
    # Trapezoid rule over 0, 1/n, ..., 1: completeness error O(1/n^2).
    if mask_val is not None:
        points = [(mask_val, 1.0)]
    else:
        n = integrated_grad_samples
        assert n is not None
        points = [(k / n, (0.5 if k in (0, n) else 1.0) / n) for k in range(n + 1)]
    source = "corrupt" if clean_corrupt == "corrupt" else "clean"
    scores = model.new_prune_scores()
    with train_mask_mode(model) as masks:
        for batch, patch in iter_batch_ablations(model, dataloader, ablation_type, source):
            with patch_mode(model, patch):
                for value, weight in points:
                    set_all_masks(model, value)
                    logits = model(batch.clean)[model.out_slice]
                    vals = apply_grad_function(logits, grad_function)
                    loss = -answer_metric(vals, batch, answer_function) * weight
                    loss.backward()
        for name, mask in masks.items():
            if mask.grad is not None:
                scores[name] += mask.grad.detach()
    return scores


def per_prompt_metric(vals: Tensor, batch, answer_function: AnswerFunction) -> Tensor:
    """The metric of ``answer_metric`` for each prompt separately: ``[batch]``."""
    if answer_function == "avg_diff":
        return answer_values(vals, batch.answers) - answer_values(vals, batch.wrong_answers)
    if answer_function == "avg_val":
        return answer_values(vals, batch.answers)
    if answer_function == "mse":
        target = batch.answers if isinstance(batch.answers, Tensor) else t.stack(batch.answers)
        err = (vals - target.to(vals.device, vals.dtype).view_as(vals)) ** 2
        return -err.reshape(err.shape[0], -1).mean(dim=1)
    raise CircuitError(
        f"answer_function must be 'avg_diff', 'avg_val' or 'mse', got {answer_function!r}."
    )


def mask_gradient_per_example_scores(
    model: PatchableModel,
    dataloader,
    grad_function: GradFunction = "logit",
    answer_function: AnswerFunction = "avg_diff",
    mask_val: float = 0.0,
    ablation_type: AblationType = AblationType.RESAMPLE,
    clean_corrupt: Literal["clean", "corrupt"] | None = "corrupt",
) -> dict[int, PruneScores]:
    """Edge attributions for every prompt separately (e.g. for anomaly detection).

    Returns, for each batch key, scores with a leading ``batch`` axis
    (``[batch, *mask_shape]``): the gradient of each prompt's own negated metric with
    respect to its own copy of the masks (``set_mask_batch_size``). Averaging them over
    the prompts of a batch gives that batch's ``mask_gradient_prune_scores``.
    """
    source = "corrupt" if clean_corrupt == "corrupt" else "clean"
    results: dict[int, PruneScores] = {}
    for batch, patch in iter_batch_ablations(model, dataloader, ablation_type, source):
        n_prompts = batch.clean.shape[0]
        with set_mask_batch_size(model, n_prompts), train_mask_mode(model) as masks:
            with patch_mode(model, patch):
                set_all_masks(model, mask_val)
                vals = apply_grad_function(model(batch.clean)[model.out_slice], grad_function)
                (-per_prompt_metric(vals, batch, answer_function).sum()).backward()
            results[batch.key] = {
                name: mask.grad.detach().clone()
                if mask.grad is not None
                else t.zeros_like(mask.detach())
                for name, mask in masks.items()
            }
    return results
