"""Circuits of the tracr-compiled ``frac_prevs`` program on "x" (Lindner et al. 2023).

The program outputs, at each position, the fraction of the tokens so far that are "x":
MLP 0 computes ``is_x`` at each token, and head 1.0 averages it over the positions so far
(its query and key make it attend uniformly to every earlier position and BOS; its value
reads ``is_x``).

Assumed model (the TransformerLens conversion of the compiled program, built by a later
module): 2 layers of one attention head and one MLP each, non-parallel, separate Q/K/V
destinations, 6 token positions (BOS + 5 tokens). Its factorized graph has 23 edges per
position, 138 with 6 positions. Components without a role in the program (head 0.0, MLP
1) have zero weights.

Two circuits, at positions 1-5:

- :func:`tracr_xproportion_official_edges`: the edges that matter under *resample*
  ablation (Miller et al. 2024, `arXiv:2407.08734 <https://arxiv.org/abs/2407.08734>`_):
  the attention pattern of head 1.0 is the same for every input, so its Q and K edges
  do not matter.
- :func:`tracr_xproportion_acdc_edges`: the circuit used by ACDC (Conmy et al. 2023,
  `arXiv:2304.14997 <https://arxiv.org/abs/2304.14997>`_), meant for *zero* ablation,
  which also keeps the query and key of head 1.0.
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits._common import (
    TRACR_XPROPORTION,
    check_model,
    circuit_edges,
)
from auto_circuit.vocabulary.types import Edge

TOKEN_POSITIONS = (1, 2, 3, 4, 5)
"""Prompt indices (BOS at 0) of the five input tokens."""

RESAMPLE_EDGES = ("Resid Start->MLP 0", "MLP 0->A1.0.V", "A1.0->Resid End")
ZERO_ABLATION_EDGES = (
    "A1.0->Resid End",
    "Resid Start->A1.0.Q",
    "Resid Start->A1.0.K",
    "MLP 0->A1.0.V",
    "Resid Start->MLP 0",
)


def _edges(
    name: str,
    edge_names: tuple[str, ...],
    model: PatchableModel,
    token_positions: bool,
    seq_start_idx: int,
) -> set[Edge]:
    check_model(model, name, TRACR_XPROPORTION, separate_qkv=True)
    positions = dict.fromkeys(edge_names, TOKEN_POSITIONS)
    return circuit_edges(model, name, positions, token_positions, {}, seq_start_idx)


def tracr_xproportion_official_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The tracr-xproportion circuit under resample ablation (Miller et al. 2024): the
    embedding into MLP 0, MLP 0 into head 1.0's value and 1.0 into the output, at
    positions 1-5 (15 edges at token level, 3 without positions).

    Args:
        model: A patchable tracr-xproportion-shaped TransformerLens model (2 layers x 1
            head with MLPs), factorized, with ``separate_qkv=True``.
        token_positions: Return each edge at its positions only (requires a graph built
            with ``seq_len``; prompts are BOS + 5 tokens).
        word_idxs: Not used: the positions are fixed prompt indices.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    return _edges(
        "tracr_xproportion_official_edges", RESAMPLE_EDGES, model, token_positions, seq_start_idx
    )


def tracr_xproportion_acdc_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The tracr-xproportion circuit of ACDC (Conmy et al. 2023), for zero ablation: also
    head 1.0's query and key inputs, at positions 1-5 (25 edges at token level, 5
    without positions).

    Args:
        model: A patchable tracr-xproportion-shaped TransformerLens model (2 layers x 1
            head with MLPs), factorized, with ``separate_qkv=True``.
        token_positions: Return each edge at its positions only (requires a graph built
            with ``seq_len``; prompts are BOS + 5 tokens).
        word_idxs: Not used: the positions are fixed prompt indices.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    return _edges(
        "tracr_xproportion_acdc_edges", ZERO_ABLATION_EDGES, model, token_positions, seq_start_idx
    )
