"""EAP-IG: edge attribution patching with integrated gradients (Hanna, Pezzelle and
Belinkov 2024, "Have Faith in Faithfulness").

Each edge ``src -> dest`` is scored by ``(ablated_src - clean_src)`` dotted with the
gradient of the metric at ``dest``'s input, averaged along a path between the corrupt
and the clean run instead of taken at the clean run alone:

- ``"inputs"``: the input embeddings are interpolated, ``corrupt + a (clean - corrupt)``
  for ``a = 1/m, ..., 1`` (m steps); cost m forward+backward passes.
- ``"activations"``: for each layer of sources in turn, their outputs are interpolated
  for every reader (every other source stays clean); the layer's edges take their
  gradients from those runs. Cost m forward+backward passes per source layer.
- ``"clean-corrupted"``: the gradients on the clean and on the corrupt input, averaged.

The differences ``ablated - clean`` are fixed; ``delta_patch_mode`` lets a mask gradient
read ``grad_dest . difference`` at any input, so every variant is one backward per step.
"""

from __future__ import annotations

from typing import Literal

import torch as t
from torch import Tensor

from auto_circuit.algorithms.mask_gradient import (
    AnswerFunction,
    GradFunction,
    answer_metric,
    apply_grad_function,
)
from auto_circuit.engine.ablation_activations import iter_batch_ablations, src_outs
from auto_circuit.engine.graph_utils import (
    delta_patch_mode,
    patch_mode,
    set_masks_from_prune_scores,
    train_mask_mode,
)
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, PruneScores

EapIgMethod = Literal["inputs", "activations", "clean-corrupted"]


_INPUT_PATH = "EAP-IG's path over the inputs (method 'inputs' or 'clean-corrupted')"


def _embed(model: PatchableModel, inputs: Tensor) -> tuple[Tensor, dict]:
    """The model's input as a point that can be interpolated, and how to run from it:
    the input residual stream where the family has a block forward, else float inputs
    themselves (integer inputs without one: an error naming the family)."""
    if model.has_block_forward or not inputs.is_floating_point():
        return model.embed(inputs, need=f"{_INPUT_PATH} on token inputs")
    return inputs, {}


def _metric(model: PatchableModel, out: Tensor, batch, grad_function, answer_function) -> Tensor:
    return answer_metric(
        apply_grad_function(out[model.out_slice], grad_function), batch, answer_function
    )


def eap_ig_prune_scores(
    model: PatchableModel,
    dataloader,
    official_edges=None,
    method: EapIgMethod = "inputs",
    steps: int = 5,
    grad_function: GradFunction = "logit",
    answer_function: AnswerFunction = "avg_diff",
    ablation_type: AblationType = AblationType.RESAMPLE,
) -> PruneScores:
    """EAP-IG scores of every edge (see the module docstring for the three methods).

    Args:
        method: ``"inputs"``, ``"activations"`` or ``"clean-corrupted"``.
        steps: points on the path (``"clean-corrupted"`` always uses its two endpoints).
        ablation_type: what an ablated source carries (RESAMPLE: its output on the
            corrupt prompts; the inputs path still runs from the corrupt prompts).

    Returns:
        Scores shaped like the masks, summed over batches, as gradients of the negated
        metric (the convention of ``mask_gradient_prune_scores``): larger absolute score
        = more important.
    """
    if steps < 1:
        raise CircuitError(f"steps must be >= 1, got {steps}.")
    if method not in ("inputs", "activations", "clean-corrupted"):
        raise CircuitError(
            f"method must be 'inputs', 'activations' or 'clean-corrupted', got {method!r}."
        )
    scores = model.new_prune_scores()
    with train_mask_mode(model) as masks:
        for batch, ablated in iter_batch_ablations(model, dataloader, ablation_type):
            if method == "activations":
                _activation_paths(
                    model, batch, ablated, steps, grad_function, answer_function, scores
                )
                continue
            alphas = (
                [0.0, 1.0]
                if method == "clean-corrupted"
                else [k / steps for k in range(1, steps + 1)]
            )
            differences = (ablated - src_outs(model, batch.clean)).expand(
                -1, batch.clean.shape[0], -1, -1
            )
            clean_point, run_kwargs = _embed(model, batch.clean)
            corrupt_point, _ = _embed(model, batch.corrupt)
            with delta_patch_mode(model, differences.contiguous()):
                for alpha in alphas:
                    point = corrupt_point + alpha * (clean_point - corrupt_point)
                    out = model(point, **run_kwargs)
                    loss = -_metric(model, out, batch, grad_function, answer_function) / len(alphas)
                    loss.backward()
            for name, mask in masks.items():
                if mask.grad is not None:
                    scores[name] += mask.grad
                    mask.grad = None
    return scores


def _activation_paths(
    model: PatchableModel,
    batch,
    ablated: Tensor,
    steps: int,
    grad_function: GradFunction,
    answer_function: AnswerFunction,
    scores: PruneScores,
) -> None:
    """EAP-IG-activations for one batch: a path per layer of sources.

    A mask value ``1 - a`` on every outgoing edge of a layer's sources makes every reader
    see ``clean + (1 - a) (ablated - clean) = ablated + a (clean - ablated)``: the layer's
    activations interpolated, everything upstream clean, so ``P - C = ablated - clean``.
    """
    src_layers = sorted({s.layer for s in model.srcs})
    src_layer_of = t.tensor([s.layer for s in model.sorted_srcs])
    with patch_mode(model, ablated):
        for layer in src_layers:
            in_layer = (src_layer_of == layer).float()
            selected = {
                name: in_layer[site.in_srcs.start : site.in_srcs.stop]
                .to(scores[name].device)
                .expand_as(scores[name])
                for name, site in model.mask_sites.items()
            }
            for k in range(1, steps + 1):
                alpha = k / steps
                set_masks_from_prune_scores(
                    model, {n: s * (1 - alpha) for n, s in selected.items()}
                )
                out = model(batch.clean)
                loss = -_metric(model, out, batch, grad_function, answer_function) / steps
                loss.backward()
            for name, mask in model.patch_masks.items():
                if mask.grad is not None:
                    scores[name] += mask.grad * selected[name]
                    mask.grad = None
