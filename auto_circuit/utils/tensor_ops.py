"""Tensor helpers: hard-concrete mask samples and prune-score ordering."""

from __future__ import annotations

from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.types import PruneScores

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


def answer_values(vals: Tensor, answers: Tensor | list[Tensor]) -> Tensor:
    """Per prompt, the mean over its answers of ``vals[prompt, answer]``: ``[batch]``.

    ``answers`` is ``[batch, n_answers]`` or a list of 1-D tensors (ragged)."""
    if isinstance(answers, Tensor):
        index = answers if answers.ndim == vals.ndim else answers.unsqueeze(-1)
        return t.gather(vals, -1, index.to(vals.device)).mean(dim=-1)
    return t.stack([v[a.to(v.device)].mean() for v, a in zip(vals, answers, strict=True)])


def batch_avg_answer_val(vals: Tensor, batch: Any) -> Tensor:
    """Mean answer value over a batch (values ``[batch, vocab]`` at the task position)."""
    return answer_values(vals, batch.answers).mean()


def batch_answer_diffs(vals: Tensor, batch: Any) -> Tensor:
    """Per prompt: mean value of the answers minus mean value of the wrong answers."""
    return answer_values(vals, batch.answers) - answer_values(vals, batch.wrong_answers)


def batch_avg_answer_diff(vals: Tensor, batch: Any) -> Tensor:
    """Mean over the batch of ``batch_answer_diffs``."""
    return batch_answer_diffs(vals, batch).mean()
