"""Export circuits in the MIB / EAP-IG circuit JSON format.

Nodes are named ``input``, ``a{layer}.h{head}``, ``m{layer}`` and ``logits``; an edge into
an attention head's query, key or value input ends in ``<q>``, ``<k>`` or ``<v>`` (e.g.
``a0.h1->a2.h3<k>``). Every edge carries ``{"score": float, "in_graph": bool}``; nodes
carry ``{"in_graph": bool}``. Per-position graphs have no place in the format: an edge's
score is summed over positions, and it is in the graph if it is at any position.
"""

from __future__ import annotations

import re
from typing import Any

import torch as t

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import desc_prune_scores
from auto_circuit.vocabulary.types import PruneScores

_HEAD = re.compile(r"^A(\d+)\.(\d+)(?:\.([QKV]))?$")
_MLP = re.compile(r"^MLP (\d+)$")


def mib_node_name(name: str) -> str:
    """Our node name -> the MIB node name (with ``<q|k|v>`` for Q/K/V destinations)."""
    if name == "Resid Start":
        return "input"
    if name == "Resid End":
        return "logits"
    if match := _HEAD.match(name):
        layer, head, letter = match.groups()
        return f"a{layer}.h{head}" + (f"<{letter.lower()}>" if letter else "")
    if match := _MLP.match(name):
        return f"m{match.group(1)}"
    raise CircuitError(
        f"Node {name!r} has no MIB name: the MIB format covers the factorized graph of a "
        "transformer (Resid Start, A{l}.{h}, MLP {l}, Resid End)."
    )


def mib_circuit(
    model: PatchableModel, prune_scores: PruneScores, n_edges: int | None = None
) -> dict[str, Any]:
    """The circuit of the ``n_edges`` highest-|score| edges (all scored edges if None)
    as a MIB circuit dictionary (``json.dump`` it)."""
    if not model.is_factorized:
        raise CircuitError("MIB circuits are edge-level: build the model with factorized=True.")
    threshold = None
    if n_edges is not None:
        if not 0 <= n_edges <= model.n_edges:
            raise CircuitError(f"n_edges must be in [0, {model.n_edges}], got {n_edges}.")
        threshold = desc_prune_scores(prune_scores)[n_edges - 1] if n_edges else None
    edges: dict[str, dict[str, Any]] = {}
    nodes: dict[str, dict[str, bool]] = {}
    for name in model.mask_sites:
        scores = prune_scores[name].detach().float().cpu()
        in_graph = (
            scores.abs() >= threshold
            if threshold is not None
            else t.full_like(scores, n_edges is None, dtype=t.bool)
        )
        if model.seq_len is not None:  # positions are not part of the format
            scores, in_graph = scores.sum(0), in_graph.any(0)
        dests = sorted((d for d in model.dests if d.module_name == name), key=_head_of)
        srcs = model.srcs_into(name)
        for dest in dests:
            row = dest.head_idx if dest.head_idx is not None else None
            dest_scores = scores[row] if row is not None else scores
            dest_in = in_graph[row] if row is not None else in_graph
            dest_name = mib_node_name(dest.name)
            for j, src in enumerate(srcs):
                src_name = mib_node_name(src.name)
                kept = bool(dest_in[j])
                edges[f"{src_name}->{dest_name}"] = {
                    "score": float(dest_scores[j]),
                    "in_graph": kept,
                }
                for node in (src_name, dest_name.split("<")[0]):
                    nodes[node] = {"in_graph": nodes.get(node, {}).get("in_graph", False) or kept}
    cfg = getattr(model, "cfg", None)
    return {
        "cfg": {
            "n_layers": getattr(cfg, "n_layers", None),
            "n_heads": getattr(cfg, "n_heads", None),
            "parallel_attn_mlp": bool(getattr(cfg, "parallel_attn_mlp", False)),
            "d_model": getattr(cfg, "d_model", None),
        },
        "nodes": nodes,
        "edges": edges,
    }


def _head_of(dest) -> int:
    return dest.head_idx if dest.head_idx is not None else -1
