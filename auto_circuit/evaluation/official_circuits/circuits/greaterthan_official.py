"""The Greater-Than circuit of GPT-2 small (Hanna et al. 2023).

"The war lasted from the year 1732 to 17" -> a two-digit year greater than 32.
`Hanna et al. 2023 <https://arxiv.org/abs/2305.00586>`_ found that heads 0.1, 0.3, 0.5
and MLPs 0-3 read the start year YY, the mid-layer heads 5.5, 6.1, 6.9, 7.10, 8.11 and
9.1 attend to YY, and MLPs 8-11 turn that into logits favouring years above YY. The exact
edge set is the one Conmy et al. (2023) wrote for ACDC (``acdc/greaterthan/utils.py`` of
the Automatic-Circuit-Discovery repository).
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits._common import (
    GPT2_SMALL,
    check_model,
    circuit_edges,
)
from auto_circuit.vocabulary.types import Edge

Component = tuple[int, int | None]
"""(layer, head) of an attention head, or (layer, None) for that layer's MLP."""

CIRCUIT: dict[str, list[Component]] = {
    "heads 0.3, 0.5": [(0, 3), (0, 5)],
    "head 0.1": [(0, 1)],
    "early MLPs": [(0, None), (1, None), (2, None), (3, None)],
    "mid heads": [(5, 5), (6, 1), (6, 9), (7, 10), (8, 11), (9, 1)],
    "late MLPs": [(8, None), (9, None), (10, None), (11, None)],
}
"""The component groups of the circuit."""

CONNECTED_GROUPS: list[tuple[str, str]] = [
    ("head 0.1", "early MLPs"),
    ("head 0.1", "mid heads"),
    ("heads 0.3, 0.5", "mid heads"),
    ("early MLPs", "mid heads"),
    ("mid heads", "late MLPs"),
]
"""Group pairs whose every (earlier -> later) component pair is connected, through all of
the later component's inputs (Q, K and V for heads)."""


def _src(component: Component) -> str:
    layer, head = component
    return f"MLP {layer}" if head is None else f"A{layer}.{head}"


def _dests(component: Component) -> list[str]:
    layer, head = component
    return [f"MLP {layer}"] if head is None else [f"A{layer}.{head}.{x}" for x in "QKV"]


def _before(src: Component, dest: Component) -> bool:
    """Whether ``src`` writes before ``dest`` reads (a head feeds its own block's MLP)."""
    (src_layer, src_head), (dest_layer, dest_head) = src, dest
    return src_layer < dest_layer or (
        src_layer == dest_layer and src_head is not None and dest_head is None
    )


def idx_to_nodes(layer_idx: int, head_idx: int | None, src_nodes: bool) -> list[str]:
    """The node names of component ``(layer_idx, head_idx)`` (``head_idx`` None: that
    layer's MLP): its source node (``src_nodes``) or its destination nodes (a head's
    Q, K and V inputs, an MLP's input), as AutoCircuit named them."""
    component = (layer_idx, head_idx)
    return [_src(component)] if src_nodes else _dests(component)


def greaterthan_edge_names() -> set[str]:
    """The names of the circuit's edges in GPT-2 small's separate-Q/K/V graph."""
    names: set[str] = set()
    for group in ("heads 0.3, 0.5", "head 0.1", "early MLPs"):
        names.update(f"Resid Start->{d}" for c in CIRCUIT[group] for d in _dests(c))
    for group in ("mid heads", "late MLPs"):
        names.update(f"{_src(c)}->Resid End" for c in CIRCUIT[group])
    for group in ("early MLPs", "late MLPs"):
        mlps = [layer for layer, _ in CIRCUIT[group]]
        names.update(f"MLP {a}->MLP {b}" for a in mlps for b in mlps if a < b)
    for src_group, dest_group in CONNECTED_GROUPS:
        for src in CIRCUIT[src_group]:
            for dest in CIRCUIT[dest_group]:
                if _before(src, dest):
                    names.update(f"{_src(src)}->{d}" for d in _dests(dest))
    # Hanna et al. patch the mid heads' queries with clean inputs: every MLP before the
    # last mid head feeds the later MLPs and the mid heads' queries (the ACDC choice).
    last_mid_layer = max(layer for layer, _ in CIRCUIT["mid heads"])
    names.update(
        f"MLP {a}->MLP {b}" for a in range(last_mid_layer) for b in range(a + 1, last_mid_layer)
    )
    for layer, head in CIRCUIT["mid heads"]:
        names.update(f"MLP {mlp}->A{layer}.{head}.Q" for mlp in range(layer))
    return names


def greaterthan_true_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The Greater-Than circuit of `Hanna et al. 2023 <https://arxiv.org/abs/2305.00586>`_,
    as defined for ACDC (Conmy et al. 2023): 235 edges of GPT-2 small's graph.

    Args:
        model: A patchable GPT-2-small-shaped TransformerLens model (12 layers x 12 heads),
            factorized, with ``separate_qkv=True``.
        token_positions: Whether to return per-position edges. The circuit does not name
            token positions, so every position of each edge is included; requires a graph
            built with ``seq_len``.
        word_idxs: Not used (the circuit names no tokens).
        seq_start_idx: Not used.

    Returns:
        The circuit's edges: one per edge name (one per name and position in a graph with
        token positions).
    """
    check_model(model, "greaterthan_true_edges", GPT2_SMALL, separate_qkv=True)
    positions = dict.fromkeys(greaterthan_edge_names())
    return circuit_edges(
        model, "greaterthan_true_edges", positions, token_positions, word_idxs or {}, seq_start_idx
    )
