"""Activation magnitude: a baseline that scores an edge by how large its source's output is.

The score ignores the destination and the task: a baseline that tells whether a
discovery method does better than "large activations matter".
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from jaxtyping import Float
from torch import Tensor

from auto_circuit.engine.ablation_activations import src_outs
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge, PruneScores


def _source_magnitudes(model: PatchableModel, dataloader: Any) -> Float[Tensor, "n_src ..."]:
    """Per source, ``|mean over batch, (seq,) d_model of its clean output|``, averaged
    over batches (``[n_src, seq]`` in per-position graphs, else ``[n_src]``)."""
    total: Tensor | None = None
    n_batches = 0
    for batch in dataloader:
        outs = src_outs(model, batch.clean)  # [n_src, batch, seq, d_model]
        dims = (1, 3) if model.seq_len is not None else (1, 2, 3)
        magnitude = outs.mean(dim=dims).abs()
        total = magnitude if total is None else total + magnitude
        n_batches += 1
    if total is None:
        raise CircuitError("The dataloader is empty: activation magnitudes need prompts.")
    return total / n_batches


def activation_magnitude_prune_scores(
    model: PatchableModel,
    dataloader: Any,
    official_edges: Collection[Edge | str] | None = None,
) -> PruneScores:
    """Score every edge by the mean clean output of its source (one forward per batch).

    Args:
        model: the patchable model.
        dataloader: a ``PromptDataLoader``; its clean prompts are run.
        official_edges: unused (the common signature of prune algorithms).

    Returns:
        Scores shaped like the masks: for edge ``src -> dest`` (at position ``s`` in
        per-position graphs), ``|mean of src's output over the batch, (the other)
        positions and d_model|``, averaged over batches. Equal for all edges leaving one
        source (at one position). Larger = more important.
    """
    magnitudes = _source_magnitudes(model, dataloader).to(model.device)
    scores: PruneScores = {}
    for name, mask in model.patch_masks.items():
        site = model.mask_site(name)
        incoming = magnitudes[site.in_srcs.start : site.in_srcs.stop]  # [n_in, *seq]
        if model.seq_len is not None:
            incoming = incoming.T  # [seq, n_in]
            if site.n_heads is not None:
                incoming = incoming.unsqueeze(1)  # [seq, 1, n_in]
        scores[name] = incoming.expand(mask.shape).to(mask.dtype).clone()
    return scores
