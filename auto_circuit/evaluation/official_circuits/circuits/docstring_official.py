"""The Docstring circuit of attn-only-4l (Heimersheim & Janiak 2023).

A 4-layer attention-only model completes the next parameter name of a docstring::

    def port(self, load, size, files, last):
        \"\"\"oil column piece

        :param load: crime population
        :param size: unit dark
        :param          -> " files"

`Heimersheim & Janiak 2023 <https://www.alignmentforum.org/posts/u6KXXmKFbXfWzoAXn>`_
found that heads 3.0 and 3.6 move the answer C_def to the output. Their queries read
head 1.4 at param_3, which carries B's name from B_doc (with head 0.5's help); their keys
read head 2.0 at C_def (which reads 1.4's output at ",_B", the token after B_def) and
head 1.2 at A_doc and B_doc; their values read C_def's embedding. The edge set is the one
Heimersheim wrote for ACDC (``acdc/docstring/utils.py``); the token positions follow the
post's circuit figure.

Token names (``word_idxs`` keys): ``A_def``, ``B_def``, ``C_def`` (the parameters in the
``def`` line), ``,_B`` (the comma after B_def), ``A_doc``, ``B_doc`` (their ``:param``
lines), ``param_3`` (the last token, where the answer is predicted).
"""

from __future__ import annotations

from collections.abc import Mapping

from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits._common import (
    ATTN_ONLY_4L,
    Position,
    check_model,
    circuit_edges,
    node_circuit_edges,
    require_words,
)
from auto_circuit.vocabulary.types import Edge

DOCSTRING_EDGES: dict[str, list[str]] = {
    "A0.5->A1.4.V": ["B_def", "B_doc"],
    "Resid Start->A0.5.V": ["B_def", "C_def", "B_doc"],
    "Resid Start->A2.0.Q": ["C_def"],
    "A0.5->A2.0.Q": ["C_def"],
    # 2.0's key at ",_B" is the comma's embedding, the same in clean and corrupt
    # prompts: the edge is in the circuit but has no position where patching changes it.
    "Resid Start->A2.0.K": [],
    "A0.5->A2.0.K": ["B_def"],
    "A1.4->A2.0.V": [",_B"],
    "Resid Start->A1.4.V": ["B_def", "B_doc"],
    "Resid Start->A1.2.K": ["A_def", "B_def", "A_doc", "B_doc"],
    "Resid Start->A1.2.Q": ["A_doc", "B_doc"],
    "A0.5->A1.2.Q": ["B_doc"],
    "A0.5->A1.2.K": ["B_def", "B_doc"],
    **{
        name: positions
        for head in ("A3.0", "A3.6")
        for name, positions in {
            f"{head}->Resid End": ["param_3"],
            f"A1.4->{head}.Q": ["param_3"],
            f"Resid Start->{head}.V": ["C_def"],
            f"A0.5->{head}.V": ["C_def"],
            f"A2.0->{head}.K": ["C_def"],
            f"A1.2->{head}.K": ["A_doc", "B_doc"],
        }.items()
    },
}
"""Edge name -> the tokens where it belongs (24 edges)."""

NODE_WORDS = ("B_def", ",_B", "C_def", "A_doc", "B_doc", "param_3")


def docstring_true_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The edge-level Docstring circuit of `Heimersheim & Janiak 2023
    <https://www.alignmentforum.org/posts/u6KXXmKFbXfWzoAXn>`_: 24 edges of attn-only-4l's
    separate-Q/K/V graph.

    Args:
        model: A patchable attn-only-4l-shaped TransformerLens model (4 layers x 8 heads,
            attention only), factorized, with ``separate_qkv=True``.
        token_positions: Return each edge at its tokens only (requires a graph built with
            ``seq_len`` and ``word_idxs``).
        word_idxs: Token indices (BOS included) of ``A_def``, ``B_def``, ``,_B``, ``C_def``,
            ``A_doc``, ``B_doc`` and ``param_3``.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    check_model(model, "docstring_true_edges", ATTN_ONLY_4L, separate_qkv=True)
    return circuit_edges(
        model,
        "docstring_true_edges",
        DOCSTRING_EDGES,
        token_positions,
        word_idxs or {},
        seq_start_idx,
    )


def docstring_node_based_official_edges(
    model: PatchableModel,
    token_positions: bool = False,
    word_idxs: Mapping[str, int] | None = None,
    seq_start_idx: int = 0,
) -> set[Edge]:
    """The node-level Docstring circuit: the heads Heimersheim & Janiak keep when they
    measure the circuit (`"Putting it all together"
    <https://www.alignmentforum.org/posts/u6KXXmKFbXfWzoAXn>`_), at their tokens, plus the
    embedding. 588 edges of attn-only-4l's separate-Q/K/V graph.

    Heads 1.0, 0.1 and 2.3 help but the post gives no token for them: they are kept at
    every token from B_def to param_3.

    Args:
        model: A patchable attn-only-4l-shaped TransformerLens model (any graph kind).
        token_positions: Keep each head only at its tokens (requires a graph built with
            ``seq_len`` and ``word_idxs``).
        word_idxs: Token indices (BOS included) of ``B_def``, ``,_B``, ``C_def``,
            ``A_doc``, ``B_doc`` and ``param_3``.
        seq_start_idx: The number of prompt tokens before graph position 0.

    Returns:
        The circuit's edges.
    """
    name = "docstring_node_based_official_edges"
    check_model(model, name, ATTN_ONLY_4L, separate_qkv=None, factorized=False)
    span: list[Position] = []
    if token_positions:
        idxs = require_words(name, word_idxs or {}, NODE_WORDS).values()
        span = list(range(min(idxs), max(idxs) + 1))
    heads: dict[str, list[Position]] = {
        "A1.4": [",_B"],
        "A2.0": ["C_def"],
        "A3.0": ["param_3"],
        "A3.6": ["param_3"],
        "A0.5": ["B_def", "C_def", "B_doc"],
        "A1.2": ["A_doc", "B_doc"],
        "A0.2": ["B_doc"],
        "A0.4": ["param_3"],
        "A1.0": span,
        "A0.1": span,
        "A2.3": span,
    }
    return node_circuit_edges(model, name, heads, token_positions, word_idxs or {}, seq_start_idx)
