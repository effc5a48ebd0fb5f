"""Random scores: the baseline any circuit-discovery method must beat."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch as t

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.types import Edge, PruneScores


def random_prune_scores(
    model: PatchableModel,
    dataloader: Any = None,
    official_edges: Collection[Edge | str] | None = None,
    seed: int | None = None,
) -> PruneScores:
    """Independent uniform scores in [0, 1) for every edge.

    Args:
        model: the patchable model (only its mask shapes are read).
        dataloader, official_edges: unused (the common signature of prune algorithms).
        seed: the same seed gives the same scores; None draws a fresh seed. A local
            generator is used, so the global RNG state is left untouched.

    Returns:
        Scores shaped like the masks (larger = more important, at random).
    """
    generator = t.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    # A fixed module order, so a seed gives the same scores whatever the dict order.
    return {
        name: t.rand(mask.shape, generator=generator).to(mask.device, mask.dtype)
        for name, mask in sorted(model.patch_masks.items())
    }
