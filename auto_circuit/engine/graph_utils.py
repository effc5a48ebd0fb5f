"""Build a ``PatchableModel`` and change its patching state, only inside context managers.

Every context manager here restores the state it changed when it exits, also when the
body raises.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch as t
from torch import Tensor

from auto_circuit.engine.fast import FastEngine
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.engine.reference import ReferenceEngine
from auto_circuit.engine.settings import fast_paths_default
from auto_circuit.families.contract import in_edge
from auto_circuit.families.registry import family_for
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import flat_prune_scores
from auto_circuit.vocabulary.types import (
    DestNode,
    Edge,
    EdgeCounts,
    MaskFn,
    Node,
    PruneScores,
    SrcNode,
    TestEdges,
)


class GraphEdges(NamedTuple):
    """The graph of a model, in AutoCircuit's order (it unpacks as AutoCircuit's
    7-tuple): every node, the sources, the destinations, the edges by token position
    (key None when the graph has no positions), every edge, the sequence axis of the
    activations (1: ``[batch, seq, d_model]``) and the number of positions."""

    nodes: set[Node]
    srcs: set[SrcNode]
    dests: set[DestNode]
    edge_dict: dict[int | None, list[Edge]]
    edges: set[Edge]
    seq_dim: int
    seq_len: int | None


def graph_edges(
    model: t.nn.Module,
    factorized: bool,
    separate_qkv: bool | None = None,
    seq_len: int | None = None,
) -> GraphEdges:
    """The nodes and edges of ``model``'s graph, from its model family, without wrapping
    the model.

    Args:
        model: a supported model (``auto_circuit.families.registry``).
        factorized: every earlier source feeds every later destination (edge-level
            graph); False: each destination reads only the layer before it.
        separate_qkv: transformers only: separate Q, K, V destinations per head.
        seq_len: give each token position its own copy of every edge
            (``Edge.seq_idx`` = 0 .. seq_len - 1); None: one edge for all positions.

    Returns:
        ``GraphEdges(nodes, srcs, dests, edge_dict, edges, seq_dim, seq_len)``, as
        AutoCircuit returns them; the edges are those of ``patchable_model`` with the
        same arguments, ``edge_dict`` lists them by destination layer, then names.
    """
    if seq_len is not None and (isinstance(seq_len, bool) or seq_len < 1):
        raise CircuitError(
            f"seq_len must be a positive number of positions or None, got {seq_len}."
        )
    graph = family_for(model).build(model, factorized, separate_qkv)
    srcs, dests = set(graph.srcs), set(graph.dests)
    pairs = [
        (src, dest)
        for dest in sorted(dests, key=lambda d: (d.layer, d.name))
        for src in sorted(srcs, key=lambda s: s.src_idx)
        if in_edge(src, dest, factorized)
    ]
    positions: list[int | None] = list(range(seq_len)) if seq_len is not None else [None]
    edge_dict = {pos: [Edge(src, dest, pos) for src, dest in pairs] for pos in positions}
    edges = {edge for pos_edges in edge_dict.values() for edge in pos_edges}
    nodes: set[Node] = set()
    nodes.update(srcs, dests)
    return GraphEdges(nodes, srcs, dests, edge_dict, edges, 1, seq_len)


def patchable_model(
    model: t.nn.Module,
    factorized: bool,
    slice_output: Literal["last_seq", "not_first_seq"] | None = None,
    seq_len: int | None = None,
    separate_qkv: bool | None = None,
    kv_caches: tuple[Any, ...] = (None,),
    device: t.device | str | None = None,
    fast_paths: bool | None = None,
) -> PatchableModel:
    """Wrap ``model`` so that every edge of its computation graph can be patched.

    Args:
        model: a supported model (see ``auto_circuit.families.registry``). Hooks are
            added to it in place; its weights and outputs are unchanged, and
            ``PatchableModel.remove()`` takes them off. A model may be wrapped several
            times (each wrapper patches only inside its own contexts); a
            ``PatchableModel`` given here has its underlying model wrapped anew.
        factorized: True for the edge-level graph (every earlier source feeds every later
            destination); False for the node-level graph over residual checkpoints.
        slice_output: the part of the output a task looks at: ``"last_seq"`` (the last
            token), ``"not_first_seq"`` (all but the first), or None (everything).
        seq_len: give each token position its own edges (masks get a leading ``seq``
            axis); every input must then have exactly this many positions.
        separate_qkv: transformers only: separate Q, K, V destinations per head.
        kv_caches: frozen prompt-prefix key-value caches (one per batch size), as made by
            ``load_datasets_from_json(..., tail_divergence=True)``.
        device: where masks are created; default: the model's device.
        fast_paths: patch with the fast engine (True) or the reference engine (False);
            None: ``AUTO_CIRCUIT_FAST_PATHS`` in the environment, default on. Both give
            the same results (``auto_circuit.engine.settings``).
    """
    if isinstance(model, PatchableModel):  # wrap its model anew, with these settings
        model = model.wrapped_model
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len <= 0):
        raise CircuitError(f"seq_len must be a positive int or None, got {seq_len!r}.")
    out_slice: tuple[slice | int, ...]
    if slice_output is None:
        out_slice = (slice(None),)
    elif slice_output == "last_seq":
        out_slice = (slice(None), -1)
    elif slice_output == "not_first_seq":
        out_slice = (slice(None), slice(1, None))
    else:
        raise CircuitError(
            f"slice_output must be None, 'last_seq' or 'not_first_seq', got {slice_output!r}."
        )
    graph = family_for(model).build(model, factorized, separate_qkv)
    first_param = next(iter(model.parameters()), None)
    model_device = first_param.device if first_param is not None else t.device("cpu")
    dtype = first_param.dtype if first_param is not None else t.float32
    mask_device = t.device(device) if device is not None else model_device
    if fast_paths is None:
        fast_paths = fast_paths_default()
    engine_type = FastEngine if fast_paths else ReferenceEngine
    engine = engine_type(model, graph, seq_len, mask_device, dtype)
    return PatchableModel(model, graph, engine, factorized, seq_len, out_slice, kv_caches)


def _check_same_device(model: PatchableModel, tensor: Tensor, what: str) -> None:
    if tensor.device != model.device:
        raise CircuitError(
            f"{what} is on {tensor.device} but the masks are on {model.device}. Move it "
            f"with .to({str(model.device)!r}), or build the PatchableModel with "
            f"device={str(tensor.device)!r}."
        )


def set_all_masks(model: PatchableModel, val: float) -> None:
    """Set every mask element to ``val``."""
    with t.no_grad():
        for mask in model.patch_masks.values():
            mask.fill_(val)


def set_masks_from_prune_scores(model: PatchableModel, prune_scores: PruneScores) -> None:
    """Copy ``prune_scores`` into the masks (same keys and shapes)."""
    with t.no_grad():
        for name, mask in model.patch_masks.items():
            if name not in prune_scores:
                raise CircuitError(f"prune_scores has no entry for mask {name!r}.")
            score = prune_scores[name]
            if score.shape != mask.shape[-score.ndim :]:
                raise CircuitError(
                    f"prune_scores[{name!r}] has shape {list(score.shape)}, the mask "
                    f"{list(mask.shape)}."
                )
            mask.copy_(score.to(mask.device, mask.dtype).expand_as(mask))


@contextmanager
def masks_saved(model: PatchableModel) -> Iterator[None]:
    """Restore every mask's values (and the mask tensors themselves) on exit."""
    saved = {name: (mask, mask.detach().clone()) for name, mask in model.patch_masks.items()}
    try:
        yield
    finally:
        with t.no_grad():
            for name, (mask, values) in saved.items():
                model.patch_masks[name] = mask
                mask.copy_(values)


