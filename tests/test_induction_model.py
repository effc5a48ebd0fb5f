"""The shipped induction model: it solves its task, and its official circuit is the circuit.

Oracles: the model's own logits (accuracy), attention patterns read with
``run_with_cache`` (head roles), a hand-written forward pass of the 2-layer attention-only
model from its weight matrices in which every edge's source value is chosen by hand (the
circuit's logit difference, checked against ``run_circuits``), and a brute-force check of
the training data generator.

Recovery is ``logit diff of the circuit run / logit diff of the model`` on the clean
prompts, with the logit difference ``answer - wrong_answer`` at the last token averaged
over prompts. The circuit run is tree patching with resample ablation: the clean prompt
runs with every edge outside the circuit fed its source's value from the corrupt run.
The *complement* run feeds the circuit's edges from the corrupt run and keeps every other
edge clean (tree patching with the complement as the circuit).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable, Container
from pathlib import Path
from types import ModuleType

import pytest
import torch as t
from conftest import make_tl_model
from torch import Tensor

from auto_circuit.algorithms.exact_patching import exact_patching_prune_scores
from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.data.loaders import load_datasets_from_json
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits.induction_official import (
    induction_true_edges,
)
from auto_circuit.families.induction import (
    BOS_TOKEN_ID,
    N_TOKENS,
    get_induction_model,
    induction_dataset_path,
    load_induction_model,
)
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, PatchType

ROOT = Path(__file__).resolve().parents[1]
PREV_HEADS, INDUCTION_HEAD = (1, 2), 1
WORDS = {"first_occurrence": 5, "answer_source": 6, "end": 13}


def _train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "train_induction", ROOT / "tools/train_induction.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_induction", module)
    spec.loader.exec_module(module)
    return module


def _prompts() -> dict[str, Tensor]:
    data = json.loads(induction_dataset_path().read_text())
    return {
        "clean": t.tensor([p["clean"] for p in data["prompts"]]),
        "corrupt": t.tensor([p["corrupt"] for p in data["prompts"]]),
        "answers": t.tensor([p["answers"][0] for p in data["prompts"]]),
        "wrong": t.tensor([p["wrong_answers"][0] for p in data["prompts"]]),
    }


def _logit_diff(logits: Tensor, answers: Tensor, wrong: Tensor) -> Tensor:
    """``[batch, vocab]`` last-token logits -> mean ``answer - wrong`` logit."""
    rows = t.arange(len(answers))
    return (logits[rows, answers] - logits[rows, wrong]).mean()


@pytest.fixture(scope="module")
def prompts() -> dict[str, Tensor]:
    return _prompts()


@pytest.fixture
def token_model() -> PatchableModel:
    return patchable_model(
        get_induction_model(),
        factorized=True,
        slice_output="last_seq",
        seq_len=14,
        separate_qkv=True,
    )


# ----------------------------------------------------------------------------------------
# The model and its task


def test_model_shape_and_vocabulary():
    rng = t.random.get_rng_state()
    model = get_induction_model()
    assert t.equal(rng, t.random.get_rng_state())  # loading draws no random numbers
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.n_ctx) == (2, 4, 64, 16, 24)
    assert cfg.attn_only and cfg.normalization_type is None
    assert cfg.d_vocab == N_TOKENS + 1 == BOS_TOKEN_ID + 1
    assert model.tokenizer is None
    assert not any(p.requires_grad for p in model.parameters())


def test_model_solves_the_task(prompts):
    """All 200 shipped prompts are answered correctly (clean logit diff about 11); without
    the earlier copy (corrupt) the answer is never the top token and the diff is < 0."""
    model = get_induction_model()
    with t.no_grad():
        clean = model(prompts["clean"])[:, -1]
        corrupt = model(prompts["corrupt"])[:, -1]
    assert (clean.argmax(-1) == prompts["answers"]).float().mean().item() == 1.0
    assert (corrupt.argmax(-1) == prompts["answers"]).float().mean().item() == 0.0
    assert _logit_diff(clean, prompts["answers"], prompts["wrong"]) > 10.0
    assert _logit_diff(corrupt, prompts["answers"], prompts["wrong"]) < 0.0


def test_head_roles_from_attention_patterns():
    """Heads 0.1 and 0.2 attend to the previous token, head 1.1 to the token after the
    current token's earlier copy; the heads switched off in training have no output."""
    model = get_induction_model()
    gen = t.Generator().manual_seed(1234)
    length = 9
    r = t.stack([t.randperm(N_TOKENS, generator=gen)[:length] for _ in range(64)])
    tokens = t.cat([t.full((64, 1), BOS_TOKEN_ID), r, r], dim=1)
    with t.no_grad():
        _, cache = model.run_with_cache(tokens)
    p0 = cache["blocks.0.attn.hook_pattern"]  # batch head query key
    p1 = cache["blocks.1.attn.hook_pattern"]
    after_bos = t.arange(2, 2 * length + 1)
    prev = [p0[:, h, after_bos, after_bos - 1].mean().item() for h in range(4)]
    second = t.arange(length + 1, 2 * length + 1)
    induction = p1[:, INDUCTION_HEAD, second, second - length + 1].mean().item()
    assert min(prev[h] for h in PREV_HEADS) > 0.7
    assert induction > 0.9
    w_o = [block.attn.W_O.flatten(1).norm(dim=-1) for block in model.blocks]
    live = {(layer, h) for layer in range(2) for h in range(4) if w_o[layer][h] > 1e-3}
    assert live == {(0, 1), (0, 2), (1, INDUCTION_HEAD)}


