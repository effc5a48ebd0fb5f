"""Parameter integrated gradients: score edges by the attribution of their nodes' weights.

Integrated gradients (Sundararajan et al. 2017, https://arxiv.org/abs/1703.01365) taken
over the *weights* instead of the inputs: for each weight tensor ``W`` of a graph node,

    attribution(W) = (W - W_base) * mean_{alpha} d metric / d W  at  W_base + alpha (W - W_base)

with ``alpha`` on a midpoint grid of ``samples`` points in (0, 1), so that the sum of all
attributions approaches ``metric(W) - metric(W_base)`` (completeness). A node's score is
the summed ``|attribution|`` of its slice of the weight (its head's slice when the weight
holds several heads); an edge's score is the mean of its source's and destination's
scores in an edge-level graph, its source's score in a node-level one (nodes without a
weight are left out of the mean; an edge with none scores 0).

AutoCircuit 1.0.1 shipped this module entirely commented out (dead code, with a
``loss = out.mean()`` that measures nothing about the task, a baseline other than ZERO
not implemented, and a crash for nodes without weights). Here the metric is the mean
logit difference of the answers at ``model.out_slice``, all three baselines work, a node
without a weight (e.g. ``Resid End``) is left out instead of crashing, and the model's
weights and ``requires_grad`` flags are restored afterwards, also on an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import batch_avg_answer_diff
from auto_circuit.vocabulary.types import Node, PruneScores


class BaselineWeights(Enum):
    """The weights integrated from."""

    ZERO = 0
    """All zeros."""
    MEAN = 1
    """Every element the mean of its weight tensor."""
    PERMUTED = 2
    """The weight's elements in a random (seeded) order."""


def _baseline(w: Tensor, kind: BaselineWeights, generator: t.Generator) -> Tensor:
    if kind == BaselineWeights.ZERO:
        return t.zeros_like(w)
    if kind == BaselineWeights.MEAN:
        return t.full_like(w, float(w.mean()))
    perm = t.randperm(w.numel(), generator=generator).to(w.device)
    return w.flatten()[perm].reshape(w.shape)


@contextmanager
def _weights_restored(params: dict[str, t.nn.Parameter]) -> Iterator[None]:
    saved = {n: (p.detach().clone(), p.requires_grad) for n, p in params.items()}
    try:
        yield
    finally:
        with t.no_grad():
            for n, p in params.items():
                p.copy_(saved[n][0])
                p.requires_grad_(saved[n][1])
                p.grad = None


def parameter_integrated_gradients(
    model: PatchableModel,
    dataloader: Any,
    weight_names: Sequence[str],
    baseline_weights: BaselineWeights = BaselineWeights.ZERO,
    samples: int = 50,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The integrated-gradients attribution of each named weight (same shape as it) for
    the mean logit difference over ``dataloader``'s clean prompts (module docstring)."""
    if samples < 1:
        raise CircuitError(f"samples must be >= 1, got {samples}.")
    named = dict(model.wrapped_model.named_parameters())
    missing = [n for n in weight_names if n not in named]
    if missing:
        raise CircuitError(f"The model has no parameters {missing}.")
    params = {n: named[n] for n in weight_names}
    generator = t.Generator().manual_seed(seed)
    actual = {n: p.detach().clone() for n, p in params.items()}
    base = {n: _baseline(w, baseline_weights, generator) for n, w in actual.items()}
    grads = {n: t.zeros_like(w) for n, w in actual.items()}
    n_batches = len(dataloader)
    if n_batches == 0:
        raise CircuitError("The dataloader is empty.")
    with _weights_restored(params):
        for p in params.values():
            p.requires_grad_(True)
        for i in range(samples):
            alpha = (i + 0.5) / samples
            with t.no_grad():
                for n, p in params.items():
                    p.copy_(base[n] + alpha * (actual[n] - base[n]))
            for batch in dataloader:
                out = model(batch.clean)[model.out_slice]
                metric = batch_avg_answer_diff(out, batch) / n_batches
                step = t.autograd.grad(metric, list(params.values()), allow_unused=True)
                for n, g in zip(params, step, strict=True):
                    if g is not None:
                        grads[n] += g / samples
    return {n: grads[n] * (actual[n] - base[n]) for n in params}


def _weight_path(node: Node, param_names: set[str]) -> str | None:
    """The parameter path of ``node.weight``: a full path (TransformerLens families), or
    a name beside the node's module (the MicroModel's ``weights``)."""
    if node.weight is None:
        return None
    if node.weight in param_names:
        return node.weight
    parent = node.module_name.rpartition(".")[0]
    local = f"{parent}.{node.weight}" if parent else node.weight
    if local in param_names:
        return local
    raise CircuitError(f"Node {node.name}: the model has no weight {node.weight!r}.")


def _node_score(node: Node, path: str | None, attributions: dict[str, Tensor]) -> float | None:
    if path is None:
        return None
    attr = attributions[path]
    if node.weight_head_dim is not None and node.head_idx is not None:
        attr = attr.select(node.weight_head_dim, node.head_idx)
    return float(attr.abs().sum())


def parameter_integrated_grads_prune_scores(
    model: PatchableModel,
    dataloader: Any,
    baseline_weights: BaselineWeights = BaselineWeights.ZERO,
    samples: int = 50,
    seed: int = 0,
) -> PruneScores:
    """Edge scores from the integrated-gradients attribution of the nodes' weights.

    Args:
        model: The patchable model; its weights are changed during the run and restored.
        dataloader: Prompts with answers and wrong answers (the clean prompts are run).
        baseline_weights: The weights integrated from (``BaselineWeights``).
        samples: Points of the midpoint rule on the path.
        seed: Seed of the PERMUTED baseline.

    Returns:
        Scores shaped like the masks (module docstring for the definition).
    """
    param_names = {n for n, _ in model.wrapped_model.named_parameters()}
    paths = {n: _weight_path(n, param_names) for n in model.nodes}
    weight_names = sorted({p for p in paths.values() if p is not None})
    attributions = parameter_integrated_gradients(
        model, dataloader, weight_names, baseline_weights, samples, seed
    )
    node_scores = {n: _node_score(n, paths[n], attributions) for n in model.nodes}
    scores = model.new_prune_scores()
    for edge in model.edges:
        ends = (edge.src, edge.dest) if model.is_factorized else (edge.src,)
        known = [s for s in (node_scores[n] for n in ends) if s is not None]
        scores[edge.dest.module_name][edge.patch_idx] = sum(known) / len(known) if known else 0.0
    return scores
