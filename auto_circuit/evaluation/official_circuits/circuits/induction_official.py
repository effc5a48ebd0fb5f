"""The induction circuit of the shipped 2-layer attention-only induction model.

An induction circuit (Elhage et al. 2021, `A Mathematical Framework for Transformer
Circuits <https://transformer-circuits.pub/2021/framework/index.html>`_; Olsson et al.
2022, `arXiv:2209.11895 <https://arxiv.org/abs/2209.11895>`_) completes ``... A B ... A``
with ``B``:

1. a previous-token head in layer 0, at B's position, attends to the token before (A)
   and writes "the previous token was A" into B's residual stream;
2. an induction head in layer 1, at the last A, queries with A's embedding, matches the
   key that the previous-token head wrote at B (K-composition), and copies B's embedding
   (its value) to the output.

In the shipped model (``auto_circuit.families.induction``) heads 0.1 and
0.2 are previous-token heads (0.2 carries about two thirds of the effect) and head 1.1 is
the induction head; the other five heads were switched off in training. The roles were
read from attention patterns (previous-token and induction scores) and confirmed by exact
per-edge resample patching on the shipped dataset: the six circuit edges other than the
query hold 98% of the summed absolute effect, and no other edge reaches 2% of the
largest one (the largest outside, 1.6%, is a small value path: head 0.2 at the answer
token into 1.1's value).

Token names (``word_idxs`` keys of the shipped dataset): ``first_occurrence`` (the first
A), ``answer_source`` (B, the token after it) and ``end`` (the last A).

Measured with tree patching (the clean run, every edge outside the circuit ablated) on
each half of the shipped prompts (100 + 100), as a fraction of the model's logit
difference (answer - wrong answer, about 11): resample ablation from the corrupt prompts
96.5% and 96.7% (the complement, i.e. the circuit's edges ablated and every other edge
kept: -9.8% and -9.7%); token-wise mean of the corrupt prompts 100.6% and 100.3%
(complement -0.5% and 0.5%). It is not a zero-ablation circuit (21%): zeroing every
other edge also removes the positional embeddings and the attention context that
every head relies on.

The previous-token heads attend by position: the edges into their queries and keys carry
almost the same information in clean and corrupt prompts (exact patching: < 0.2% of the
effect each) and are left out, as is the induction head's key from the embedding (adding
the previous-token heads' query and key at B and A lowers recovery to 93%: those
attention inputs are then part clean, part corrupt). The induction head's query reads
the same token in clean and corrupt prompts, but it is the circuit's lookup and is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits._common import (
    ModelShape,
    Position,
    check_model,
    circuit_edges,
)
from auto_circuit.vocabulary.types import Edge

INDUCTION_2L = ModelShape(
    "the shipped induction model (get_induction_model)",
    2,
    4,
    attn_only=True,
    parallel_attn_mlp=False,
)

PREVIOUS_TOKEN_HEADS = ("A0.1", "A0.2")
"""The shipped model's previous-token heads."""
INDUCTION_HEADS = ("A1.1",)
"""The shipped model's induction head."""

INDUCTION_EDGES: dict[str, list[Position]] = {
    # The previous-token heads, at B, read A (the token before) ...
    "Resid Start->A0.1.V": ["first_occurrence"],
    "Resid Start->A0.2.V": ["first_occurrence"],
    # ... and write it where the induction head's key at B reads it (K-composition).
    "A0.1->A1.1.K": ["answer_source"],
    "A0.2->A1.1.K": ["answer_source"],
    # The induction head, at the last A, looks A up, copies B and writes it out.
    "Resid Start->A1.1.Q": ["end"],
    "Resid Start->A1.1.V": ["answer_source"],
    "A1.1->Resid End": ["end"],
}
"""Edge name -> the tokens where it belongs (7 edges)."""


def induction_true_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The induction circuit of the shipped induction model: previous-token heads 0.1 and
    0.2 feed the key of induction head 1.1, which copies the answer's embedding to the
    output (Elhage et al. 2021; Olsson et al. 2022). 7 edges of the separate-Q/K/V graph.

    Args:
        model: A patchable model shaped like the shipped induction model (2 layers x 4
            heads, attention only; in practice ``get_induction_model``: other models of
            that shape have other head roles), factorized, with ``separate_qkv=True``.
        token_positions: Return each edge at its token only (requires a graph built with
            ``seq_len`` and ``word_idxs``).
        word_idxs: Token indices (BOS at 0) of ``first_occurrence``, ``answer_source``
            and ``end``, as the shipped dataset's loader returns them.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    check_model(model, "induction_true_edges", INDUCTION_2L, separate_qkv=True)
    return circuit_edges(
        model,
        "induction_true_edges",
        INDUCTION_EDGES,
        token_positions,
        word_idxs or {},
        seq_start_idx,
    )
