"""The shipped tracr models (``reverse``, ``xproportion``) and their official circuits.

Oracles: the compiled tracr model's own outputs (computed with jax by
``tools/tracr/compile_tracr.py`` and shipped next to the weights); the shipped datasets'
answers, written by a pure-Python implementation of the two programs
(``auto_circuit.data.generate.tracr``); a hand-worked input per program; and, for the
circuits, the unpatched model's logits (tree patching keeps only the circuit's edges).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import pytest
import torch as t

from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.data.loaders import PromptDataLoader, PromptPairBatch, load_datasets_from_json
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits import (
    tracr_reverse_acdc_edges,
    tracr_reverse_true_edges,
    tracr_xproportion_acdc_edges,
    tracr_xproportion_official_edges,
)
from auto_circuit.families.tracr import (
    TRACR_MODELS,
    get_tracr_model,
    tracr_reference_outputs,
)
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import repo_path_to_abs_path
from auto_circuit.vocabulary.types import AblationType, Edge, PatchType

N_INPUTS = {"reverse": 3**5, "xproportion": 4**5}
ATOL = 1e-5


@cache
def patchable(name: str) -> PatchableModel:
    """One patchable model per shipped model (patching installs hooks in place)."""
    model, _ = get_tracr_model(name)  # type: ignore[arg-type]
    return patchable_model(model, True, seq_len=6, separate_qkv=True, slice_output="not_first_seq")


@cache
def loaders(name: str) -> tuple[PromptDataLoader, PromptDataLoader]:
    """Every input of the model's dataset, split into two single-batch loaders."""
    n = N_INPUTS[name]
    path = repo_path_to_abs_path(f"datasets/tracr/tracr_{name}_len_5_prompts.json")
    sizes = (n // 2, n - n // 2)
    return load_datasets_from_json(
        None, path, "cpu", batch_size=sizes, train_test_size=sizes, return_seq_length=True
    )


def batches(name: str) -> Iterator[tuple[PromptDataLoader, PromptPairBatch]]:
    for loader in loaders(name):
        for batch in loader:
            yield loader, batch


# ----------------------------------------------------------------------------------------
# The converted models


@pytest.mark.parametrize("name", TRACR_MODELS)
def test_matches_compiled_tracr_model(name: str) -> None:
    model, vocab = get_tracr_model(name)  # type: ignore[arg-type]
    tokens, expected = tracr_reference_outputs(name)  # type: ignore[arg-type]
    assert tokens.shape == (N_INPUTS[name], 6)
    assert (tokens[:, 0] == vocab.bos_id).all()
    with t.no_grad():
        logits = model(tokens)
    assert logits.shape == expected.shape
    t.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TRACR_MODELS)
def test_reproduces_program_on_every_dataset_input(name: str) -> None:
    model, vocab = get_tracr_model(name)  # type: ignore[arg-type]
    seen: set[tuple[int, ...]] = set()
    for _, batch in batches(name):
        with t.no_grad():
            out = model(batch.clean)[:, 1:]  # positions 1..5: after BOS
        answers = t.stack(list(batch.answers)).squeeze(-1)  # [batch, 5]
        if vocab.output_kind == "categorical":
            assert (out.argmax(-1) == answers).all()
        else:
            t.testing.assert_close(out[..., 0], answers.float(), atol=1e-6, rtol=0)
        seen.update(tuple(row) for row in batch.clean.tolist())
    assert len(seen) == N_INPUTS[name]


