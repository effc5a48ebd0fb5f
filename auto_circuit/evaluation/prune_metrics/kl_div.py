"""KL divergence between the unpatched model and the circuit.

``KL(model || circuit) = sum_vocab p_model (log p_model - log p_circuit)`` at each task
position (the positions kept by the model's ``out_slice``), computed from log-softmaxes
so it stays finite when probabilities underflow. Each prompt's value is its mean over
positions; the aggregate is the mean over prompts and positions. Tiny negative values
from rounding are clamped to 0. The model's forward runs once per batch and is shared by
every circuit size.
"""

from __future__ import annotations

from typing import Any

import torch as t
from jaxtyping import Float
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.prune_metrics.metric_result import MetricResult, to_measurements
from auto_circuit.evaluation.prune_metrics.outputs import iter_circuit_batches
from auto_circuit.vocabulary.types import CircuitOutputs, Measurements


def kl_div(
    target_logits: Float[Tensor, "*seq vocab"], logits: Float[Tensor, "*seq vocab"]
) -> Float[Tensor, " *seq"]:
    """``KL(softmax(target_logits) || softmax(logits))`` over the last axis, clamped at 0."""
    return kl_div_logprobs(t.log_softmax(target_logits, dim=-1), t.log_softmax(logits, dim=-1))


def kl_div_logprobs(
    target_logprobs: Float[Tensor, "*seq vocab"], logprobs: Float[Tensor, "*seq vocab"]
) -> Float[Tensor, " *seq"]:
    """``KL(target || other)`` from log-probabilities, summed over the vocab, clamped at 0."""
    kl = t.nn.functional.kl_div(logprobs, target_logprobs, reduction="none", log_target=True)
    return kl.sum(dim=-1).clamp(min=0.0)


def kl_div_results(
    model: PatchableModel,
    dataloader: Any,
    circuit_outs: CircuitOutputs,
    compare_to_clean: bool = True,
) -> list[MetricResult]:
    """Per-prompt KL divergence from the model (on clean or corrupt prompts) to each circuit.

    Args:
        model: The patchable model the circuits were run on (run unpatched here).
        dataloader: The loader ``run_circuits`` ran on.
        circuit_outs: ``{circuit size: {batch key: outputs}}``.
        compare_to_clean: Compare with the model on the clean prompts, else the corrupt ones.

    Returns:
        One result per circuit size; ``per_prompt`` holds each prompt's KL (mean over its
        positions) and ``value`` the mean over all prompts and positions.
    """
    baseline = "clean" if compare_to_clean else "corrupt"
    per_prompt: dict[int, list[Tensor]] = {size: [] for size in circuit_outs}
    n_positions: list[int] = []
    for _, base, outs in iter_circuit_batches(model, dataloader, circuit_outs, baseline):
        assert base is not None
        # One log-softmax of the reference per batch, reused for every circuit size.
        base_logprobs = t.log_softmax(base, dim=-1)
        n_positions.append(base.shape[1] if base.ndim == 3 else 1)
        for size, out in outs.items():
            kl = kl_div_logprobs(base_logprobs, t.log_softmax(out, dim=-1))
            per_prompt[size].append(kl.flatten(1).mean(dim=1) if kl.ndim > 1 else kl)
    results = []
    for size, values in sorted(per_prompt.items()):
        flat = t.cat(values).cpu()
        # Mean over prompts and positions: batches may keep different numbers of positions.
        pairs = zip(values, n_positions, strict=True)
        weights = t.cat([t.full((len(v),), n, dtype=flat.dtype) for v, n in pairs])
        value = float((flat * weights).sum() / weights.sum())
        results.append(MetricResult(size=size, value=value, per_prompt=flat))
    return results


def measure_kl_div(
    model: PatchableModel,
    dataloader: Any,
    circuit_outs: CircuitOutputs,
    compare_to_clean: bool = True,
) -> Measurements:
    """``[(circuit size, KL(model || circuit))]``; see :func:`kl_div_results`."""
    return to_measurements(kl_div_results(model, dataloader, circuit_outs, compare_to_clean))


def clean_kl_div_results(
    model: PatchableModel, dataloader: Any, circuit_outs: CircuitOutputs
) -> list[MetricResult]:
    """Per-prompt KL divergence from the model on the clean prompts to each circuit."""
    return kl_div_results(model, dataloader, circuit_outs, compare_to_clean=True)


def corrupt_kl_div_results(
    model: PatchableModel, dataloader: Any, circuit_outs: CircuitOutputs
) -> list[MetricResult]:
    """Per-prompt KL divergence from the model on the corrupt prompts to each circuit."""
    return kl_div_results(model, dataloader, circuit_outs, compare_to_clean=False)


def measure_clean_kl_div(
    model: PatchableModel, dataloader: Any, circuit_outs: CircuitOutputs
) -> Measurements:
    """KL divergence from the model on the clean prompts to each circuit."""
    return measure_kl_div(model, dataloader, circuit_outs, compare_to_clean=True)


def measure_corrupt_kl_div(
    model: PatchableModel, dataloader: Any, circuit_outs: CircuitOutputs
) -> Measurements:
    """KL divergence from the model on the corrupt prompts to each circuit."""
    return measure_kl_div(model, dataloader, circuit_outs, compare_to_clean=False)
