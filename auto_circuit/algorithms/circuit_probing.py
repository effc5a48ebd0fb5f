"""Circuit probing: subnetwork probing with a target circuit size, for several sizes.

For each size, ascending, subnetwork probing is run with the penalty
``ReLU(expected circuit size - size) / size``, so the learned circuit may use up to
``size`` edges for free. The ``size`` best edges of each run are then ranked by the
size: edges found for a smaller target rank higher. This is the "circuit probing"
variant of subnetwork probing (Cao et al. 2021; see ``subnetwork_probing``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Literal

import torch as t

from auto_circuit.algorithms.subnetwork_probing import (
    EpochCallback,
    FaithfulnessTarget,
    TrainGraph,
    check_validation_reported,
    render_train_graph,
    subnetwork_probing_prune_scores,
    with_recorder,
)
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import flat_prune_scores
from auto_circuit.vocabulary.types import AblationType, Edge, MaskFn, PruneScores

CircuitSize = int | Literal["true_size"]


def resolve_circuit_sizes(
    sizes: Sequence[CircuitSize], n_edges: int, official_edges: Collection[Any] | None
) -> list[int]:
    """The distinct target sizes, ascending: ``"true_size"`` is the number of official
    edges and sizes above ``n_edges`` are clipped to it."""
    if len(sizes) == 0:
        raise CircuitError("circuit_sizes is empty: give at least one size, e.g. ['true_size'].")
    resolved = set()
    for size in sizes:
        if size == "true_size":
            if official_edges is None:
                raise CircuitError(
                    "circuit_sizes contains 'true_size' but official_edges is None: pass the "
                    "official circuit's edges or give the sizes as numbers."
                )
            size = len(official_edges)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise CircuitError(
                f"Each circuit size must be a positive int or 'true_size', got {size!r}."
            )
        resolved.add(min(size, n_edges))
    return sorted(resolved)


def circuit_probing_prune_scores(
    model: PatchableModel,
    dataloader: Any,
    official_edges: Collection[Edge | str] | None = None,
    learning_rate: float = 0.1,
    epochs: int = 200,
    regularize_lambda: float = 0.1,
    mask_fn: MaskFn = "hard_concrete",
    dropout_p: float = 0.0,
    init_val: float = 0.0,
    circuit_sizes: Sequence[CircuitSize] = ("true_size", 1000),
    tree_optimisation: bool = False,
    avoid_edges: Collection[Edge | str] | None = None,
    avoid_lambda: float = 1.0,
    faithfulness_target: FaithfulnessTarget = "kl_div",
    ablation_type: AblationType = AblationType.RESAMPLE,
    seed: int = 0,
    epoch_callback: EpochCallback | None = None,
    show_progress: bool = True,
    show_train_graph: TrainGraph = False,
    validation_dataloader: Any = None,
) -> PruneScores:
    """Rank edges by the smallest target circuit size whose learned circuit holds them.

    Args:
        model, dataloader, learning_rate, epochs, regularize_lambda, mask_fn,
            dropout_p, init_val, tree_optimisation, avoid_edges, avoid_lambda,
            faithfulness_target, ablation_type, seed, epoch_callback, show_progress,
            validation_dataloader: as in ``subnetwork_probing_prune_scores``, for every
            run (the callback's records carry each run's ``circuit_size``).
        show_train_graph: as in ``subnetwork_probing_prune_scores``, but one figure
            for all runs, one line per target size.
        official_edges: the official circuit; only needed for ``"true_size"``.
        circuit_sizes: target sizes, ints or ``"true_size"`` (the number of official
            edges); clipped to the number of edges, deduplicated and sorted ascending.

    Returns:
        Scores shaped like the masks: with ``n`` distinct sizes, the ``size_i`` edges with
        the highest subnetwork-probing scores of run ``i`` (sizes ascending, ``i`` from 0)
        score ``n - i`` unless an earlier (smaller) run already scored them; edges chosen
        by no run score 0. Larger = more important.
    """
    sizes = resolve_circuit_sizes(circuit_sizes, model.n_edges, official_edges)
    check_validation_reported(validation_dataloader, epoch_callback, show_train_graph)
    epoch_callback, records = with_recorder(epoch_callback, show_train_graph)
    scores = model.new_prune_scores()
    names = sorted(scores)
    numels = [scores[name].numel() for name in names]
    flat = flat_prune_scores(scores)  # sorted key order, as ``names``
    for idx, size in enumerate(sizes):
        run = subnetwork_probing_prune_scores(
            model,
            dataloader,
            learning_rate=learning_rate,
            epochs=epochs,
            regularize_lambda=regularize_lambda,
            mask_fn=mask_fn,
            dropout_p=dropout_p,
            init_val=init_val,
            tree_optimisation=tree_optimisation,
            avoid_edges=avoid_edges,
            avoid_lambda=avoid_lambda,
            faithfulness_target=faithfulness_target,
            ablation_type=ablation_type,
            circuit_size=size,
            validation_dataloader=validation_dataloader,
            seed=seed,
            epoch_callback=epoch_callback,
            show_progress=show_progress,
        )
        order = flat_prune_scores(run).abs().sort(descending=True, stable=True).indices
        top = order[:size].to(flat.device)
        rank = float(len(sizes) - idx)
        flat[top] = t.maximum(flat[top], t.full_like(flat[top], rank))
    render_train_graph(records, show_train_graph, "Circuit probing")
    return {
        name: chunk.view_as(scores[name])
        for name, chunk in zip(names, flat.split(numels), strict=True)
    }