@contextmanager
def patch_mode(
    model: PatchableModel,
    patch_src_outs: Tensor,
    edges: Collection[str | Edge] | None = None,
    curr_src_outs: Tensor | None = None,
) -> Iterator[None]:
    """Patch the model: each masked edge carries ``patch_src_outs`` of its source.

    ``patch_src_outs`` is ``[n_src, batch, seq, d_model]`` (batch and seq may be 1 to
    broadcast), as made by ``src_ablations``. With ``edges``, exactly those edges are
    patched (mask 1, all others 0) inside the context; masks are restored on exit.
    ``curr_src_outs`` gives the outputs of sources that do not run in a forward pass
    (when it starts at a later layer).
    """
    n_src = len(model.srcs)
    if patch_src_outs.ndim != 4 or patch_src_outs.shape[0] != n_src:
        raise CircuitError(
            f"patch_src_outs must be [n_src={n_src}, batch, seq, d_model], got "
            f"{list(patch_src_outs.shape)}. Make it with src_ablations(model, ...)."
        )
    _check_same_device(model, patch_src_outs, "patch_src_outs")
    if curr_src_outs is not None:
        _check_same_device(model, curr_src_outs, "curr_src_outs")
    state = model.engine.state
    previous = (state.patch_mode, state.patch_src_outs, state.curr_src_outs)
    with masks_saved(model):
        if edges is not None:
            set_all_masks(model, 0.0)
            set_masks_from_prune_scores(model, model.circuit_prune_scores(edges=edges))
        state.patch_mode, state.patch_src_outs = True, patch_src_outs
        state.curr_src_outs = curr_src_outs
        try:
            yield
        finally:
            state.patch_mode, state.patch_src_outs, state.curr_src_outs = previous
            model.engine.release()


@contextmanager
def delta_patch_mode(model: PatchableModel, src_deltas: Tensor) -> Iterator[None]:
    """Patch mode where a masked edge adds a fixed difference ``src_deltas[src]``
    (``[n_src, batch, seq, d_model]``) to its destination, whatever the source outputs in
    this forward. Mask gradients then read ``grad_dest . src_deltas[src]`` at any input,
    as integrated-gradient attributions over interpolated inputs need."""
    state = model.engine.state
    with patch_mode(model, src_deltas):
        state.patch_is_delta = True
        try:
            yield
        finally:
            state.patch_is_delta = False


