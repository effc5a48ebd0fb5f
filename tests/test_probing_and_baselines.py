"""Subnetwork and circuit probing, activation magnitude, random and ground-truth scores.

The planted circuit. ``MicroModel(2)`` with block weights (row i = head i)

    block 0: [[1, 0], [0, 2]]      block 1: [[0, 3], [4, 0]]

and clean inputs ``[a, b]`` whose corrupt inputs are ``[-a, b]``: the prompts differ only
in dimension 0. Heads act elementwise, so dimension 0 flows only through B0.0 and B1.1;
B0.1 and B1.0 read and write only dimension 1, which is identical in the clean and the
corrupt run (and under any patching, which only changes dimension 0). Every edge into or
out of B0.1 or B1.0 therefore has patch value = current value and patching it changes
nothing. The other six edges all matter: output dimension 0 is
``a`` (Resid Start->Resid End) ``+ a`` (B0.0->Resid End, fed by Resid Start->B0.0)
``+ 4a + 4a`` (B1.1->Resid End, fed by Resid Start->B1.1 and B0.0->B1.1) = ``10a``, and
every term flips sign between the clean and the corrupt run.

Under tree patching (clean input, edges outside the circuit carry corrupt values) the
planted circuit is the unique smallest faithful circuit. Under edge patching (corrupt
input, circuit edges carry clean values, other edges their current value) an edge whose
source already computes its clean value needs no patch, so three 3-edge circuits are
faithful too (e.g. the three edges into Resid End). Edge-mode probing is therefore only
required to rank the relevant edges above the irrelevant ones.
"""

from __future__ import annotations

import math

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.algorithms.activation_magnitude import activation_magnitude_prune_scores
from auto_circuit.algorithms.circuit_probing import circuit_probing_prune_scores
from auto_circuit.algorithms.ground_truth import ground_truth_prune_scores
from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.algorithms.random_edges import random_prune_scores
from auto_circuit.algorithms.subnetwork_probing import (
    ProbingEpoch,
    faithfulness_loss,
    subnetwork_probing_prune_scores,
)
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import sample_hard_concrete
from auto_circuit.vocabulary.types import AblationType, PatchType

PLANTED = {
    "Resid Start->B0.0",
    "Resid Start->B1.1",
    "B0.0->B1.1",
    "Resid Start->Resid End",
    "B0.0->Resid End",
    "B1.1->Resid End",
}


def loader_of(clean, corrupt, answers, batch_size=4, wrong_answers=None) -> PromptDataLoader:
    wrong = answers if wrong_answers is None else wrong_answers
    dataset = PromptDataset(clean, corrupt, answers, wrong)
    return PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch_size)


def planted_micro():
    """The planted-circuit model (module docstring), 8 prompts in 2 batches; the answers
    are the clean outputs (the target of ``faithfulness_target="mse"``)."""
    raw = MicroModel(2)
    with t.no_grad():
        raw.get_parameter("blocks.0.weights").copy_(t.tensor([[1.0, 0.0], [0.0, 2.0]]))
        raw.get_parameter("blocks.1.weights").copy_(t.tensor([[0.0, 3.0], [4.0, 0.0]]))
    gen = t.Generator().manual_seed(0)
    a, b = t.rand(8, 1, 1, generator=gen) + 0.5, t.rand(8, 1, 1, generator=gen) + 0.5
    clean, corrupt = t.cat([a, b], -1), t.cat([-a, b], -1)
    with t.no_grad():
        clean_out = raw(clean)
    # Hand values: dim 0 = 10a; dim 1 = b * (1 + 2) * (1 + 3) = 12b.
    assert t.allclose(clean_out, t.cat([10 * a, 12 * b], -1))
    pm = patchable_model(raw, factorized=True)
    return pm, loader_of(clean, corrupt, clean_out), clean_out


def top_edges(pm, scores, k: int) -> set[str]:
    ranked = sorted(pm.edges, key=lambda e: -abs(float(e.prune_score(scores))))
    return {e.name for e in ranked[:k]}


def assert_masks_restored(pm) -> None:
    for mask in pm.patch_masks.values():
        assert not mask.requires_grad
        assert not mask.any()


def circuit_outputs(pm, loader, edges, patch_type):
    scores = pm.circuit_prune_scores(edges=edges)
    outs = run_circuits(pm, loader, [len(edges)], scores, patch_type, show_progress=False)
    return t.cat([outs[len(edges)][batch.key] for batch in loader])


