"""Evaluate circuits: run the model with the top-k edges of a score kept, for many k."""

from __future__ import annotations

import torch as t
from torch import Tensor
from tqdm.auto import tqdm

from auto_circuit.engine.ablation_activations import iter_batch_ablations
from auto_circuit.engine.graph_utils import edge_counts_util, masks_saved, patch_mode
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import desc_prune_scores
from auto_circuit.vocabulary.types import (
    AblationType,
    CircuitOutputs,
    PatchType,
    PruneScores,
    TestEdges,
)


def circuit_masks(
    prune_scores: PruneScores, threshold: Tensor | None, patch_type: PatchType
) -> dict[str, Tensor]:
    """Masks for the circuit of edges with ``|score| >= threshold`` (None: no edge).

    EDGE_PATCH masks the circuit (its edges carry clean values into a corrupt run);
    TREE_PATCH masks the complement (everything else is ablated in a clean run).
    """
    in_circuit = {
        k: v.float().abs() >= threshold if threshold is not None else t.zeros_like(v, dtype=t.bool)
        for k, v in prune_scores.items()
    }
    if patch_type == PatchType.EDGE_PATCH:
        return {k: v.float() for k, v in in_circuit.items()}
    return {k: (~v).float() for k, v in in_circuit.items()}


def run_circuits(
    model: PatchableModel,
    dataloader,
    test_edge_counts: list[int],
    prune_scores: PruneScores,
    patch_type: PatchType = PatchType.EDGE_PATCH,
    ablation_type: AblationType = AblationType.RESAMPLE,
    reverse_clean_corrupt: bool = False,
    show_progress: bool = True,
) -> CircuitOutputs:
    """Model outputs (``model.out_slice``) for the circuits of the top-k edges, for each k.

    EDGE_PATCH runs the corrupt prompts with the circuit's edges patched to the clean
    activations (ablation of the clean prompts); TREE_PATCH runs the clean prompts with
    every edge outside the circuit ablated (ablation of the corrupt prompts).
    ``reverse_clean_corrupt`` swaps clean and corrupt in both. With tied scores a
    circuit can hold more than k edges: outputs are keyed by the real circuit size.
    Outputs are detached and kept on the CPU. The masks are restored afterwards.
    """
    n_edges = model.n_edges
    if any(not 0 <= k <= n_edges for k in test_edge_counts):
        raise CircuitError(f"test_edge_counts must lie in [0, {n_edges}], got {test_edge_counts}.")
    sorted_scores = desc_prune_scores(prune_scores)
    thresholds = {k: _threshold(sorted_scores, k) for k in sorted(set(test_edge_counts))}
    sizes = {
        k: 0 if thr is None else int((sorted_scores >= thr).sum()) for k, thr in thresholds.items()
    }
    run_clean = (patch_type == PatchType.TREE_PATCH) != reverse_clean_corrupt
    outputs: CircuitOutputs = {size: {} for size in sizes.values()}
    total = len(dataloader) * len(thresholds)
    progress = tqdm(total=total, desc="run_circuits", disable=not show_progress or total < 20)
    with masks_saved(model), t.no_grad():
        patch_from = "corrupt" if run_clean else "clean"
        for batch, patch in iter_batch_ablations(model, dataloader, ablation_type, patch_from):
            inputs = batch.clean if run_clean else batch.corrupt
            with patch_mode(model, patch):
                for k, threshold in thresholds.items():
                    masks = circuit_masks(prune_scores, threshold, patch_type)
                    for name, mask in model.patch_masks.items():
                        mask.copy_(masks[name].to(mask.device, mask.dtype))
                    out = model(inputs)[model.out_slice]
                    outputs[sizes[k]][batch.key] = out.detach().to("cpu")
                    progress.update()
    progress.close()
    return outputs


def _threshold(sorted_abs_scores: Tensor, k: int) -> Tensor | None:
    """The |score| of the k-th most important edge (None for the empty circuit)."""
    return None if k == 0 else sorted_abs_scores[k - 1]


def evaluate_circuits(
    model: PatchableModel,
    dataloader,
    prune_scores: PruneScores,
    test_edge_counts: TestEdges | None = None,
    patch_type: PatchType = PatchType.EDGE_PATCH,
    ablation_type: AblationType = AblationType.RESAMPLE,
) -> CircuitOutputs:
    """``run_circuits`` at the circuit sizes ``edge_counts_util`` chooses."""
    counts = edge_counts_util(model.n_edges, test_edge_counts, prune_scores)
    return run_circuits(model, dataloader, counts, prune_scores, patch_type, ablation_type)
