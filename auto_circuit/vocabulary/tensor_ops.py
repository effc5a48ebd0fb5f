"""Tensor helpers: hard-concrete mask samples and prune-score ordering."""

from __future__ import annotations

from typing import Any, Literal

import torch as t
from jaxtyping import Float
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PruneScores

# Hard-concrete stretch and temperature (Louizos et al. 2018, as used by Cao et al. 2021).
HARD_CONCRETE_LEFT = -0.1
HARD_CONCRETE_RIGHT = 1.1
HARD_CONCRETE_TEMP = 2 / 3


def sample_hard_concrete(
    mask: Tensor, batch_size: int | None, mask_expanded: bool = False
) -> Tensor:
    """A hard-concrete sample of gates from logits ``mask``, in [0, 1].

    With ``batch_size`` each example gets its own sample (a leading batch axis).
    ``mask_expanded=True`` (AutoCircuit's name) says ``mask`` already has that leading
    batch axis of size ``batch_size``: one sample per element, no new axis.
    """
    if mask_expanded:
        if batch_size is not None and (mask.ndim == 0 or mask.shape[0] != batch_size):
            raise CircuitError(
                f"mask_expanded=True needs a mask with a leading batch axis of size "
                f"{batch_size}, got shape {list(mask.shape)}."
            )
        batch_size = None
    shape = mask.shape if batch_size is None else (batch_size, *mask.shape)
    u = t.empty(shape, device=mask.device, dtype=mask.dtype).uniform_(1e-4, 1 - 1e-4)
    s = t.sigmoid((t.log(u) - t.log(1 - u) + mask) / HARD_CONCRETE_TEMP)
    stretched = s * (HARD_CONCRETE_RIGHT - HARD_CONCRETE_LEFT) + HARD_CONCRETE_LEFT
    return stretched.clamp(0.0, 1.0)


def flat_prune_scores(prune_scores: PruneScores) -> Tensor:
    """All scores in one 1-D tensor, modules in sorted key order."""
    return t.cat([prune_scores[k].flatten().float() for k in sorted(prune_scores)])


def desc_prune_scores(prune_scores: PruneScores) -> Tensor:
    """Absolute scores sorted in descending order."""
    return flat_prune_scores(prune_scores).abs().sort(descending=True).values


def prune_scores_threshold(prune_scores: PruneScores, edge_count: int) -> Tensor:
    """The absolute score of the ``edge_count``-th most important edge."""
    if edge_count == 0:
        return t.tensor(float("inf"))
    return desc_prune_scores(prune_scores)[edge_count - 1]


Answers = Tensor | list[Tensor]
"""``[batch]`` or ``[batch, answer]`` token ids, a list of one 1-D tensor per prompt
(different numbers of answers), or ``[batch, pos]`` / ``[batch, pos, answer]`` for
answers per output position."""


def answer_values(
    vals: Float[Tensor, "batch *seq vocab"],
    answers: Answers,
    reduce: Literal["mean", "max"] = "mean",
) -> Float[Tensor, " batch *seq"]:
    """Per prompt (and output position, for per-position answers), the mean (or max) of
    ``vals`` over the answer ids."""
    n_batch, n_vocab = vals.shape[0], vals.shape[-1]
    if isinstance(answers, Tensor):
        index = answers.unsqueeze(-1) if answers.ndim == vals.ndim - 1 else answers
        if index.ndim != vals.ndim or index.shape[:-1] != vals.shape[:-1] or index.shape[-1] == 0:
            raise CircuitError(
                f"Answers shaped {list(answers.shape)} do not fit {n_batch} prompts with "
                f"outputs {list(vals.shape)}: give [batch] or [batch, answer] token ids (at "
                "least one per prompt), or [batch, pos] for one answer per output position."
            )
        index = index.to(vals.device)
        check_answer_ids(index, n_vocab)
        picked = t.gather(vals, -1, index)
        return picked.mean(-1) if reduce == "mean" else picked.amax(-1)
    if vals.ndim != 2 or len(answers) != n_batch:
        raise CircuitError(
            f"{len(answers)} answer tensors for outputs {list(vals.shape)}: a list of answers "
            "needs outputs [batch, vocab] and one tensor per prompt."
        )
    rows = []
    for v, a in zip(vals, answers, strict=True):
        ids = a.reshape(-1).to(vals.device)
        if ids.numel() == 0:
            raise CircuitError("A prompt has no answers; give at least one token id.")
        check_answer_ids(ids, n_vocab)
        rows.append(v[ids].mean() if reduce == "mean" else v[ids].amax())
    return t.stack(rows)


