"""The sports-players fact-lookup circuit of pythia-2.8b (Nanda et al. 2023).

"Fact: Tiger Woods plays the sport of golf\\nFact: Michael Jordan plays the sport of" ->
" basketball". The "Fact Finding" posts (Nanda, Rajamanoharan, Kramár and Shah 2023,
`post 2 <https://www.alignmentforum.org/posts/3tqJ65kuTkBh8wrRH>`_) describe three
stages in pythia-2.8b-deduped:

1. *token concatenation*: attention heads of layers 0-1 (with the embedding and MLP 0)
   gather the name's tokens at the final name token;
2. *lookup*: MLPs 2-15 at the final name token turn the name into a sport representation;
3. *extract sport*: head 16.20 moves the sport to the END token and heads 17.30, 19.24,
   21.9, 22.15 and 22.17 (fed by 16.20) write it to the logits.

The posts study the features rather than an exact edge set; the edges here are a coarse
reading of them: every edge among the stage-1 components at the earlier name tokens, every
edge among stage-1 and stage-2 components at the final name token, every stage-1/2 source
into 16.20's input there, 16.20 into the five extractor heads, and the six heads into the
output at END. Written for the combined-QKV graph (one input per head).
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits._common import (
    PYTHIA_2_8B,
    Position,
    check_model,
    circuit_edges,
    feeds,
    require_words,
)
from auto_circuit.vocabulary.types import Edge

MAIN_EXTRACT_HEAD = "A16.20"
SECONDARY_EXTRACT_HEADS = ("A21.9", "A22.17", "A22.15", "A17.30", "A19.24")
LOOKUP_MLPS = range(16)
WORDS = ("first_name_tok", "final_name_tok", "end")


def sports_players_edge_positions(
    model: PatchableModel,
    earlier_name_toks: list[Position],
    final_name_tok: Position,
    end: Position,
) -> dict[str, set[Position]]:
    """Edge name -> positions, for a checked pythia-2.8b graph (combined QKV)."""
    n_heads = PYTHIA_2_8B.n_heads
    heads_01 = [f"A{layer}.{head}" for layer in range(2) for head in range(n_heads)]
    positions: dict[str, set[Position]] = {}

    def connect(srcs: list[str], dests: list[str], where: list[Position]) -> None:
        for src in srcs:
            for dest in dests:
                if src != dest and feeds(model, src, dest):
                    positions.setdefault(f"{src}->{dest}", set()).update(where)

    # MLP 1 is left out at the earlier name tokens: in a parallel block it runs beside the
    # layer-1 heads, so nothing it writes reaches the final name token before layer 2.
    concat = ["Resid Start", "MLP 0", *heads_01]
    connect(concat, [n for n in concat if n != "Resid Start"], earlier_name_toks)
    lookup = ["Resid Start", *heads_01, *(f"MLP {layer}" for layer in LOOKUP_MLPS)]
    connect(lookup, [n for n in lookup if n != "Resid Start"], [final_name_tok])
    connect(lookup, [MAIN_EXTRACT_HEAD], [final_name_tok])
    connect([MAIN_EXTRACT_HEAD], list(SECONDARY_EXTRACT_HEADS), [final_name_tok])
    connect([MAIN_EXTRACT_HEAD, *SECONDARY_EXTRACT_HEADS], ["Resid End"], [end])
    return positions


def sports_players_true_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The sports-players circuit of `Nanda et al. 2023
    <https://www.alignmentforum.org/posts/3tqJ65kuTkBh8wrRH>`_ from the name tokens to the
    output: 4,518 edges at token level on the sports-players prompts.

    Args:
        model: A patchable pythia-2.8b-shaped TransformerLens model (32 layers x 32 heads,
            parallel attention/MLP), factorized, with ``separate_qkv=False``.
        token_positions: Return each edge at its tokens only (requires a graph built with
            ``seq_len`` and ``word_idxs``).
        word_idxs: Token indices (BOS included) of ``first_name_tok``, ``final_name_tok``
            and ``end``. The earlier name tokens are ``first_name_tok`` up to, not
            including, ``final_name_tok``.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    name = "sports_players_true_edges"
    check_model(model, name, PYTHIA_2_8B, separate_qkv=False)
    earlier: list[Position] = []
    if token_positions:
        idxs = require_words(name, word_idxs or {}, WORDS)
        earlier = list(range(idxs["first_name_tok"], idxs["final_name_tok"]))
    positions = sports_players_edge_positions(model, earlier, "final_name_tok", "end")
    return circuit_edges(model, name, positions, token_positions, word_idxs or {}, seq_start_idx)


def sports_players_probe_edge_positions(
    model: PatchableModel, earlier_name_toks: list[Position], final_name_tok: Position
) -> dict[str, set[Position]]:
    """Edge name -> positions of the probe circuit: stage 1 as in
    :func:`sports_players_edge_positions`, and the lookup MLP stack extended to the last
    layer at the final name token; no extract stage."""
    n_heads, n_layers = PYTHIA_2_8B.n_heads, PYTHIA_2_8B.n_layers
    heads_01 = [f"A{layer}.{head}" for layer in range(2) for head in range(n_heads)]
    positions: dict[str, set[Position]] = {}

    def connect(nodes: list[str], where: list[Position]) -> None:
        for src in nodes:
            for dest in nodes:
                if src != dest and dest != "Resid Start" and feeds(model, src, dest):
                    positions.setdefault(f"{src}->{dest}", set()).update(where)

    connect(["Resid Start", "MLP 0", *heads_01], earlier_name_toks)
    connect(
        ["Resid Start", *heads_01, *(f"MLP {layer}" for layer in range(n_layers))], [final_name_tok]
    )
    return positions


def sports_players_probe_true_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The sports-players circuit without its extract stage, the lookup MLP stack
    extended to the model's last layer: the edges a probe for the sport on the final
    name token's residual stream reads (as in the Fact Finding posts' probing results).

    Arguments and requirements as :func:`sports_players_true_edges`.
    """
    name = "sports_players_probe_true_edges"
    check_model(model, name, PYTHIA_2_8B, separate_qkv=False)
    earlier: list[Position] = []
    if token_positions:
        idxs = require_words(name, word_idxs or {}, WORDS)
        earlier = list(range(idxs["first_name_tok"], idxs["final_name_tok"]))
    positions = sports_players_probe_edge_positions(model, earlier, "final_name_tok")
    return circuit_edges(model, name, positions, token_positions, word_idxs or {}, seq_start_idx)