# ----------------------------------------------------------------------------------------
# The official circuit


def test_official_circuit_edges(token_model):
    edges = induction_true_edges(token_model, token_positions=True, word_idxs=WORDS)
    got = {(e.name, e.seq_idx) for e in edges}
    expected = {
        ("Resid Start->A0.1.V", 5),
        ("Resid Start->A0.2.V", 5),
        ("A0.1->A1.1.K", 6),
        ("A0.2->A1.1.K", 6),
        ("Resid Start->A1.1.Q", 13),
        ("Resid Start->A1.1.V", 6),
        ("A1.1->Resid End", 13),
    }
    assert got == expected
    shifted = induction_true_edges(token_model, True, WORDS, seq_start_idx=2)
    assert {(e.name, e.seq_idx) for e in shifted} == {(n, s - 2) for n, s in expected}
    every_pos = induction_true_edges(token_model, token_positions=False)
    assert {(e.name, e.seq_idx) for e in every_pos} == {
        (n, s) for n, _ in expected for s in range(14)
    }


def test_component_circuit_has_seven_edges():
    model = patchable_model(get_induction_model(), factorized=True, separate_qkv=True)
    edges = induction_true_edges(model)
    assert len(edges) == 7 and all(e.seq_idx is None for e in edges)


def test_circuit_errors(token_model):
    with pytest.raises(CircuitError, match="2 layers x 4 heads, attention-only.*3 layers"):
        induction_true_edges(
            patchable_model(make_tl_model(n_layers=3, attn_only=True), True, separate_qkv=True)
        )
    with pytest.raises(CircuitError, match="separate_qkv=True"):
        induction_true_edges(patchable_model(get_induction_model(), True, separate_qkv=False))
    with pytest.raises(CircuitError, match="missing .*'answer_source'"):
        induction_true_edges(token_model, True, {"first_occurrence": 5, "end": 13})
    with pytest.raises(CircuitError, match="outside the model's 14 token positions"):
        induction_true_edges(token_model, True, {**WORDS, "end": 20})