def check_answer_ids(ids: Tensor, n_vocab: int) -> None:
    """Answer ids are integer token ids below ``n_vocab``."""
    if ids.dtype.is_floating_point or bool(((ids < 0) | (ids >= n_vocab)).any()):
        raise CircuitError(
            f"Answer ids must be integer token ids in [0, {n_vocab}), got {ids.flatten().tolist()}."
        )


def batch_avg_answer_val(vals: Tensor, batch: Any, wrong_answer: bool = False) -> Tensor:
    """Mean answer value over a batch (values ``[batch, vocab]`` at the task position):
    per prompt the mean over its answers, then the mean over prompts. With
    ``wrong_answer`` the wrong answers' values instead."""
    return answer_values(vals, batch.wrong_answers if wrong_answer else batch.answers).mean()


def batch_answer_diffs(vals: Tensor, batch: Any) -> Tensor:
    """Per prompt: mean value of the answers minus mean value of the wrong answers."""
    return answer_values(vals, batch.answers) - answer_values(vals, batch.wrong_answers)


def batch_avg_answer_diff(vals: Tensor, batch: Any) -> Tensor:
    """Mean over the batch of ``batch_answer_diffs``."""
    return batch_answer_diffs(vals, batch).mean()


def indices_vals(vals: Tensor, indices: Tensor) -> Tensor:
    """``vals`` gathered at ``indices`` along the last axis (both with the same number of
    axes): ``out[..., j] = vals[..., indices[..., j]]``."""
    if vals.ndim != indices.ndim:
        raise CircuitError(
            f"indices_vals needs vals and indices with the same number of axes, got shapes "
            f"{list(vals.shape)} and {list(indices.shape)}: add an answer axis to indices "
            "(e.g. indices.unsqueeze(-1))."
        )
    check_answer_ids(indices, vals.shape[-1])
    return t.gather(vals, -1, indices.to(vals.device))


def vocab_avg_val(vals: Tensor, indices: Tensor) -> Tensor:
    """The mean of ``indices_vals(vals, indices)`` over all its elements (a scalar)."""
    return indices_vals(vals, indices).mean()


def batch_answer_diff_percents(pred_vals: Tensor, target_vals: Tensor, batch: Any) -> Tensor:
    """Per prompt, ``100 * answer_diff(pred_vals) / answer_diff(target_vals)``: how much
    of the target's (e.g. the full model's) logit difference the prediction (e.g. a
    circuit) keeps. A prompt whose target difference is 0 gives inf or nan, as in
    AutoCircuit."""
    return batch_answer_diffs(pred_vals, batch) / batch_answer_diffs(target_vals, batch) * 100


def _single_answers(batch: Any) -> Tensor:
    """``[batch]`` correct-answer ids; each prompt must have exactly one."""
    answers = batch.answers
    if isinstance(answers, Tensor):
        if answers.ndim == 2 and answers.shape[-1] == 1:
            return answers[:, 0]
        if answers.ndim == 1:
            return answers
    elif all(a.numel() == 1 for a in answers):
        return t.stack([a.reshape(()) for a in answers])
    raise CircuitError(
        "Correct-answer proportions need exactly one correct answer per prompt "
        "([batch] or [batch, 1] answers)."
    )


def correct_answer_proportion(logits: Tensor, batch: Any) -> Tensor:
    """The fraction of prompts whose top logit (``[batch, vocab]``) is the correct answer.

    Ties count as AutoCircuit's ``argmax`` counts them (the first maximal id wins)."""
    answers = _single_answers(batch).to(logits.device)
    check_answer_ids(answers, logits.shape[-1])
    return (logits.argmax(dim=-1) == answers).float().mean()


def correct_answer_greater_than_incorrect_proportion(logits: Tensor, batch: Any) -> Tensor:
    """The fraction of prompts whose correct answer's logit is at least every wrong
    answer's. A tie counts as correct, as in AutoCircuit (its argmax over ``[correct,
    *wrong]`` returns the first maximal index, the correct one)."""
    answers = _single_answers(batch).to(logits.device)
    check_answer_ids(answers, logits.shape[-1])
    correct = logits.gather(-1, answers.unsqueeze(-1)).squeeze(-1)
    best_wrong = answer_values(logits, batch.wrong_answers, reduce="max")
    return (correct >= best_wrong).float().mean()


def multibatch_kl_div(input_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """``KL(target || input)`` summed over the last (class) axis and averaged over all
    the other axes (prompts, and positions if any). Both are log-probabilities of the
    same shape."""
    if input_logprobs.shape != target_logprobs.shape:
        raise CircuitError(
            f"multibatch_kl_div needs equal shapes, got {list(input_logprobs.shape)} and "
            f"{list(target_logprobs.shape)}."
        )
    kl = t.nn.functional.kl_div(input_logprobs, target_logprobs, reduction="sum", log_target=True)
    return kl / max(1, input_logprobs[..., 0].numel())
