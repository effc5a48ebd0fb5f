"""Patch values for ablated edges: every source's output under an ablation.

``src_ablations`` returns ``[n_src, batch, seq, d_model]`` sorted by ``src_idx``, ready
for ``patch_mode``. Batch means are expanded views; dataset means have batch size 1,
which the engine broadcasts over any batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch as t
from torch import Tensor

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import module_by_name
from auto_circuit.vocabulary.types import AblationType, BatchKey


@contextmanager
def _recorded_src_outs(model: PatchableModel) -> Iterator[dict[int, Tensor]]:
    """Record every source site's output (as ``[n, batch, seq, d]``) during forwards."""
    recorded: dict[int, Tensor] = {}
    handles = []
    for site in model.engine.src_sites:
        module = module_by_name(model.wrapped_model, site.hook_module)

        def hook(mod, args, output, site=site) -> None:
            recorded[site.src_idxs.start] = site.read(output).detach()

        handles.append(module.register_forward_hook(hook))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def src_outs(model: PatchableModel, inputs: Tensor) -> Tensor:
    """Every source's output on ``inputs``: ``[n_src, batch, seq, d_model]``."""
    if model.engine.state.patch_mode:
        raise CircuitError("src_outs runs the unpatched model: call it outside patch_mode.")
    with t.no_grad(), _recorded_src_outs(model) as recorded:
        model(inputs)
    return t.cat([recorded[k] for k in sorted(recorded)])


def src_ablations(
    model: PatchableModel,
    sample: Tensor | t.utils.data.DataLoader,
    ablation_type: AblationType = AblationType.RESAMPLE,
) -> Tensor:
    """The values ablated edges carry: ``[n_src, batch, seq, d_model]``.

    Args:
        model: the patchable model.
        sample: a batch of inputs (for RESAMPLE, ZERO and the batch means), or a
            ``PromptDataLoader`` (for the TOKENWISE_MEAN_* dataset means).
        ablation_type: RESAMPLE (the sources' outputs on ``sample``), ZERO, a mean over
            the batch per position (BATCH_TOKENWISE_MEAN) or over batch and positions
            (BATCH_ALL_TOK_MEAN), or a mean per position over the dataloader's clean,
            corrupt or both prompts (TOKENWISE_MEAN_*, broadcast over the batch).
    """
    if ablation_type.needs_dataloader:
        if isinstance(sample, Tensor):
            raise CircuitError(
                f"{ablation_type} is a mean over a dataset: pass the dataloader, not a tensor."
            )
        return _dataset_mean(model, sample, ablation_type)
    if not isinstance(sample, Tensor):
        raise CircuitError(f"{ablation_type} needs one batch of inputs (a tensor), not a loader.")
    outs = src_outs(model, sample)
    if ablation_type == AblationType.RESAMPLE:
        return outs
    if ablation_type == AblationType.ZERO:
        return t.zeros_like(outs)
    if ablation_type == AblationType.BATCH_TOKENWISE_MEAN:
        return outs.mean(dim=1, keepdim=True).expand_as(outs)
    if ablation_type == AblationType.BATCH_ALL_TOK_MEAN:
        return outs.mean(dim=(1, 2), keepdim=True).expand_as(outs)
    raise CircuitError(f"Unknown ablation type {ablation_type!r}.")


def _dataset_mean(
    model: PatchableModel, loader: t.utils.data.DataLoader, ablation_type: AblationType
) -> Tensor:
    total, count = None, 0
    for batch in loader:
        inputs: list[Tensor] = []
        if ablation_type.clean_dataset:
            inputs.append(batch.clean)
        if ablation_type.corrupt_dataset:
            inputs.append(batch.corrupt)
        for x in inputs:
            outs = src_outs(model, x)
            summed = outs.sum(dim=1, keepdim=True)
            if total is not None and summed.shape != total.shape:
                raise CircuitError(
                    f"{ablation_type} needs prompts of equal length: got {outs.shape[2]} "
                    f"positions after {total.shape[2]}."
                )
            total = summed if total is None else total + summed
            count += outs.shape[1]
    if total is None:
        raise CircuitError("The dataloader is empty: no prompts to average over.")
    # Batch axis 1: the engine broadcasts it over any batch (also a smaller last one).
    return total / count


def batch_src_ablations(
    model: PatchableModel,
    dataloader: t.utils.data.DataLoader,
    ablation_type: AblationType = AblationType.RESAMPLE,
    clean_corrupt: Literal["clean", "corrupt"] | None = "corrupt",
) -> dict[BatchKey, Tensor]:
    """``src_ablations`` for every batch of ``dataloader``, keyed by batch key.

    ``clean_corrupt`` chooses which prompts of each batch the per-batch ablations are
    computed on. Dataset means are computed once and shared by every batch.
    """
    source = clean_corrupt if clean_corrupt is not None else "corrupt"
    return {
        batch.key: patch
        for batch, patch in iter_batch_ablations(model, dataloader, ablation_type, source)
    }


def iter_batch_ablations(
    model: PatchableModel,
    dataloader,
    ablation_type: AblationType = AblationType.RESAMPLE,
    clean_corrupt: Literal["clean", "corrupt"] = "corrupt",
) -> Iterator[tuple[Any, Tensor]]:
    """``(batch, patch values)`` for every batch, computed as they are needed (no copy
    of the whole dataset's activations): a dataset mean once for all batches, otherwise
    the ablation of each batch's ``clean_corrupt`` prompts."""
    if clean_corrupt not in ("clean", "corrupt"):
        raise CircuitError(f"clean_corrupt must be 'clean' or 'corrupt', got {clean_corrupt!r}.")
    shared = (
        src_ablations(model, dataloader, ablation_type) if ablation_type.needs_dataloader else None
    )
    for batch in dataloader:
        if shared is not None:
            yield batch, shared
        else:
            yield batch, src_ablations(model, getattr(batch, clean_corrupt), ablation_type)