def _manual_logits(
    model, tokens: Tensor, keep: Callable[[str, str], Tensor] | None, patch: dict | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """A hand-written forward of the 2-layer attention-only model from its weights.

    Every destination input is the sum of its sources' outputs (plus the constant
    biases). With ``patch`` (source outputs of another run), the source ``src`` feeds
    destination ``dest`` at position ``s`` its own value where ``keep(src, dest)[s]``,
    else the value in ``patch``. Returns last-token logits and this run's source outputs.
    """
    seq = tokens.shape[1]
    outs = {"Resid Start": model.W_E[tokens] + model.W_pos[:seq]}
    causal = t.ones(seq, seq, dtype=t.bool).triu(1)
    bias = t.zeros(model.cfg.d_model)

    def dest_input(dest: str) -> Tensor:
        total = bias.clone()
        for src, out in outs.items():
            if patch is not None and keep is not None:
                out = t.where(keep(src, dest)[None, :, None], out, patch[src])
            total = total + out
        return total

    for layer in range(2):
        attn = model.blocks[layer].attn
        new = {}
        for h in range(4):
            x = {letter: dest_input(f"A{layer}.{h}.{letter}") for letter in "QKV"}
            q = x["Q"] @ attn.W_Q[h] + attn.b_Q[h]
            k = x["K"] @ attn.W_K[h] + attn.b_K[h]
            v = x["V"] @ attn.W_V[h] + attn.b_V[h]
            scores = (q @ k.transpose(-1, -2) / math.sqrt(model.cfg.d_head)).masked_fill(
                causal, -t.inf
            )
            new[f"A{layer}.{h}"] = scores.softmax(-1) @ v @ attn.W_O[h]
        outs.update(new)
        bias = bias + attn.b_O
    logits = dest_input("Resid End") @ model.W_U + model.b_U
    return logits[:, -1], outs


def _keep_fn(
    edges: Container[tuple[str, int | None]], inside: bool
) -> Callable[[str, str], Tensor]:
    """Keep (clean value) the listed edges (``inside``) or every edge but them."""

    def keep(src: str, dest: str) -> Tensor:
        listed = t.tensor([(f"{src}->{dest}", s) in edges for s in range(14)])
        return listed if inside else ~listed

    return keep


def test_manual_forward_reproduces_the_model(prompts):
    model = get_induction_model()
    with t.no_grad():
        manual, _ = _manual_logits(model, prompts["clean"][:20], None, None)
        expected = model(prompts["clean"][:20])[:, -1]
    assert t.allclose(manual, expected, atol=1e-4)


def test_official_circuit_recovers_the_logit_difference(prompts, token_model):
    """Circuit: >= 90% of the model's logit difference (measured: 96.6%); the complement
    (circuit ablated, the rest clean): < 10% (measured: -9.8%, the corrupt run's value).
    ``run_circuits`` agrees with the hand-written patched forward."""
    model = get_induction_model()
    edges = induction_true_edges(token_model, True, WORDS)
    names = {(e.name, e.seq_idx) for e in edges}
    answers, wrong = prompts["answers"], prompts["wrong"]
    with t.no_grad():
        clean_ld = _logit_diff(model(prompts["clean"])[:, -1], answers, wrong).item()
        corrupt_ld = _logit_diff(model(prompts["corrupt"])[:, -1], answers, wrong).item()
        _, corrupt_outs = _manual_logits(model, prompts["corrupt"], None, None)
        manual = {}
        for inside in (True, False):
            logits, _ = _manual_logits(
                model, prompts["clean"], _keep_fn(names, inside), corrupt_outs
            )
            manual[inside] = _logit_diff(logits, answers, wrong).item()
    assert manual[True] / clean_ld >= 0.9
    assert manual[False] / clean_ld < 0.1
    # Also relative to the corrupt run: the complement is as bad as the corrupt prompts.
    assert (manual[False] - corrupt_ld) / (clean_ld - corrupt_ld) < 0.1

    _, loader = load_datasets_from_json(
        None,
        induction_dataset_path(),
        "cpu",
        batch_size=100,
        train_test_size=(100, 100),
        return_seq_length=True,
        shuffle=False,
    )
    assert loader.word_idxs == WORDS and loader.seq_len == 14
    circuit = token_model.circuit_prune_scores(edges=list(edges))
    complement = {k: (v == 0).float() for k, v in circuit.items()}
    for inside, scores, n in (
        (True, circuit, len(edges)),
        (False, complement, token_model.n_edges - len(edges)),
    ):
        out = run_circuits(
            token_model,
            loader,
            [n],
            scores,
            patch_type=PatchType.TREE_PATCH,
            ablation_type=AblationType.RESAMPLE,
            show_progress=False,
        )
        (batch_out,) = out[n].values()
        ld = _logit_diff(batch_out, answers[100:], wrong[100:]).item()
        with t.no_grad():
            logits, _ = _manual_logits(
                model,
                prompts["clean"][100:],
                _keep_fn(names, inside),
                {k: v[100:] for k, v in corrupt_outs.items()},
            )
        assert ld == pytest.approx(_logit_diff(logits, answers[100:], wrong[100:]).item(), abs=1e-3)


def test_exact_patching_finds_only_circuit_edges(token_model):
    """Per-edge exact patching (resample) on 16 prompts: every edge outside the official
    circuit changes the logit difference by less than 3% of the largest edge effect, and
    the six largest are circuit edges (the seventh, the induction head's query, reads the
    same token in clean and corrupt prompts)."""
    train, _ = load_datasets_from_json(
        None,
        induction_dataset_path(),
        "cpu",
        batch_size=16,
        train_test_size=(16, 16),
        return_seq_length=True,
    )
    scores = exact_patching_prune_scores(
        token_model, train, edges_per_forward=256, show_progress=False
    )
    official = induction_true_edges(token_model, True, WORDS)
    ranked = sorted(token_model.edges, key=lambda e: -abs(e.prune_score(scores).item()))
    largest = abs(ranked[0].prune_score(scores).item())
    assert set(ranked[:6]) <= official
    assert all(
        abs(e.prune_score(scores).item()) < 0.03 * largest for e in ranked if e not in official
    )


def test_loader_errors(tmp_path):
    with pytest.raises(CircuitError, match="No model config"):
        load_induction_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"n_layers": 2}}))
    with pytest.raises(CircuitError, match="No weights file"):
        load_induction_model(tmp_path)


