"""Circuits of the tracr-compiled ``reverse`` program (Lindner et al. 2023).

The RASP program ``reverse`` computes the length of the input (attention 0 + MLP 0), the
opposite index ``length - index - 1`` (MLPs 1-2) and moves each token to its opposite
position (attention 3, query = opposite index, key = index, value = token).

Assumed model (the TransformerLens conversion of the compiled program, built by a later
module): 4 layers of one attention head and one MLP each, non-parallel, separate Q/K/V
destinations, 6 token positions (BOS + 5 tokens). Its factorized graph has 77 edges per
position, 462 with 6 positions. Layers without a role in the program have zero weights.

Two circuits, at every token position 1-5. The reference listed positions 1, 2, 4 and 5
(the middle token stays in place), but head 3.0 also writes the middle token's output:
leaving position 3 out changes its logits by 1.0 (measured by exact patching).

- :func:`tracr_reverse_true_edges`: the edges that matter under *resample* ablation
  (Miller et al. 2024, `arXiv:2407.08734 <https://arxiv.org/abs/2407.08734>`_). Every
  input has length 5, so the length and opposite-index computation is the same in clean
  and corrupt runs: only the token moved by head 3.0 differs.
- :func:`tracr_reverse_acdc_edges`: the circuit used by ACDC (Conmy et al. 2023,
  `arXiv:2304.14997 <https://arxiv.org/abs/2304.14997>`_), meant for *zero* ablation,
  where the length computation must be kept too.
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits._common import (
    TRACR_REVERSE,
    check_model,
    circuit_edges,
)
from auto_circuit.vocabulary.types import Edge

REVERSED_POSITIONS = (1, 2, 3, 4, 5)
"""Prompt indices (BOS at 0) whose output changes when the input is reversed."""

RESAMPLE_EDGES = ("Resid Start->A3.0.V", "A3.0->Resid End")
ZERO_ABLATION_EDGES = (
    "A3.0->Resid End",
    "MLP 2->A3.0.Q",
    "Resid Start->A3.0.K",
    "Resid Start->A3.0.V",
    "MLP 1->MLP 2",
    "MLP 0->MLP 1",
    "Resid Start->MLP 1",
    "A0.0->MLP 0",
    "Resid Start->MLP 0",
    "Resid Start->A0.0.V",
)


def _edges(
    name: str,
    edge_names: tuple[str, ...],
    model: PatchableModel,
    token_positions: bool,
    seq_start_idx: int,
) -> set[Edge]:
    check_model(model, name, TRACR_REVERSE, separate_qkv=True)
    positions = dict.fromkeys(edge_names, REVERSED_POSITIONS)
    return circuit_edges(model, name, positions, token_positions, {}, seq_start_idx)


def tracr_reverse_true_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The tracr-reverse circuit under resample ablation (Miller et al. 2024): the
    token's embedding into head 3.0's value and 3.0 into the output, at positions 1 to 5
    (10 edges at token level, 2 without positions).

    Args:
        model: A patchable tracr-reverse-shaped TransformerLens model (4 layers x 1 head
            with MLPs), factorized, with ``separate_qkv=True``.
        token_positions: Return each edge at its positions only (requires a graph built
            with ``seq_len``; prompts are BOS + 5 tokens).
        word_idxs: Not used: the positions are fixed prompt indices.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    return _edges("tracr_reverse_true_edges", RESAMPLE_EDGES, model, token_positions, seq_start_idx)


def tracr_reverse_acdc_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The tracr-reverse circuit of ACDC (Conmy et al. 2023), for zero ablation: the
    length and opposite-index computation plus the token move, at positions 1, 2, 4 and 5
    (40 edges at token level, 10 without positions).

    Args:
        model: A patchable tracr-reverse-shaped TransformerLens model (4 layers x 1 head
            with MLPs), factorized, with ``separate_qkv=True``.
        token_positions: Return each edge at its positions only (requires a graph built
            with ``seq_len``; prompts are BOS + 5 tokens).
        word_idxs: Not used: the positions are fixed prompt indices.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    return _edges(
        "tracr_reverse_acdc_edges", ZERO_ABLATION_EDGES, model, token_positions, seq_start_idx
    )
