"""Reading circuit outputs, the unpatched model's outputs and the answers of a batch.

Circuit outputs (``CircuitOutputs``, from ``run_circuits``) are matched to the batches of
a dataloader by ``batch.key``. Metrics are computed on the device of the circuit outputs
(the CPU for ``run_circuits``): the model's own outputs and the answers are moved there,
and half-precision outputs are promoted to float32 so softmaxes and KL divergences are
computed stably.

Answers may be a ``[batch, answer]`` tensor (or ``[batch]`` for one answer per prompt)
or a list with one 1-D tensor of token ids per prompt (prompts with different numbers
of answers).

Axis names are those of :mod:`auto_circuit.vocabulary.axes` (``seq``: the positions kept
by the model's ``out_slice``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch as t
from jaxtyping import Bool, Float
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import Answers
from auto_circuit.vocabulary.types import CircuitOutputs

ProbFunc = Literal["logits", "softmax", "log_softmax"]
"""How logits become the values whose answers a metric reads."""

Baseline = Literal["clean", "corrupt"]
"""Which prompts the unpatched model runs on for a metric's reference values."""


def as_float(x: Tensor) -> Tensor:
    """``x`` in at least float32 (half precision is promoted; float64 is kept)."""
    if not x.is_floating_point():
        raise CircuitError(f"Expected model outputs (floats), got a {x.dtype} tensor.")
    return x.to(t.promote_types(x.dtype, t.float32))


def model_outputs(model: PatchableModel, inputs: Tensor) -> Tensor:
    """The unpatched model's output on ``inputs``, at ``model.out_slice``, detached."""
    if isinstance(model, PatchableModel) and model.is_patching:
        raise CircuitError(
            "The metric's reference forward needs the unpatched model, but the model is in "
            "patch_mode. Call the metric outside the patch_mode context."
        )
    with t.no_grad():
        out = model(inputs)[model.out_slice]
    return out.detach()


def iter_circuit_batches(
    model: PatchableModel,
    dataloader: Any,
    circuit_outs: CircuitOutputs,
    baseline: Baseline | None = None,
) -> Iterator[tuple[Any, Tensor | None, dict[int, Tensor]]]:
    """For each batch: ``(batch, baseline outputs or None, {size: circuit outputs})``.

    The baseline (the unpatched model on the clean or corrupt prompts) is computed once
    per batch and shared by every circuit size. Sizes are in increasing order. All
    tensors are on the circuit outputs' device, in at least float32.
    """
    if not circuit_outs:
        raise CircuitError(
            "circuit_outs is empty: pass the outputs of run_circuits (or evaluate_circuits)."
        )
    if baseline not in (None, "clean", "corrupt"):
        raise CircuitError(f"baseline must be 'clean', 'corrupt' or None, got {baseline!r}.")
    sizes = sorted(circuit_outs)
    for batch in dataloader:
        outs = {size: as_float(_circuit_batch_out(circuit_outs, size, batch.key)) for size in sizes}
        device = next(iter(outs.values())).device
        base = None
        if baseline is not None:
            inputs = batch.clean if baseline == "clean" else batch.corrupt
            base = as_float(model_outputs(model, inputs)).to(device)
            for size, out in outs.items():
                if out.shape != base.shape:
                    raise CircuitError(
                        f"Circuit outputs of size {size} have shape {list(out.shape)} but the "
                        f"model's outputs {list(base.shape)}; they must come from the same "
                        "model and dataloader."
                    )
        yield batch, base, outs


def _circuit_batch_out(circuit_outs: CircuitOutputs, size: int, key: int) -> Tensor:
    batch_outs = circuit_outs[size]
    if key not in batch_outs:
        raise CircuitError(
            f"circuit_outs[{size}] has no outputs for batch key {key} ({len(batch_outs)} "
            "batches stored). Evaluate the metric on the dataloader that run_circuits ran on."
        )
    return batch_outs[key]


def task_logits(out: Tensor) -> Float[Tensor, "batch vocab"]:
    """Logits at the task position: the output itself, or its last kept position."""
    if out.ndim == 2:
        return out
    if out.ndim == 3:
        return out[:, -1]
    raise CircuitError(
        f"Expected outputs shaped [batch, vocab] or [batch, seq, vocab], got {list(out.shape)}."
    )


def apply_prob_func(logits: Tensor, prob_func: ProbFunc) -> Tensor:
    """Logits, probabilities or log-probabilities over the last axis."""
    if prob_func == "logits":
        return logits
    if prob_func == "softmax":
        return t.softmax(logits, dim=-1)
    if prob_func == "log_softmax":
        return t.log_softmax(logits, dim=-1)
    raise CircuitError(
        f"prob_func must be 'logits', 'softmax' or 'log_softmax', got {prob_func!r}."
    )


def answer_mask(
    answers: Answers, n_batch: int, n_vocab: int, device: t.device
) -> Bool[Tensor, "batch vocab"]:
    """True at each prompt's answer ids."""
    mask = t.zeros(n_batch, n_vocab, dtype=t.bool, device=device)
    if isinstance(answers, Tensor):
        index = answers.unsqueeze(-1) if answers.ndim == 1 else answers
        return mask.scatter_(1, index.to(device), True)
    for row, ids in zip(mask, answers, strict=True):
        row[ids.reshape(-1).to(device)] = True
    return mask