# ----------------------------------------------------------------------------------------
# The training script's data


def test_training_batches_are_seeded_and_inductive():
    script = _train_script()
    a = script.training_batch(t.Generator().manual_seed(7), 16)
    b = script.training_batch(t.Generator().manual_seed(7), 16)
    c = script.training_batch(t.Generator().manual_seed(8), 16)
    assert all(t.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not t.equal(a[0], c[0])
    tokens, mask = a
    assert tokens.shape == mask.shape == (16, 24)
    assert (tokens[:, 0] == BOS_TOKEN_ID).all() and (tokens[:, 1:] < N_TOKENS).all()
    for row, keep in zip(tokens.tolist(), mask.tolist(), strict=True):
        assert sum(keep) >= 1
        for j in (j for j, k in enumerate(keep) if k):
            # Brute force: the current token occurred exactly once before, followed by
            # the target (so induction predicts it), and the target is not elsewhere.
            earlier = [i for i in range(j) if row[i] == row[j]]
            assert len(earlier) == 1 and row[earlier[0] + 1] == row[j + 1]


def test_shipped_dataset_is_the_generated_one():
    script = _train_script()
    shipped = json.loads(induction_dataset_path().read_text())
    assert shipped == script.dataset_json(seed=0, n_prompts=200)
    for p in shipped["prompts"]:
        clean, corrupt = p["clean"], p["corrupt"]
        assert len(clean) == len(corrupt) == 14 and clean[0] == BOS_TOKEN_ID
        assert [i for i in range(14) if clean[i] != corrupt[i]] == [5, 6]
        assert clean[9:] == clean[1:6] and p["answers"] == [clean[6]]
        assert p["wrong_answers"] == [corrupt[6]] and corrupt[6] not in clean
