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
from auto_circuit.vocabulary.types import AblationType, BatchKey, SrcNode


def _per_src(out: Tensor, src_nodes: list[SrcNode]) -> dict[SrcNode, Tensor]:
    """Each source's share of a module output: the whole output, or its head's slice
    along ``head_dim`` (the head axis removed)."""
    if not src_nodes:
        raise CircuitError("The hook was given no source nodes of its module.")
    return {
        s: out if s.head_dim is None else out.select(s.head_dim, s.head_idx)  # type: ignore[arg-type]
        for s in src_nodes
    }


def src_out_hook(
    module: t.nn.Module,
    input: tuple[Tensor, ...],
    out: Tensor,
    src_nodes: list[SrcNode],
    src_outs: dict[SrcNode, Tensor],
    ablation_type: AblationType,
) -> None:
    """A forward hook (bind the last three arguments with ``functools.partial``) that
    writes into ``src_outs`` the ablation value of each of ``src_nodes``, the sources
    hosted by ``module``, for the batch being run.

    RESAMPLE: the output itself; ZERO: zeros; BATCH_TOKENWISE_MEAN: the mean over the
    batch (axis 0) at each position; BATCH_ALL_TOK_MEAN: the mean over batch and
    positions (axes 0 and 1); each repeated to the output's shape. Dataset means need
    ``mean_src_out_hook``. Values are detached, so recording under autograd keeps no
    graph. ``src_ablations`` gives the same values stacked in ``src_idx`` order.

    Register it on ``src.module(model)``. For TransformerLens heads that module is
    ``attn.hook_result``, which runs only with ``model.cfg.use_attn_result = True`` (as
    AutoCircuit's ``load_tl_model`` set); ``src_ablations`` needs no such flag.
    """
    if ablation_type.needs_dataloader:
        raise CircuitError(f"{ablation_type} is a dataset mean: record it with mean_src_out_hook.")
    out = out.detach()
    if ablation_type == AblationType.RESAMPLE:
        value = out
    elif ablation_type == AblationType.ZERO:
        value = t.zeros_like(out)
    elif ablation_type == AblationType.BATCH_TOKENWISE_MEAN:
        value = out.mean(dim=0, keepdim=True).expand_as(out).clone()
    elif ablation_type == AblationType.BATCH_ALL_TOK_MEAN:
        value = out.mean(dim=(0, 1), keepdim=True).expand_as(out).clone()
    else:
        raise CircuitError(f"Unknown ablation type {ablation_type!r}.")
    src_outs.update(_per_src(value, src_nodes))


def mean_src_out_hook(
    module: t.nn.Module,
    input: tuple[Tensor, ...],
    out: Tensor,
    src_nodes: list[SrcNode],
    src_outs: dict[SrcNode, Tensor],
    ablation_type: AblationType,
) -> None:
    """A forward hook for the TOKENWISE_MEAN_* ablations: adds to ``src_outs[src]`` the
    mean over the batch at each position of each source's output, repeated to the batch
    size. After ``n`` forwards (clean and/or corrupt batches, as ``ablation_type``
    says), ``src_outs[src] / n`` is the dataset mean, exactly as in AutoCircuit when
    every batch has the same size (a mean of batch means; ``src_ablations`` weights
    prompts exactly for any batch sizes). A batch of another size is an error rather
    than AutoCircuit's shape crash.
    """
    if not ablation_type.needs_dataloader:
        raise CircuitError(f"{ablation_type} is not a dataset mean: record it with src_out_hook.")
    mean = out.detach().mean(dim=0, keepdim=True).expand_as(out)
    for s, value in _per_src(mean, src_nodes).items():
        if s not in src_outs:
            src_outs[s] = value.clone()
        elif src_outs[s].shape != value.shape:
            raise CircuitError(
                f"mean_src_out_hook: {s} got outputs shaped {list(value.shape)} after "
                f"{list(src_outs[s].shape)}; batches must have equal size and length "
                "(or use src_ablations with the dataloader)."
            )
        else:
            src_outs[s] += value


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
