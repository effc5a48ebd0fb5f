"""``PatchableModel``: a model whose every edge can be ablated by a mask."""

from __future__ import annotations

from collections.abc import Collection
from functools import cached_property
from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.engine.patch_wrapper import PatchEngine, PatchWrapperImpl
from auto_circuit.families.registry import FamilyGraph
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean
from auto_circuit.vocabulary.types import DestNode, Edge, Node, PruneScores, SrcNode


class PatchableModel(t.nn.Module):
    """A model that can be ablated along individual edges in its computation graph.

    Build it with ``auto_circuit.engine.graph_utils.patchable_model``. It passes
    ``forward``, ``run_with_cache``, ``add_hook``, ``reset_hooks``, ``cfg``,
    ``tokenizer``, ``input_to_embed``, ``blocks``, ``to_tokens``, ``to_str_tokens`` and
    ``to_string`` through to the wrapped model (TransformerLens API), adding the
    prompt-prefix KV cache matching the batch size where one was given.

    Edges are not stored as Python objects until asked for (``edges``, ``edge_dict``):
    the graph is defined by the masks, one element per edge, and the node tables.
    """

    def __init__(
        self,
        wrapped_model: t.nn.Module,
        graph: FamilyGraph,
        engine: PatchEngine,
        factorized: bool,
        seq_len: int | None,
        out_slice: tuple[slice | int, ...],
        kv_caches: tuple[Any, ...],
    ):
        super().__init__()
        self.wrapped_model = wrapped_model
        self.engine = engine
        self.srcs: set[SrcNode] = set(graph.srcs)
        self.dests: set[DestNode] = set(graph.dests)
        self.nodes: set[Node] = set()
        self.nodes.update(graph.srcs, graph.dests)
        self.seq_dim = 1
        self.seq_len = seq_len
        self.out_slice = out_slice
        self.is_factorized = factorized
        self.is_transformer = graph.is_transformer
        self.separate_qkv = graph.separate_qkv
        self.kv_caches: dict[int, Any] = {
            _kv_cache_batch_size(c): c for c in kv_caches if c is not None
        }
        self.src_wrappers: set[PatchWrapperImpl] = set(engine.src_wrappers)
        self.dest_wrappers: set[PatchWrapperImpl] = set(engine.dest_wrappers)
        self.wrappers: set[PatchWrapperImpl] = self.src_wrappers | self.dest_wrappers
        self.patch_masks: dict[str, t.nn.Parameter] = engine.masks
        self.sorted_srcs: list[SrcNode] = sorted(self.srcs, key=lambda s: s.src_idx)
        self._src_by_name = {s.name: s for s in self.srcs}
        self._dest_by_name = {d.name: d for d in self.dests}
        self.n_edges = sum(engine.masks[d.module_name].numel() for d in graph.dest_sites)

    def __deepcopy__(self, memo: dict) -> PatchableModel:
        raise CircuitError(
            "A PatchableModel cannot be deep-copied: its hooks belong to its own patching "
            "engine, so a copy would not patch. Copy the model before wrapping it, "
            "patchable_model(copy.deepcopy(model), ...), and copy masks with "
            "set_all_masks / set_masks_from_prune_scores if needed."
        )

    # ---- graph -------------------------------------------------------------------

    @cached_property
    def edge_dict(self) -> dict[int | None, list[Edge]]:
        """Edges by token position (key None when the graph has no positions)."""
        positions: list[int | None] = (
            list(range(self.seq_len)) if self.seq_len is not None else [None]
        )
        by_dest = [
            (dest, self.sorted_srcs[site.in_srcs.start : site.in_srcs.stop])
            for dest in sorted(self.dests, key=lambda d: (d.layer, d.name))
            for site in [self.engine.dest_sites[dest.module_name]]
        ]
        return {
            pos: [Edge(src, dest, pos) for dest, srcs in by_dest for src in srcs]
            for pos in positions
        }

    @cached_property
    def edges(self) -> set[Edge]:
        """Every edge of the graph (one per token position in per-position graphs)."""
        return {edge for edges in self.edge_dict.values() for edge in edges}

    @cached_property
    def edge_name_dict(self) -> dict[int | None, dict[str, Edge]]:
        return {pos: {e.name: e for e in edges} for pos, edges in self.edge_dict.items()}

    def src_node(self, name: str) -> SrcNode:
        """The source node called ``name``; unknown names list close matches."""
        if name not in self._src_by_name:
            raise CircuitError(
                f"No source node {name!r} in this graph.{did_you_mean(name, self._src_by_name)}"
            )
        return self._src_by_name[name]

    def dest_node(self, name: str) -> DestNode:
        """The destination node called ``name``; unknown names list close matches."""
        if name not in self._dest_by_name:
            raise CircuitError(
                f"No destination node {name!r} in this graph."
                f"{did_you_mean(name, self._dest_by_name)}"
            )
        return self._dest_by_name[name]

    def edge(self, name: str, seq_idx: int | None = None) -> Edge:
        """The edge ``"{src}->{dest}"`` (at ``seq_idx`` in per-position graphs).

        Looked up through the node tables, never by scanning all edges.
        """
        if name.count("->") != 1:
            raise CircuitError(
                f"Edge name {name!r} is not of the form 'SRC->DEST' (e.g. 'A0.1->MLP 2')."
            )
        src_name, dest_name = name.split("->")
        src, dest = self.src_node(src_name), self.dest_node(dest_name)
        site = self.engine.dest_sites[dest.module_name]
        if src.src_idx not in site.in_srcs:
            raise CircuitError(
                f"{src.name} (layer {src.layer}) does not feed {dest.name} (layer "
                f"{dest.layer}) in this graph, so there is no edge {name!r}."
            )
        if (seq_idx is None) != (self.seq_len is None):
            raise CircuitError(
                f"Edge {name!r}: give seq_idx exactly when the graph has token positions "
                f"(seq_len={self.seq_len})."
            )
        if seq_idx is not None and not 0 <= seq_idx < (self.seq_len or 0):
            raise CircuitError(f"seq_idx {seq_idx} is outside [0, {self.seq_len}).")
        return Edge(src, dest, seq_idx)

    # ---- prune scores --------------------------------------------------------------

    def new_prune_scores(self, init_val: float = 0.0) -> PruneScores:
        """Scores with the keys and shapes of the masks, all ``init_val``."""
        return {
            name: t.full(self.engine.mask_shape(site), init_val, device=mask.device)
            for name, site in self.engine.dest_sites.items()
            for mask in [self.patch_masks[name]]
        }

    def circuit_prune_scores(
        self,
        edges: Collection[Edge | str] | None = None,
        edge_dict: dict[Edge, float] | dict[str, float] | None = None,
        bool: bool = False,
    ) -> PruneScores:
        """Prune scores that are 1 (or the given value) on ``edges`` and 0 elsewhere.

        An edge *name* covers every token position; an ``Edge`` only its own.
        With ``bool=True`` the tensors are boolean.
        """
        if (edges is None) == (edge_dict is None):
            raise CircuitError("Pass exactly one of edges and edge_dict.")
        items = [(e, 1.0) for e in edges] if edges is not None else list(edge_dict.items())  # type: ignore[union-attr]
        scores = self.new_prune_scores()
        for edge, value in items:
            if isinstance(edge, str):
                resolved = self.edge(edge, 0 if self.seq_len is not None else None)
                idx: tuple[Any, ...] = resolved.patch_idx
                if self.seq_len is not None:
                    idx = (slice(None),) + idx[1:]
                scores[resolved.dest.module_name][idx] = value
            else:
                scores[edge.dest.module_name][edge.patch_idx] = value
        if bool:
            return {k: v.bool() for k, v in scores.items()}
        return scores

    def current_patch_masks_as_prune_scores(self) -> PruneScores:
        """The current mask values as prune scores."""
        return {name: mask.detach().clone() for name, mask in self.patch_masks.items()}

    # ---- pass-throughs -------------------------------------------------------------

    def _with_kv_cache(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not self.kv_caches or "past_kv_cache" in kwargs:
            return kwargs
        batch_size = _batch_size(args, kwargs)
        if batch_size not in self.kv_caches:
            raise CircuitError(
                f"No KV cache for batch size {batch_size} (caches exist for "
                f"{sorted(self.kv_caches)}). Use the dataloader's batch size."
            )
        return {**kwargs, "past_kv_cache": self.kv_caches[batch_size]}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model(*args, **self._with_kv_cache(args, kwargs))

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model.run_with_cache(*args, **self._with_kv_cache(args, kwargs))  # type: ignore[operator]

    def input_to_embed(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model.input_to_embed(*args, **self._with_kv_cache(args, kwargs))  # type: ignore[operator]

    def add_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model.add_hook(*args, **kwargs)  # type: ignore[operator]

    def reset_hooks(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model.reset_hooks(*args, **kwargs)  # type: ignore[operator]

    def to_tokens(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.wrapped_model.to_tokens(*args, **kwargs)  # type: ignore[operator]

    def to_str_tokens(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model.to_str_tokens(*args, **kwargs)  # type: ignore[operator]

    def to_string(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model.to_string(*args, **kwargs)  # type: ignore[operator]

    @property
    def cfg(self) -> Any:
        return self.wrapped_model.cfg

    @property
    def tokenizer(self) -> Any:
        return getattr(self.wrapped_model, "tokenizer", None)

    @property
    def blocks(self) -> Any:
        return self.wrapped_model.blocks

    @property
    def device(self) -> t.device:
        return next(iter(self.patch_masks.values())).device


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    first = args[0] if args else kwargs.get("input", kwargs.get("tokens"))
    if isinstance(first, Tensor):
        return first.shape[0]
    if isinstance(first, (list, tuple)):
        return len(first)
    return 1


def _kv_cache_batch_size(cache: Any) -> int:
    entries = getattr(cache, "entries", None)
    if not entries:
        raise CircuitError("kv_caches must be TransformerLens key-value caches with entries.")
    return int(entries[0].past_keys.shape[0])