def test_hand_worked_inputs() -> None:
    reverse, vocab = get_tracr_model("reverse")
    with t.no_grad():
        logits = reverse(vocab.encode([1, 2, 3, 3, 1]))[0]
    assert vocab.decode(logits)[1:] == [1, 3, 3, 2, 1]

    xprop, vocab = get_tracr_model("xproportion")
    with t.no_grad():
        logits = xprop(vocab.encode(["x", "w", "x", "x", "z"]))[0]
    expected = t.tensor([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
    t.testing.assert_close(t.tensor(vocab.decode(logits)[1:]), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "zero_parts"),
    [
        # length (A0 + MLP 0), opp_idx (MLP 1), opp_idx - 1 (MLP 2), the move (A3)
        ("reverse", ["blocks.1.attn", "blocks.2.attn", "blocks.3.mlp"]),
        # is_x (MLP 0), the running mean (A1)
        ("xproportion", ["blocks.0.attn", "blocks.1.mlp"]),
    ],
)
def test_layout_follows_the_program(name: str, zero_parts: list[str]) -> None:
    model, _ = get_tracr_model(name)  # type: ignore[arg-type]
    params = dict(model.named_parameters())
    for layer in range(model.cfg.n_layers):
        for part in ("attn", "mlp"):
            prefix = f"blocks.{layer}.{part}."
            weights = [p for n, p in params.items() if n.startswith(prefix) and ".W_" in n]
            is_zero = all((w == 0).all() for w in weights)
            assert is_zero == (prefix[:-1] in zero_parts), prefix
    assert not any(p.requires_grad for p in params.values())
    assert model.cfg.model_name == f"tracr-{name}"


def test_errors() -> None:
    with pytest.raises(CircuitError, match=r"No shipped tracr model 'revers'.*'reverse'"):
        get_tracr_model("revers")  # type: ignore[arg-type]
    with pytest.raises(CircuitError, match=r"shipped models are \['reverse', 'xproportion'\]"):
        tracr_reference_outputs("sort")  # type: ignore[arg-type]
    _, vocab = get_tracr_model("reverse")
    with pytest.raises(CircuitError, match=r"Tokens \[4\] are not in the vocabulary \[1, 2, 3\]"):
        vocab.encode([1, 4])
    with pytest.raises(CircuitError, match="at most 5 tokens"):
        vocab.encode([1] * 6)


# ----------------------------------------------------------------------------------------
# Official circuits under tree patching

CircuitFn = Callable[..., set[Edge]]

CIRCUITS = [
    # (model, circuit, ablation, token_positions, edges: by hand from the circuit's names)
    ("reverse", tracr_reverse_true_edges, AblationType.RESAMPLE, False, 2 * 6),
    ("reverse", tracr_reverse_acdc_edges, AblationType.ZERO, False, 10 * 6),
    # Positions 1-5: the reference's 1, 2, 4, 5 missed the middle token (1.0 logit off).
    ("reverse", tracr_reverse_true_edges, AblationType.RESAMPLE, True, 2 * 5),
    ("reverse", tracr_reverse_acdc_edges, AblationType.ZERO, True, 10 * 5),
    ("xproportion", tracr_xproportion_official_edges, AblationType.RESAMPLE, False, 3 * 6),
    ("xproportion", tracr_xproportion_acdc_edges, AblationType.ZERO, False, 5 * 6),
    ("xproportion", tracr_xproportion_official_edges, AblationType.RESAMPLE, True, 3 * 5),
    ("xproportion", tracr_xproportion_acdc_edges, AblationType.ZERO, True, 5 * 5),
]  # fmt: skip


def tree_patch_errors(name: str, circuit: set[Edge], ablation: AblationType) -> list[t.Tensor]:
    """|circuit-only logits - model logits| per batch, ``[batch, 5, d_vocab_out]``."""
    pm = patchable(name)
    scores = pm.circuit_prune_scores(circuit)
    errors = []
    for loader, batch in batches(name):
        outs = run_circuits(
            pm, loader, [len(circuit)], scores, PatchType.TREE_PATCH, ablation, show_progress=False
        )
        assert list(outs) == [len(circuit)]
        with t.no_grad():
            full = pm(batch.clean)[pm.out_slice]
        errors.append((outs[len(circuit)][batch.key] - full).abs())
    return errors


@pytest.mark.parametrize(("name", "circuit_fn", "ablation", "token_positions", "n_edges"), CIRCUITS)
def test_official_circuit_alone_reproduces_model(
    name: str,
    circuit_fn: CircuitFn,
    ablation: AblationType,
    token_positions: bool,
    n_edges: int,
) -> None:
    circuit = circuit_fn(patchable(name), token_positions=token_positions)
    assert len(circuit) == n_edges
    errors = tree_patch_errors(name, circuit, ablation)
    assert max(float(e.max()) for e in errors) <= ATOL