@contextmanager
def train_mask_mode(
    model: PatchableModel, requires_grad: bool = True
) -> Iterator[dict[str, t.nn.Parameter]]:
    """Make the masks trainable leaves (gradients cleared); yields them by module name."""
    state = model.engine.state
    masks = model.patch_masks
    previous = ({n: m.requires_grad for n, m in masks.items()}, state.training)
    try:
        for mask in masks.values():
            mask.requires_grad_(requires_grad)
            mask.grad = None
        state.training = True
        yield masks
    finally:
        for name, mask in masks.items():
            mask.requires_grad_(previous[0].get(name, False))
        state.training = previous[1]


@contextmanager
def mask_fn_mode(model: PatchableModel, mask_fn: MaskFn, dropout_p: float = 0.0) -> Iterator[None]:
    """Interpret masks through ``mask_fn`` (``"hard_concrete"`` or ``"sigmoid"`` of the
    mask logits), with optional dropout on the mask in training mode."""
    if mask_fn not in (None, "hard_concrete", "sigmoid"):
        raise CircuitError(f"mask_fn must be None, 'hard_concrete' or 'sigmoid', got {mask_fn!r}.")
    if not 0.0 <= dropout_p < 1.0:
        raise CircuitError(f"dropout_p must be in [0, 1), got {dropout_p}.")
    state = model.engine.state
    previous = (state.mask_fn, state.dropout_p)
    state.mask_fn, state.dropout_p = mask_fn, dropout_p
    try:
        yield
    finally:
        state.mask_fn, state.dropout_p = previous


@contextmanager
def set_mask_batch_size(model: PatchableModel, batch_size: int | None) -> Iterator[None]:
    """Give every mask a leading batch axis, so each example has its own masks (and its
    own mask gradients). The original masks are back on exit."""
    if batch_size is None:
        yield
        return
    if batch_size <= 0:
        raise CircuitError(f"batch_size must be positive, got {batch_size}.")
    originals = dict(model.patch_masks)
    try:
        for name, mask in originals.items():
            batched = mask.detach().unsqueeze(0).repeat(batch_size, *([1] * mask.ndim))
            model.patch_masks[name] = t.nn.Parameter(batched, requires_grad=mask.requires_grad)
        yield
    finally:
        model.patch_masks.update(originals)


def edge_counts_util(
    edges: int | Collection[Edge],
    test_counts: TestEdges | None = None,
    prune_scores: PruneScores | None = None,
    zero_edges: bool | None = None,
    all_edges: bool | None = None,
    true_edge_count: int | None = None,
) -> list[int]:
    """The circuit sizes to evaluate, ascending.

    Args:
        edges: the edges of the graph (or their number).
        test_counts: ``EdgeCounts.ALL`` (every size), ``LOGARITHMIC`` (1-9, 10-90,
            100-900, ...), ``GROUPS`` (cumulative sizes of groups of tied scores, needs
            ``prune_scores``), or explicit counts (ints) or fractions of all edges
            (floats in [0, 1]). Default: GROUPS when the scores take fewer than
            min(n/2, 100) distinct values, else LOGARITHMIC above 200 edges, else ALL.
        zero_edges, all_edges: include 0 and all edges (default: yes, except for
            explicit counts); ``true_edge_count``: also include this size.
    """
    n = edges if isinstance(edges, int) else len(edges)
    explicit = isinstance(test_counts, list)
    if test_counts is None:
        distinct = None if prune_scores is None else flat_prune_scores(prune_scores).abs().unique()
        if distinct is not None and len(distinct) < min(n / 2, 100):
            test_counts = EdgeCounts.GROUPS
        else:
            test_counts = EdgeCounts.LOGARITHMIC if n > 200 else EdgeCounts.ALL
    counts: set[int]
    if test_counts == EdgeCounts.ALL:
        counts = set(range(n + 1))
    elif test_counts == EdgeCounts.LOGARITHMIC:
        counts = {m * 10**e for e in range(len(str(n))) for m in range(1, 10) if m * 10**e < n}
    elif test_counts == EdgeCounts.GROUPS:
        if prune_scores is None:
            raise CircuitError("EdgeCounts.GROUPS needs prune_scores.")
        _, group_sizes = flat_prune_scores(prune_scores).abs().unique(return_counts=True)
        counts = {int(c) for c in group_sizes.flip(0).cumsum(0)}
    elif isinstance(test_counts, list):
        counts = set()
        for count in test_counts:
            if isinstance(count, float) and 0.0 <= count <= 1.0:
                counts.add(int(n * count))
            elif isinstance(count, int) and 0 <= count <= n:
                counts.add(count)
            else:
                raise CircuitError(
                    f"Edge count {count!r} is neither an int in [0, {n}] nor a fraction in [0, 1]."
                )
    else:
        raise CircuitError(f"test_counts must be an EdgeCounts or a list, got {test_counts!r}.")
    if zero_edges if zero_edges is not None else not explicit:
        counts.add(0)
    if all_edges if all_edges is not None else not explicit:
        counts.add(n)
    if true_edge_count is not None:
        counts.add(true_edge_count)
    return sorted(counts)
