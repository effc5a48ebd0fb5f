"""Shared machinery of the official circuits: model checks and name-to-edge resolution.

An official circuit is written as *edge names* (``"A0.5->A1.4.V"``), each with the token
positions where it belongs. A position is a key of ``word_idxs`` (``"S2"``), an absolute
prompt index (an int, BOS included) or ``None`` for "every position". Edges are found
through the graph's node tables (``PatchableModel.edge``), never by scanning its edges.

Token positions (``token_positions=True``): ``word_idxs`` index the full tokenised prompt
(BOS included, as :func:`auto_circuit.data.load_datasets_from_json` returns them), and
``seq_start_idx`` is the number of leading tokens removed from the prompts (the loader's
``diverge_idx``), so a word at prompt index ``i`` is graph position ``i - seq_start_idx``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge

Position = str | int
"""A token position: a ``word_idxs`` key or an absolute prompt index (BOS included)."""

EdgePositions = Mapping[str, Collection[Position] | None]
"""Edge name -> the positions where the edge belongs (``None``: every position)."""


@dataclass(frozen=True)
class ModelShape:
    """The graph shape an official circuit is defined on (names are checked, not models)."""

    description: str
    n_layers: int
    n_heads: int
    attn_only: bool
    parallel_attn_mlp: bool

    def __str__(self) -> str:
        return f"{self.description}: {_shape_text(*self._key())}"

    def _key(self) -> tuple[int, int, bool, bool]:
        return (self.n_layers, self.n_heads, self.attn_only, self.parallel_attn_mlp)


def _shape_text(n_layers: int, n_heads: int, attn_only: bool, parallel: bool) -> str:
    kind = "attention-only" if attn_only else "attention + MLP"
    if parallel:
        kind += ", parallel attention/MLP"
    return f"{n_layers} layers x {n_heads} heads, {kind}"


GPT2_SMALL = ModelShape("GPT-2 small", 12, 12, attn_only=False, parallel_attn_mlp=False)
ATTN_ONLY_4L = ModelShape(
    "attn-only-4l (Attn_Only_4L512W_C4_Code)", 4, 8, attn_only=True, parallel_attn_mlp=False
)
PYTHIA_2_8B = ModelShape("pythia-2.8b-deduped", 32, 32, attn_only=False, parallel_attn_mlp=True)
TRACR_REVERSE = ModelShape("tracr reverse", 4, 1, attn_only=False, parallel_attn_mlp=False)
TRACR_XPROPORTION = ModelShape("tracr xproportion", 2, 1, attn_only=False, parallel_attn_mlp=False)


def check_model(
    model: PatchableModel,
    circuit: str,
    shape: ModelShape,
    *,
    separate_qkv: bool | None,
    factorized: bool = True,
) -> None:
    """Raise a ``CircuitError`` unless ``model``'s graph is the one ``circuit`` is written for.

    Args:
        model: The patchable model.
        circuit: The circuit function's name, for messages.
        shape: The expected layers, heads and block kind.
        separate_qkv: The required ``separate_qkv`` (None: either).
        factorized: Whether the edge-level (factorized) graph is required.
    """
    cfg = _tl_cfg(model, circuit, shape)
    actual = (
        int(cfg.n_layers),
        int(cfg.n_heads),
        bool(cfg.attn_only),
        bool(cfg.parallel_attn_mlp),
    )
    if actual != shape._key():
        raise CircuitError(
            f"{circuit} is defined on the graph of {shape}, but this model has "
            f"{_shape_text(*actual)}. Build the PatchableModel from a model of that shape "
            "(circuits are checked by shape, not by model name)."
        )
    if factorized and not model.is_factorized:
        raise CircuitError(
            f"{circuit} is an edge-level circuit; build the model with "
            "patchable_model(model, factorized=True, ...)."
        )
    if separate_qkv is not None and bool(model.separate_qkv) != separate_qkv:
        raise CircuitError(
            f"{circuit} needs patchable_model(..., separate_qkv={separate_qkv}) "
            f"({'one Q, K and V input per head' if separate_qkv else 'one input per head'}), "
            f"but this model was built with separate_qkv={model.separate_qkv}."
        )


def _tl_cfg(model: PatchableModel, circuit: str, shape: ModelShape) -> Any:
    cfg = getattr(model, "cfg", None)  # the TransformerLens config, passed through
    if cfg is None:
        raise CircuitError(
            f"{circuit} is defined on a TransformerLens HookedTransformer shaped like "
            f"{shape}; got a model of the {model.family_name} family."
        )
    return cfg


def require_words(
    circuit: str, word_idxs: Mapping[str, int], names: Iterable[str]
) -> dict[str, int]:
    """The indices of ``names`` in ``word_idxs``; a ``CircuitError`` lists missing ones."""
    names = list(names)
    missing = [name for name in names if name not in word_idxs]
    if missing:
        raise CircuitError(
            f"{circuit} with token_positions=True needs word_idxs for {names}; missing "
            f"{missing} (got keys {sorted(word_idxs)}). Pass the loader's word_idxs "
            "(from load_datasets_from_json with the task's dataset)."
        )
    bad = {name: word_idxs[name] for name in names if not isinstance(word_idxs[name], int)}
    if bad:
        raise CircuitError(f"{circuit}: word_idxs must be ints, got {bad}.")
    return {name: word_idxs[name] for name in names}


def require_token_graph(model: PatchableModel, circuit: str) -> int:
    """``model.seq_len``, or a ``CircuitError`` when the graph has no token positions."""
    if model.seq_len is None:
        raise CircuitError(
            f"{circuit} with token_positions=True needs a graph with one edge per token "
            "position: build it with patchable_model(..., seq_len=<prompt length>). Or pass "
            "token_positions=False."
        )
    return model.seq_len


def graph_positions(model: PatchableModel) -> list[int | None]:
    """Every position of the graph: ``[None]`` without token positions, else ``0..seq-1``."""
    return [None] if model.seq_len is None else list(range(model.seq_len))


def to_graph_position(
    model: PatchableModel,
    circuit: str,
    position: Position,
    word_idxs: Mapping[str, int],
    seq_start_idx: int,
) -> int:
    """Graph position of a word or prompt index: ``index - seq_start_idx``, range-checked."""
    seq_len = require_token_graph(model, circuit)
    if isinstance(position, str):
        index = require_words(circuit, word_idxs, [position])[position]
        what = f"word_idxs[{position!r}]={index}"
    else:
        index, what = position, f"prompt index {position}"
    graph_pos = index - seq_start_idx
    if not 0 <= graph_pos < seq_len:
        raise CircuitError(
            f"{circuit}: {what} minus seq_start_idx={seq_start_idx} is position {graph_pos}, "
            f"outside the model's {seq_len} token positions. word_idxs index the whole "
            "prompt (BOS included) and seq_start_idx is the number of prefix tokens "
            "removed (the loader's diverge_idx)."
        )
    return graph_pos


def feeds(model: PatchableModel, src_name: str, dest_name: str) -> bool:
    """Whether the graph has an edge ``src_name -> dest_name`` (both names must exist)."""
    src, dest = model.src_node(src_name), model.dest_node(dest_name)
    return model.feeds(src, dest)


def circuit_edges(
    model: PatchableModel,
    circuit: str,
    edge_positions: EdgePositions,
    token_positions: bool,
    word_idxs: Mapping[str, int],
    seq_start_idx: int,
) -> set[Edge]:
    """The ``Edge``s of a circuit given as edge names with their positions.

    With ``token_positions=False`` each name gives one edge (``seq_idx=None``), or one per
    position when the graph has token positions. With ``token_positions=True`` each name
    gives an edge at each of its positions (every position for ``None``).
    """
    edges: set[Edge] = set()
    if not token_positions:
        for name in edge_positions:
            edges.update(model.edge(name, pos) for pos in graph_positions(model))
        return edges
    seq_len = require_token_graph(model, circuit)
    words = {p for ps in edge_positions.values() if ps is not None for p in ps}
    require_words(circuit, word_idxs, sorted(w for w in words if isinstance(w, str)))
    for name, positions in edge_positions.items():
        if positions is None:
            graph_pos: Iterable[int] = range(seq_len)
        else:
            graph_pos = {
                to_graph_position(model, circuit, p, word_idxs, seq_start_idx) for p in positions
            }
        edges.update(model.edge(name, pos) for pos in graph_pos)
    return edges


def node_circuit_edges(
    model: PatchableModel,
    circuit: str,
    head_positions: Mapping[str, Collection[Position]],
    token_positions: bool,
    word_idxs: Mapping[str, int],
    seq_start_idx: int,
) -> set[Edge]:
    """A node-based circuit: every edge out of a non-head source (the embedding, MLPs,
    residual checkpoints) at every position, plus every edge out of the listed heads (at
    their positions when ``token_positions``). Ablating the rest ablates exactly the heads
    that are not in the circuit, as the node-patching experiments of the papers do.
    """
    for head in head_positions:
        model.src_node(head)  # unknown names raise, listing close matches
    if token_positions:
        require_token_graph(model, circuit)
        words = sorted({p for ps in head_positions.values() for p in ps if isinstance(p, str)})
        require_words(circuit, word_idxs, words)
        kept: dict[str, list[int | None]] = {}
        for head, ps in head_positions.items():
            kept[head] = [
                to_graph_position(model, circuit, p, word_idxs, seq_start_idx) for p in ps
            ]
    else:
        kept = {head: graph_positions(model) for head in head_positions}
    every = graph_positions(model)
    edges: set[Edge] = set()
    for dest in model.dests:
        for src in model.srcs_into(dest.module_name):
            positions = every if src.head_idx is None else kept.get(src.name, [])
            edges.update(Edge(src, dest, pos) for pos in positions)
    return edges