def test_planted_circuit_is_exactly_the_edges_that_matter():
    # The premise of the probing tests, checked by patching.
    pm, loader, clean_out = planted_micro()
    for patch_type in (PatchType.TREE_PATCH, PatchType.EDGE_PATCH):
        t.testing.assert_close(circuit_outputs(pm, loader, PLANTED, patch_type), clean_out)
    for edge in PLANTED:
        out = circuit_outputs(pm, loader, PLANTED - {edge}, PatchType.TREE_PATCH)
        assert (out - clean_out).abs().max() > 0.4, edge
    into_end = {"Resid Start->Resid End", "B0.0->Resid End", "B1.1->Resid End"}
    from_start = {"Resid Start->Resid End", "Resid Start->B0.0", "Resid Start->B1.1"}
    for small in (into_end, from_start):
        out = circuit_outputs(pm, loader, small, PatchType.EDGE_PATCH)
        t.testing.assert_close(out, clean_out)


@pytest.mark.parametrize("tree_optimisation", [False, True])
@pytest.mark.parametrize("faithfulness_target", ["kl_div", "mse"])
def test_subnetwork_probing_finds_the_planted_circuit(tree_optimisation, faithfulness_target):
    pm, loader, clean_out = planted_micro()
    history: list[ProbingEpoch] = []
    scores = subnetwork_probing_prune_scores(
        pm,
        loader,
        epochs=100,
        tree_optimisation=tree_optimisation,
        faithfulness_target=faithfulness_target,
        epoch_callback=history.append,
        show_progress=False,
    )
    assert top_edges(pm, scores, len(PLANTED)) == PLANTED
    assert min(float(s.min()) for s in scores.values()) == 1.0, "all scores positive"
    patch_type = PatchType.TREE_PATCH if tree_optimisation else PatchType.EDGE_PATCH
    outs = run_circuits(pm, loader, [6], scores, patch_type, show_progress=False)
    assert list(outs) == [6]
    t.testing.assert_close(t.cat([outs[6][b.key] for b in loader]), clean_out)
    assert [r.epoch for r in history] == list(range(100))
    assert history[-1].expected_circuit_size == pytest.approx(6, abs=0.5)
    assert history[-1].loss < history[0].loss
    assert_masks_restored(pm)


# The outputs of MicroModel (default weights) with every gate exactly open or closed,
# by hand: each destination then reads only patch values or only current values, so the
# output is the model's output on the prompts the patch values come from.
@pytest.mark.parametrize(
    "tree_optimisation, init_val, ablation_type, expected",
    [
        # Edge mode, corrupt input: open gates (the whole circuit) carry clean values.
        (False, 30.0, AblationType.RESAMPLE, "clean"),
        (False, -30.0, AblationType.RESAMPLE, "corrupt"),
        (False, 30.0, AblationType.TOKENWISE_MEAN_CLEAN, "mean_clean"),
        # Tree mode, clean input: circuit logit 30 keeps every edge, -30 ablates all.
        (True, 30.0, AblationType.RESAMPLE, "clean"),
        (True, -30.0, AblationType.RESAMPLE, "corrupt"),
        (True, -30.0, AblationType.ZERO, "zero"),
    ],
)
def test_probing_patches_the_documented_values(
    tree_optimisation, init_val, ablation_type, expected
):
    pm = patchable_model(MicroModel(2), factorized=True)
    gen = t.Generator().manual_seed(1)
    clean, corrupt = t.randn(8, 3, 2, generator=gen), t.randn(8, 3, 2, generator=gen)
    targets = t.randn(8, 3, 2, generator=gen)
    model = MicroModel(2)
    outputs = {
        "clean": model(clean),
        "corrupt": model(corrupt),
        "mean_clean": model(clean).mean(0, keepdim=True).expand(8, 3, 2),
        "zero": t.zeros(8, 3, 2),
    }
    want = ((outputs[expected] - targets) ** 2).mean().item()
    history: list[ProbingEpoch] = []
    loader = loader_of(clean, corrupt, targets)
    subnetwork_probing_prune_scores(
        pm,
        loader,
        learning_rate=0.0,
        epochs=1,
        init_val=init_val,
        tree_optimisation=tree_optimisation,
        faithfulness_target="mse",
        ablation_type=ablation_type,
        validation_dataloader=loader,
        epoch_callback=history.append,
        show_progress=False,
    )
    assert history[0].faithfulness == pytest.approx(want, rel=1e-5)
    # Validation uses the deterministic gates, which are also exactly 0 or 1 here.
    assert history[0].validation_faithfulness == pytest.approx(want, rel=1e-5)
    assert_masks_restored(pm)


