"""The Indirect Object Identification (IOI) circuit of GPT-2 small (Wang et al. 2022).

"When Mary and John went to the store, John gave a drink to" -> " Mary". `Wang et al.
2022 <https://arxiv.org/abs/2211.00593>`_ (section 3 and its circuit diagram) found 26
heads in seven classes:

- previous-token heads 2.2, 4.11 (at S1+1, reading S1);
- duplicate-token heads 0.1, 0.10, 3.0 and induction heads 5.5, 5.8, 5.9, 6.9 (at S2:
  "S was seen before"), the induction heads reading the previous-token heads at S1+1;
- S-inhibition heads 7.3, 7.9, 8.6, 8.10 (at END), whose keys/values read the duplicate
  and induction heads at S2;
- name mover heads 9.9, 9.6, 10.0, backup name movers 9.0, 9.7, 10.1, 10.2, 10.6, 10.10,
  11.2, 11.9 and negative name movers 10.7, 11.10 (at END): their queries read the
  S-inhibition heads and they copy the IO name (keys/values at IO) to the logits.

The edge-level version follows the Q/K/V connections Conmy et al. (2023) wrote for ACDC
(``acdc/ioi/utils.py``), with the token positions above. Wang et al. let signal pass
through MLPs between connected heads, so every MLP between two connected head groups is
in the circuit too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits._common import (
    GPT2_SMALL,
    check_model,
    circuit_edges,
    feeds,
    node_circuit_edges,
)
from auto_circuit.vocabulary.types import Edge

IOI_HEADS: dict[str, list[tuple[int, int]]] = {
    "name mover": [(9, 9), (10, 0), (9, 6)],
    "backup name mover": [(10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)],
    "negative name mover": [(10, 7), (11, 10)],
    "s2 inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (5, 8), (5, 9), (6, 9)],
    "duplicate token": [(0, 1), (0, 10), (3, 0)],
    "previous token": [(2, 2), (4, 11)],
}
"""The 26 heads of the IOI circuit by class, (layer, head)."""

HEAD_POSITIONS: dict[str, str] = {
    "name mover": "end",
    "backup name mover": "end",
    "negative name mover": "end",
    "s2 inhibition": "end",
    "induction": "S2",
    "duplicate token": "S2",
    "previous token": "S1+1",
}
"""The token (a ``word_idxs`` key) where each head class does its work."""

INPUT, OUTPUT = "input", "output"


@dataclass(frozen=True)
class Connection:
    """Head class ``src`` feeds ``dest`` through the given inputs at the given tokens.

    ``inputs`` pairs a head input (``"Q"``, ``"K"``, ``"V"``; ``None`` for the output)
    with the ``word_idxs`` key of the destination token.
    """

    src: str
    dest: str
    inputs: tuple[tuple[str | None, str], ...]


@dataclass(frozen=True)
class Conn:
    """AutoCircuit's form of a :class:`Connection`: head class ``inp`` feeds ``out``
    through ``qkv``, pairs of (``"q"``, ``"k"``, ``"v"`` or None for the output, the
    ``word_idxs`` key of the token)."""

    inp: str
    out: str
    qkv: tuple[tuple[str | None, str], ...]

    def to_connection(self) -> Connection:
        """The same connection in this module's form (input letters upper case)."""
        inputs = tuple((None if x is None else x.upper(), word) for x, word in self.qkv)
        return Connection(self.inp, self.out, inputs)


CONNECTIONS: list[Connection] = [
    Connection(INPUT, "previous token", (("Q", "S1+1"), ("K", "S1"), ("V", "S1"))),
    Connection(INPUT, "duplicate token", (("Q", "S2"), ("K", "S1"), ("V", "S1"))),
    Connection(INPUT, "s2 inhibition", (("Q", "end"),)),
    Connection(INPUT, "negative name mover", (("K", "IO"), ("V", "IO"))),
    Connection(INPUT, "name mover", (("K", "IO"), ("V", "IO"))),
    Connection(INPUT, "backup name mover", (("K", "IO"), ("V", "IO"))),
    Connection("previous token", "induction", (("K", "S1+1"), ("V", "S1+1"))),
    Connection("induction", "s2 inhibition", (("K", "S2"), ("V", "S2"))),
    Connection("duplicate token", "s2 inhibition", (("K", "S2"), ("V", "S2"))),
    Connection("s2 inhibition", "negative name mover", (("Q", "end"),)),
    Connection("s2 inhibition", "name mover", (("Q", "end"),)),
    Connection("s2 inhibition", "backup name mover", (("Q", "end"),)),
    Connection("negative name mover", OUTPUT, ((None, "end"),)),
    Connection("name mover", OUTPUT, ((None, "end"),)),
    Connection("backup name mover", OUTPUT, ((None, "end"),)),
]
"""Which head classes compose, through which inputs, at which tokens (ACDC's edges)."""

EDGE_WORDS = ("IO", "S1", "S1+1", "S2", "end")
HEAD_WORDS = ("S1+1", "S2", "end")


