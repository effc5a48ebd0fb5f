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


def sample_hard_concrete(mask: Tensor, batch_size: int | None) -> Tensor:
    """A hard-concrete sample of gates from logits ``mask``, in [0, 1].

    With ``batch_size`` each example gets its own sample (a leading batch axis).
    """
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
    vals: Float[Tensor, "batch *pos vocab"],
    answers: Answers,
    reduce: Literal["mean", "max"] = "mean",
) -> Float[Tensor, " batch *pos"]:
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


def batch_avg_answer_val(vals: Tensor, batch: Any) -> Tensor:
    """Mean answer value over a batch (values ``[batch, vocab]`` at the task position)."""
    return answer_values(vals, batch.answers).mean()


def batch_answer_diffs(vals: Tensor, batch: Any) -> Tensor:
    """Per prompt: mean value of the answers minus mean value of the wrong answers."""
    return answer_values(vals, batch.answers) - answer_values(vals, batch.wrong_answers)


def batch_avg_answer_diff(vals: Tensor, batch: Any) -> Tensor:
    """Mean over the batch of ``batch_answer_diffs``."""
    return batch_answer_diffs(vals, batch).mean()