def test_hard_concrete_circuit_probability_matches_sampling():
    # The closed form behind the penalty, against samples: P(gate > 0) (edge mode) and
    # P(gate < 1) (tree mode, logit negated) are both sigmoid(c + (2/3) * log(1.1 / 0.1)).
    gen_state = t.get_rng_state()
    t.manual_seed(0)
    for c in (-1.0, 0.0, 0.7):
        want = 1 / (1 + math.exp(-(c + 2 / 3 * math.log(11))))
        open_gates = sample_hard_concrete(t.full((200_000,), c), None)
        kept_gates = sample_hard_concrete(t.full((200_000,), -c), None)
        assert (open_gates > 0).float().mean().item() == pytest.approx(want, abs=0.005)
        assert (kept_gates < 1).float().mean().item() == pytest.approx(want, abs=0.005)
    t.set_rng_state(gen_state)


@pytest.mark.parametrize("tree_optimisation", [False, True])
def test_penalties_are_the_closed_form_expected_l0(tree_optimisation):
    pm, loader, _ = planted_micro()
    c = 0.7
    p = 1 / (1 + math.exp(-(c + 2 / 3 * math.log(11))))  # per edge, P(in circuit)
    avoid = ["B0.1->Resid End", "Resid Start->B1.0"]
    records: dict[int | None, ProbingEpoch] = {}
    for size in (None, 5):
        subnetwork_probing_prune_scores(
            pm,
            loader,
            learning_rate=0.0,
            epochs=1,
            init_val=c,
            tree_optimisation=tree_optimisation,
            avoid_edges=avoid,
            circuit_size=size,
            epoch_callback=lambda r: records.__setitem__(r.circuit_size, r),
            show_progress=False,
        )
    assert records[None].expected_circuit_size == pytest.approx(13 * p, rel=1e-5)
    assert records[None].penalty == pytest.approx(p, rel=1e-5)  # 13 * p / 13 edges
    assert records[5].penalty == pytest.approx((13 * p - 5) / 5, rel=1e-5)
    assert records[None].avoid_penalty == pytest.approx(p, rel=1e-5)
    record = records[None]
    assert record.loss == pytest.approx(
        record.faithfulness + 0.5 * record.penalty + record.avoid_penalty, rel=1e-5
    )


def test_subnetwork_probing_is_seeded_and_leaves_the_global_rng_alone():
    pm, loader, _ = planted_micro()
    kwargs = {"epochs": 5, "dropout_p": 0.1, "show_progress": False}
    state = t.get_rng_state()
    first = subnetwork_probing_prune_scores(pm, loader, seed=3, **kwargs)
    assert t.equal(t.get_rng_state(), state)
    again = subnetwork_probing_prune_scores(pm, loader, seed=3, **kwargs)
    other = subnetwork_probing_prune_scores(pm, loader, seed=4, **kwargs)
    assert all(t.equal(first[k], again[k]) for k in first)
    assert any(not t.equal(first[k], other[k]) for k in first)
    assert_masks_restored(pm)