def _mlp_span(conn: Connection, n_layers: int) -> range:
    """The MLPs between the connected groups: from the first layer of the source class
    (layer 0 for the input; an MLP runs after its block's heads) up to, not including, the
    last layer of the destination class; up to the last layer for the output.

    The reference implementation used the END token *index* as the last layer for the
    output, so its MLP edges changed with ``word_idxs``; here they never do.
    """
    start = 0 if conn.src == INPUT else min(layer for layer, _ in IOI_HEADS[conn.src])
    stop = n_layers if conn.dest == OUTPUT else max(layer for layer, _ in IOI_HEADS[conn.dest])
    return range(start, stop)


def ioi_edge_positions(model: PatchableModel) -> dict[str, set[str]]:
    """Edge name -> the ``word_idxs`` keys where it belongs, for a checked GPT-2 graph."""
    n_layers = GPT2_SMALL.n_layers
    positions: dict[str, set[str]] = {}
    for conn in CONNECTIONS:
        srcs = (
            ["Resid Start"]
            if conn.src == INPUT
            else [f"A{layer}.{head}" for layer, head in IOI_HEADS[conn.src]]
        )
        dests: list[tuple[str, str]] = []
        for letter, word in conn.inputs:
            if conn.dest == OUTPUT:
                dests.append(("Resid End", word))
            else:
                dests.extend((f"A{lyr}.{hd}.{letter}", word) for lyr, hd in IOI_HEADS[conn.dest])
        mlps = [f"MLP {layer}" for layer in _mlp_span(conn, n_layers)]
        srcs += mlps
        dests += [(mlp, word) for mlp in mlps for _, word in conn.inputs]
        for src in srcs:
            for dest, word in dests:
                if src != dest and feeds(model, src, dest):
                    positions.setdefault(f"{src}->{dest}", set()).add(word)
    return positions


def ioi_true_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The edge-level IOI circuit of `Wang et al. 2022 <https://arxiv.org/abs/2211.00593>`_
    as written for ACDC by Conmy et al. (2023), with token positions from the paper: 771
    edges of GPT-2 small's separate-Q/K/V graph.

    Args:
        model: A patchable GPT-2-small-shaped TransformerLens model (12 layers x 12 heads),
            factorized, with ``separate_qkv=True``.
        token_positions: Return each edge at its token positions only (requires a graph
            built with ``seq_len`` and ``word_idxs``).
        word_idxs: Token indices (BOS included) of ``IO``, ``S1``, ``S1+1``, ``S2`` and
            ``end``; only used with ``token_positions``.
        seq_start_idx: The number of prompt tokens before graph position 0 (the loader's
            ``diverge_idx`` when a KV cache holds the shared prefix).

    Returns:
        The circuit's edges.

    Note:
        The reference library takes the END token index as a layer bound for the MLPs in
        front of the output, so its component circuit has 739 edges without ``word_idxs``
        and 771 with the IOI datasets' ``word_idxs``. Here the MLPs after the name movers
        are always in (771 edges), whatever ``word_idxs`` says.
    """
    check_model(model, "ioi_true_edges", GPT2_SMALL, separate_qkv=True)
    return circuit_edges(
        model,
        "ioi_true_edges",
        ioi_edge_positions(model),
        token_positions,
        word_idxs or {},
        seq_start_idx,
    )


def _mlp_index(node_name: str) -> int | None:
    return int(node_name[4:]) if node_name.startswith("MLP ") else None


def ioi_true_edges_mlp_0_only(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """:func:`ioi_true_edges` without any edge into or out of an MLP other than MLP 0.

    Wang et al. let signal pass through every MLP between connected heads without studying
    those paths; MLP 0 is widely found to matter in GPT-2 (it acts as an extended
    embedding), the others are mostly unneeded. 232 edges.

    Note:
        The reference library keeps every edge whose name mentions ``MLP 0``, including
        ``MLP 0 -> MLP k`` for k > 0 (242 edges), which leaves other MLPs in the circuit.
        Here only MLP 0 remains.
    """
    edges = ioi_true_edges(model, token_positions, word_idxs, seq_start_idx)
    return {
        e
        for e in edges
        if _mlp_index(e.src.name) in (None, 0) and _mlp_index(e.dest.name) in (None, 0)
    }


def ioi_head_based_official_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The node-level IOI circuit: the 26 heads of `Wang et al. 2022
    <https://arxiv.org/abs/2211.00593>`_, each at its token, plus every non-head source.

    Wang et al. measure their circuit by mean-ablating the heads *outside* it; ablating
    the edges this function leaves out does exactly that. 6,540 edges of GPT-2 small's
    separate-Q/K/V graph; 41,328 at token level (13 positions).

    Args:
        model: A patchable GPT-2-small-shaped TransformerLens model (any graph kind).
        token_positions: Keep each head only at its token (requires a graph built with
            ``seq_len`` and ``word_idxs``).
        word_idxs: Token indices (BOS included) of ``S1+1``, ``S2`` and ``end``.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    check_model(
        model, "ioi_head_based_official_edges", GPT2_SMALL, separate_qkv=None, factorized=False
    )
    heads = {
        f"A{layer}.{head}": [HEAD_POSITIONS[cls]]
        for cls, layer_heads in IOI_HEADS.items()
        for layer, head in layer_heads
    }
    return node_circuit_edges(
        model,
        "ioi_head_based_official_edges",
        heads,
        token_positions,
        word_idxs or {},
        seq_start_idx,
    )
