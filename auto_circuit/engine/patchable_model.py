"""``PatchableModel``: a model whose every edge can be ablated by a mask."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.engine.patch_wrapper import PatchWrapperImpl
from auto_circuit.engine.reference import ReferenceEngine
from auto_circuit.families.block_forward import BlockForward
from auto_circuit.families.contract import FamilyGraph
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
        engine: ReferenceEngine,
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
        self._block_forward: BlockForward | None = graph.block_forward
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
        self.removed = False
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

    # ---- front doors: what other layers may ask of the engine and the family -------

    @property
    def is_patching(self) -> bool:
        """Whether patch mode is on (inside ``patch_mode``): forwards are patched."""
        return self.engine.state.patch_mode

    @cached_property
    def mask_sites(self) -> dict[str, MaskSite]:
        """Every destination mask, by module name (the keys of ``patch_masks``)."""
        return {
            name: MaskSite(
                module_name=name,
                in_srcs=site.in_srcs,
                n_heads=site.n_heads,
                shape=tuple(self.engine.mask_shape(site)),
                hook_modules=tuple(hook.hook_module for hook in site.hooks),
            )
            for name, site in self.engine.dest_sites.items()
        }

    def mask_site(self, module_name: str) -> MaskSite:
        """The destination mask of module ``module_name``; unknown names list close
        matches."""
        sites = self.mask_sites
        if module_name not in sites:
            raise CircuitError(
                f"No destination mask {module_name!r} in this graph."
                f"{did_you_mean(module_name, sites)}"
            )
        return sites[module_name]

    @cached_property
    def source_sites(self) -> list[SourceSite]:
        """Where the sources are read, ordered by source index."""
        return [
            SourceSite(site.module_name, site.hook_module, site.src_idxs)
            for site in sorted(self.engine.src_sites, key=lambda s: s.src_idxs.start)
        ]

    def srcs_into(self, module_name: str) -> list[SrcNode]:
        """The sources feeding the destinations of mask ``module_name``, in the order of
        the mask's last axis."""
        span = self.mask_site(module_name).in_srcs
        return self.sorted_srcs[span.start : span.stop]

    def feeds(self, src: SrcNode, dest: DestNode) -> bool:
        """Whether the graph has an edge ``src -> dest``."""
        return src.src_idx in self.mask_site(dest.module_name).in_srcs

    @property
    def family_name(self) -> str:
        """The name of the wrapped model's family (``auto_circuit.families.registry``)."""
        from auto_circuit.families.registry import family_for

        return family_for(self.wrapped_model).name

    @property
    def has_block_forward(self) -> bool:
        """Whether the model's family offers a ``BlockForward`` (running the model from
        a block's input residual; ``auto_circuit.families.block_forward``)."""
        return self._block_forward is not None

    def block_forward(self, need: str) -> BlockForward:
        """The family's ``BlockForward``, or a CircuitError saying that ``need`` (what
        the caller wants it for, e.g. "ACDC's block skipping") cannot be met."""
        if self._block_forward is None:
            raise CircuitError(
                f"{need} needs a block forward (running the model from a block's input "
                f"residual stream, auto_circuit.families.block_forward.BlockForward), but "
                f"the {self.family_name} family has no block forward. Use a model of a family "
                "that provides one (FamilyGraph.block_forward; transformer_lens does), or "
                "add one to this family."
            )
        return self._block_forward

    def embed(self, inputs: Tensor, need: str) -> tuple[Tensor, dict[str, Any]]:
        """The input residual stream for ``inputs`` and the keyword arguments with which
        ``model(resid, **kwargs)`` runs from it (with the prompt-prefix KV cache, as the
        forward would). ``need`` as for ``block_forward``."""
        return self.block_forward(need).embed(inputs, **self._with_kv_cache((inputs,), {}))

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
        if self.removed:
            raise CircuitError(
                "This PatchableModel was removed (remove() gave the model back); call the "
                "model itself, or wrap it again with patchable_model."
            )
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

    # ---- giving the model back -----------------------------------------------------

    def remove(self) -> t.nn.Module:
        """Take every hook and patched method off the wrapped model and return it, as it
        was before ``patchable_model`` (same outputs, bit for bit). This wrapper no
        longer runs afterwards; calling it twice is harmless."""
        if not self.removed:
            self.engine.remove()
            self.removed = True
        return self.wrapped_model

    def __enter__(self) -> PatchableModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True)
class MaskSite:
    """One destination mask: the module hosting its destinations, the sources feeding
    them (``in_srcs``, the mask's last axis), its heads (None: one destination), the
    mask's ``shape`` ``[(seq,) (head,) n_in]`` and the modules whose hooks patch it."""

    module_name: str
    in_srcs: range
    n_heads: int | None
    shape: tuple[int, ...]
    hook_modules: tuple[str, ...]


@dataclass(frozen=True)
class SourceSite:
    """A block of sources ``src_idxs`` (contiguous), named by ``module_name``, read from
    the output of ``hook_module``."""

    module_name: str
    hook_module: str
    src_idxs: range


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