def test_faithfulness_targets_by_hand():
    out = t.tensor([[1.0, 2.0, 0.0], [0.0, 0.5, 3.0]])
    clean = t.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    answers, wrong = t.tensor([[0], [2]]), t.tensor([[1], [0]])
    loader = loader_of(t.zeros(2, 1), t.ones(2, 1), answers, 2, wrong)
    batch = next(iter(loader))
    p, q = t.softmax(clean, -1), t.softmax(out, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert faithfulness_loss(out, batch, "kl_div", clean).item() == pytest.approx(kl.item())
    assert faithfulness_loss(out, batch, "answer", None).item() == pytest.approx(-(1 + 3) / 2)
    assert faithfulness_loss(out, batch, "wrong_answer", None).item() == pytest.approx(-1)
    # Logit differences: patched (1 - 2 + 3 - 0) / 2 = 1, clean (2 - 0 + 1 - 1) / 2 = 1.
    assert faithfulness_loss(out, batch, "logit_diff_percent", clean).item() == pytest.approx(0)
    half = out.clone()
    half[:, 0] = half[:, 1]  # patched diff (0 + 3 - 0.5) / 2 = 1.25 -> 125% -> 25
    assert faithfulness_loss(half, batch, "logit_diff_percent", clean).item() == pytest.approx(25)


def test_subnetwork_probing_argument_errors():
    pm, loader, _ = planted_micro()
    with pytest.raises(CircuitError, match="mask_fn must be 'hard_concrete' or 'sigmoid'"):
        subnetwork_probing_prune_scores(pm, loader, mask_fn=None)
    with pytest.raises(CircuitError, match="faithfulness_target must be one of"):
        subnetwork_probing_prune_scores(pm, loader, faithfulness_target="correct_percent")  # type: ignore[arg-type]
    with pytest.raises(CircuitError, match="only reported through epoch_callback"):
        subnetwork_probing_prune_scores(pm, loader, validation_dataloader=loader)
    with pytest.raises(CircuitError, match="circuit_size must be a positive"):
        subnetwork_probing_prune_scores(pm, loader, circuit_size=0)
    with pytest.raises(CircuitError, match="No source node"):
        subnetwork_probing_prune_scores(pm, loader, avoid_edges=["B9.0->Resid End"])
    assert_masks_restored(pm)


def test_circuit_probing_ranks_the_smaller_circuit_first():
    pm, loader, _ = planted_micro()
    sizes_seen: list[int | None] = []
    scores = circuit_probing_prune_scores(
        pm,
        loader,
        official_edges=PLANTED,
        epochs=100,
        circuit_sizes=["true_size", 1000],
        epoch_callback=lambda r: sizes_seen.append(r.circuit_size),
        show_progress=False,
    )
    # Run 0 (6 edges) finds the planted circuit: score 2; run 1 (1000, clipped to all 13
    # edges) adds every other edge: score 1.
    got = {e.name: float(e.prune_score(scores)) for e in pm.edges}
    assert got == {e.name: 2.0 if e.name in PLANTED else 1.0 for e in pm.edges}
    assert sizes_seen == [6] * 100 + [13] * 100
    assert_masks_restored(pm)


def test_circuit_probing_sizes():
    pm, loader, _ = planted_micro()
    # Both sizes clip to the 13 edges: one run, which keeps every edge.
    scores = circuit_probing_prune_scores(
        pm, loader, epochs=0, circuit_sizes=[1000, 13], show_progress=False
    )
    assert all(t.equal(s, t.ones_like(s)) for s in scores.values())
    with pytest.raises(CircuitError, match="official_edges is None"):
        circuit_probing_prune_scores(pm, loader, epochs=0, circuit_sizes=["true_size"])
    with pytest.raises(CircuitError, match="positive int or 'true_size'"):
        circuit_probing_prune_scores(pm, loader, epochs=0, circuit_sizes=[0])


@pytest.mark.parametrize("seq_len", [None, 3])
def test_activation_magnitude_micro_model_by_hand(seq_len):
    # MicroModel (default weights): Resid Start = x; B0.h = x * W[h];
    # resid = x + B0.0 + B0.1; B1.h = resid * W[h].
    gen = t.Generator().manual_seed(2)
    clean = t.randn(4, 3, 2, generator=gen) + 0.3
    pm = patchable_model(MicroModel(2), factorized=True, seq_len=seq_len)
    loader = loader_of(clean, -clean, t.zeros(4, 1, dtype=t.long), batch_size=2)
    w = t.tensor([[1.0, 2.0], [3.0, 4.0]])
    batch_mags = []
    for x in clean.split(2):
        b0 = [x * w[0], x * w[1]]
        resid = x + b0[0] + b0[1]
        outs = {"Resid Start": x, "B0.0": b0[0], "B0.1": b0[1]}
        outs |= {"B1.0": resid * w[0], "B1.1": resid * w[1]}
        dims = (0, 2) if seq_len else (0, 1, 2)
        batch_mags.append({k: v.mean(dims).abs() for k, v in outs.items()})
    want = {k: (batch_mags[0][k] + batch_mags[1][k]) / 2 for k in batch_mags[0]}
    scores = activation_magnitude_prune_scores(pm, loader)
    assert all(s.shape == pm.patch_masks[k].shape for k, s in scores.items())
    for edge in pm.edges:
        expected = want[edge.src.name] if seq_len is None else want[edge.src.name][edge.seq_idx]
        assert edge.prune_score(scores).item() == pytest.approx(expected.item(), rel=1e-5)


def test_activation_magnitude_transformer_against_cache():
    model = make_tl_model(n_layers=2, n_heads=2, d_model=8, d_vocab=20)
    gen = t.Generator().manual_seed(3)
    clean = t.randint(0, 20, (4, 5), generator=gen)
    # The oracle: TransformerLens' own cache, read before the model is made patchable.
    _, cache = model.run_with_cache(clean)
    outs = {"Resid Start": cache["blocks.0.hook_resid_pre"]}
    for layer in range(2):
        outs[f"MLP {layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
        z = cache[f"blocks.{layer}.attn.hook_z"]
        w_o = model.blocks[layer].attn.W_O
        for head in range(2):
            outs[f"A{layer}.{head}"] = z[:, :, head] @ w_o[head]
    want = {k: v.mean().abs().item() for k, v in outs.items()}
    pm = patchable_model(model, True, separate_qkv=True)
    scores = activation_magnitude_prune_scores(pm, loader_of(clean, clean, t.zeros(4, 1)))
    for edge in pm.edges:
        assert edge.prune_score(scores).item() == pytest.approx(want[edge.src.name], rel=1e-4)


def test_random_scores_are_seeded_and_leave_the_global_rng_alone():
    pm = patchable_model(MicroModel(2), factorized=True, seq_len=2)
    state = t.get_rng_state()
    first = random_prune_scores(pm, None, None, seed=5)
    assert t.equal(t.get_rng_state(), state)
    again, other = random_prune_scores(pm, None, None, seed=5), random_prune_scores(pm, None, None)
    assert all(t.equal(first[k], again[k]) for k in first)
    assert any(not t.equal(first[k], other[k]) for k in first)
    for name, s in first.items():
        assert s.shape == pm.patch_masks[name].shape
        assert 0 <= s.min() and s.max() < 1
    # An independent draw with the same seed, modules in sorted order.
    gen = t.Generator().manual_seed(5)
    for name in sorted(first):
        assert t.equal(first[name], t.rand(first[name].shape, generator=gen))


def test_ground_truth_scores():
    pm = patchable_model(MicroModel(2), factorized=True, seq_len=2)
    edge_at_1 = pm.edge("B0.0->B1.1", seq_idx=1)
    scores = ground_truth_prune_scores(pm, None, ["Resid Start->Resid End", edge_at_1])
    ones = {e for e in pm.edges if float(e.prune_score(scores)) == 1.0}
    others = {float(e.prune_score(scores)) for e in pm.edges if e not in ones}
    # A name covers every position; an Edge only its own.
    assert {(e.name, e.seq_idx) for e in ones} == {
        ("Resid Start->Resid End", 0),
        ("Resid Start->Resid End", 1),
        ("B0.0->B1.1", 1),
    }
    assert others == {0.0}
    with pytest.raises(CircuitError, match="needs official_edges"):
        ground_truth_prune_scores(pm, None, None)
    with pytest.raises(CircuitError, match="No source node 'B0.7'"):
        ground_truth_prune_scores(pm, None, ["B0.7->Resid End"])
    foreign = patchable_model(MicroModel(3), factorized=True, seq_len=2).edge("B2.0->Resid End", 0)
    with pytest.raises(CircuitError, match="not edges of this model's graph"):
        ground_truth_prune_scores(pm, None, [foreign])


@pytest.mark.parametrize("tree_optimisation", [False, True])
def test_sigmoid_gates_penalise_the_gate_values(tree_optimisation):
    # Sigmoid gates are deterministic: the penalty is the mean circuit degree sigmoid(c)
    # and, at c = 30 (gates exactly 1 in edge mode, 0 in tree mode), the output is clean.
    pm, loader, _ = planted_micro()
    records: list[ProbingEpoch] = []
    for c in (0.7, 30.0):
        subnetwork_probing_prune_scores(
            pm,
            loader,
            learning_rate=0.0,
            epochs=1,
            init_val=c,
            mask_fn="sigmoid",
            faithfulness_target="mse",
            tree_optimisation=tree_optimisation,
            epoch_callback=records.append,
            show_progress=False,
        )
    assert records[0].penalty == pytest.approx(1 / (1 + math.exp(-0.7)), rel=1e-5)
    assert records[1].faithfulness == pytest.approx(0.0, abs=1e-8)
