"""Evaluate circuits: run the model with the top-k edges of a score kept, for many k."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

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
    render_graph: bool = False,
    render_score_threshold: float = 0.0,
    render_file_path: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> CircuitOutputs:
    """Model outputs (``model.out_slice``) for the circuits of the top-k edges, for each k.

    EDGE_PATCH runs the corrupt prompts with the circuit's edges patched to the clean
    activations (ablation of the clean prompts); TREE_PATCH runs the clean prompts with
    every edge outside the circuit ablated (ablation of the corrupt prompts).
    ``reverse_clean_corrupt`` swaps clean and corrupt in both. With tied scores a
    circuit can hold more than k edges: outputs are keyed by the real circuit size.
    Outputs are detached and kept on the CPU. The masks are restored afterwards.

    ``render_graph`` draws every evaluated circuit with
    ``auto_circuit.figures.draw_seq_graph`` (edges with ``|score| >=
    render_score_threshold``; rendering never changes the outputs). With
    ``render_file_path`` each figure is written there instead of being shown (``.html``
    needs nothing more; static formats need Chromium): with several circuit sizes the
    size is added to the file name, ``circuit.html`` -> ``circuit-12-edges.html``.
    Without a path the figure is shown only inside IPython. AutoCircuit drew the
    current masks once per batch and size (in TREE_PATCH mode the masks are the
    complement of the circuit, so it drew the ablated edges) and overwrote one file
    each time; here each circuit is drawn once, with its own edges and scores.
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
    if render_graph:
        for k, threshold in thresholds.items():
            _render_circuit(
                model,
                dataloader,
                prune_scores,
                threshold,
                render_score_threshold,
                _render_path(render_file_path, sizes[k], len(thresholds)),
            )
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


def _render_path(path: str | os.PathLike[str] | None, size: int, n_circuits: int) -> Path | None:
    """Where circuit ``size`` is written: ``path`` itself for a single circuit, else
    ``path`` with the size before its suffix."""
    if path is None:
        return None
    path = Path(path)
    return path if n_circuits == 1 else path.with_name(f"{path.stem}-{size}-edges{path.suffix}")


def _render_circuit(
    model: PatchableModel,
    dataloader: Any,
    prune_scores: PruneScores,
    threshold: Tensor | None,
    score_threshold: float,
    file_path: Path | None,
) -> None:
    """Draw the circuit of edges with ``|score| >= threshold``, with their scores."""
    # Rendering is an opt-in side output, so the figures stage is imported here, only
    # when asked for: the algorithms stage never imports a later stage at import time.
    figures = importlib.import_module("auto_circuit.figures")
    in_circuit = circuit_masks(prune_scores, threshold, PatchType.EDGE_PATCH)
    scores = {k: v * in_circuit[k].to(v.device, v.dtype) for k, v in prune_scores.items()}
    seq_labels = getattr(dataloader, "seq_labels", None)
    if seq_labels is not None and (model.seq_len is None or len(seq_labels) != model.seq_len):
        seq_labels = None
    figures.draw_seq_graph(
        model,
        scores,
        score_threshold=score_threshold,
        seq_labels=seq_labels,
        display_ipython=file_path is None,
        file_path=file_path,
    )


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
