"""AutoCircuit's evaluation surface (completeness by knockouts, AUC helpers, ROC task
form, metric aliases, official-circuit helpers) against hand computations.

The knockout oracle is the one-layer MicroModel worked out by hand: head ``i`` multiplies
its input by ``w_i`` (``[1, 2]``, ``[3, 4]``) and the output is ``input + head 0 + head
1``. In a clean run with some edges patched to the corrupt run's activations, each term
of the output is the clean or the corrupt value of its path.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch as t

from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.evaluation.area_under_curve import (
    algo_measurements_auc,
    metric_measurements_auc,
    task_measurements_auc,
)
from auto_circuit.evaluation.completeness_metrics.knockouts import (
    knockout_kl_divs,
    learn_knockouts,
)
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError

W0, W1 = [1.0, 2.0], [3.0, 4.0]
E_IN, E_0, A_0, E_1, A_1 = (
    "Resid Start->Resid End",
    "B0.0->Resid End",
    "Resid Start->B0.0",
    "B0.1->Resid End",
    "Resid Start->B0.1",
)
ALL_EDGES = (E_IN, E_0, A_0, E_1, A_1)


def hand_out(kept: set[str], c: list[float], r: list[float]) -> list[float]:
    """The one-layer MicroModel's output on clean ``c`` with the edges not in ``kept``
    patched to their values on corrupt ``r``."""
    out = []
    for j in range(2):
        head0_in = c[j] if A_0 in kept else r[j]
        head1_in = c[j] if A_1 in kept else r[j]
        x = c[j] if E_IN in kept else r[j]
        x += (head0_in if E_0 in kept else r[j]) * W0[j]
        x += (head1_in if E_1 in kept else r[j]) * W1[j]
        out.append(x)
    return out


def hand_kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q))."""
    mp, mq = max(p_logits), max(q_logits)
    zp = mp + math.log(sum(math.exp(v - mp) for v in p_logits))
    zq = mq + math.log(sum(math.exp(v - mq) for v in q_logits))
    pairs = zip(p_logits, q_logits, strict=True)
    return sum(math.exp(a - zp) * ((a - zp) - (b - zq)) for a, b in pairs)


def hand_knockout_kls(
    circuit: set[str], knockouts: set[str], pairs: list[tuple[list[float], list[float]]]
) -> tuple[float, float]:
    """(KL(model || circuit), KL(model - K || circuit - K)), averaged over prompts."""
    kl = ko_kl = 0.0
    for c, r in pairs:
        kl += hand_kl(hand_out(set(ALL_EDGES), c, r), hand_out(circuit, c, r))
        ko_model = hand_out(set(ALL_EDGES) - knockouts, c, r)
        ko_kl += hand_kl(ko_model, hand_out(circuit - knockouts, c, r))
    return kl / len(pairs), ko_kl / len(pairs)


def micro_setup(pairs: list[tuple[list[float], list[float]]], batch_size: int = 2):
    pm = patchable_model(MicroModel(n_layers=1), factorized=True, slice_output=None)
    clean = t.tensor([[c] for c, _ in pairs])
    corrupt = t.tensor([[r] for _, r in pairs])
    answers = t.zeros(len(pairs), 1, dtype=t.long)
    dataset = PromptDataset(clean, corrupt, answers, answers + 1)
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch_size)
    return pm, loader


PAIRS = [([0.3, 0.1], [-0.2, 0.2]), ([0.2, -0.1], [0.1, 0.3]), ([-0.4, 0.5], [0.3, -0.2])]


# ---------------------------------------------------------------------------------------
# Same under knockouts


@pytest.mark.parametrize(
    ("circuit", "knockouts"),
    [
        ({E_IN, E_0, A_0}, {E_0}),
        ({E_IN, E_0, A_0}, set()),
        ({E_IN, E_0, A_0, E_1}, {E_IN, A_0}),
        (set(ALL_EDGES), {E_1}),
    ],
)
def test_same_under_knockout_by_hand(circuit: set[str], knockouts: set[str]) -> None:
    pm, loader = micro_setup(PAIRS, batch_size=2)  # batches of 2 and 1
    ranks = {name: float(10 - i) for i, name in enumerate(sorted(circuit))}
    circuit_ps = pm.circuit_prune_scores(edge_dict=ranks)
    knockout_ps = pm.new_prune_scores(-0.5)  # below the threshold 0 except knockouts
    for name in knockouts:
        e = pm.edge(name)
        knockout_ps[e.dest.module_name][e.patch_idx] = 2.0
    before = {k: v.detach().clone() for k, v in pm.patch_masks.items()}
    size, n_knockouts, kl, ko_kl = knockout_kl_divs(
        pm, loader, circuit_ps, knockout_ps, len(circuit)
    )
    want_kl, want_ko_kl = hand_knockout_kls(circuit, knockouts, PAIRS)
    assert (size, n_knockouts) == (len(circuit), len(knockouts))
    assert kl == pytest.approx(want_kl, rel=1e-5, abs=1e-7)
    assert ko_kl == pytest.approx(want_ko_kl, rel=1e-5, abs=1e-7)
    assert all(t.equal(before[k], v) for k, v in pm.patch_masks.items()), "masks restored"


def test_knockouts_outside_the_circuit_are_ignored_and_a_full_circuit_is_complete() -> None:
    pm, loader = micro_setup(PAIRS)
    every = pm.new_prune_scores(1.0)
    score = knockout_kl_divs(pm, loader, every, every, len(ALL_EDGES))
    assert (score.n_knockouts, score.kl, score.knockout_kl) == (5, 0.0, 0.0)
    circuit_ps = pm.circuit_prune_scores(edge_dict={E_IN: 1.0})
    score = knockout_kl_divs(pm, loader, circuit_ps, every, 1, knockout_threshold=0.5)
    assert score.n_knockouts == 1  # only E_IN is in the circuit
    with pytest.raises(CircuitError, match="circuit_size"):
        knockout_kl_divs(pm, loader, circuit_ps, every, 0)


# Clean and corrupt inputs where knocking out Resid Start->Resid End separates the
# circuit (which lacks Resid Start->B0.1) from the model most: checked by brute force.
LEARN_PAIRS = [([3.1, 1.6], [-3.8, -2.8])]
LEARN_CIRCUIT = {E_IN, E_0, A_0, E_1}


def test_learn_knockouts_oracle_is_one_edge() -> None:
    results = {
        knockouts: hand_knockout_kls(LEARN_CIRCUIT, set(knockouts), LEARN_PAIRS)[1]
        for n in range(3)
        for knockouts in itertools.combinations(sorted(LEARN_CIRCUIT), n)
    }
    best = max(results, key=lambda k: results[k])
    assert best == (E_IN,)
    assert results[best] > 2.5 * max(v for k, v in results.items() if k != best)


@pytest.mark.parametrize("mask_fn", ["hard_concrete", "sigmoid"])
def test_learn_knockouts_finds_the_edge_whose_knockout_matters(mask_fn: Any) -> None:
    pm, loader = micro_setup(LEARN_PAIRS, batch_size=1)
    ranks = {name: float(10 - i) for i, name in enumerate(sorted(LEARN_CIRCUIT))}
    circuit_ps = pm.circuit_prune_scores(edge_dict=ranks)
    steps: list[Any] = []
    learnt = learn_knockouts(
        pm,
        loader,
        circuit_ps,
        len(LEARN_CIRCUIT),
        learning_rate=0.1,
        epochs=150,
        regularize_lambda=1.0,
        mask_fn=mask_fn,
        step_callback=steps.append,
    )
    logits = {
        name: float(learnt[pm.edge(name).dest.module_name][pm.edge(name).patch_idx])
        for name in ALL_EDGES
    }
    assert logits[A_1] == float("-inf"), "outside the circuit: never a knockout"
    assert max(LEARN_CIRCUIT, key=lambda n: logits[n]) == E_IN
    assert logits[E_IN] > 0  # knocked out at threshold 0
    assert len(steps) == 150 and steps[-1].faithfulness < steps[0].faithfulness
    assert not any(m.any() for m in pm.patch_masks.values()), "masks restored"
    score = knockout_kl_divs(pm, loader, circuit_ps, learnt, len(LEARN_CIRCUIT))
    assert score.n_knockouts >= 1


def test_autocircuit_task_forms_of_same_under_knockouts(monkeypatch: pytest.MonkeyPatch) -> None:
    from auto_circuit.metrics.completeness_metrics.same_under_knockouts import (
        measure_same_under_knockouts,
        same_under_knockout,
        same_under_knockouts_fig,
    )
    from auto_circuit.metrics.completeness_metrics.train_same_under_knockouts import (
        train_same_under_knockouts,
    )

    from auto_circuit.app import tasks

    pm, loader = micro_setup(PAIRS)
    circuit = {E_IN, E_0, A_0}
    task = SimpleNamespace(
        key="micro", name="Micro", model=pm, test_loader=loader, true_edge_count=3
    )
    monkeypatch.setitem(tasks.TASK_DICT, "micro", task)
    circuit_ps = pm.circuit_prune_scores(edge_dict={n: 2.0 for n in circuit})
    knockout_ps = pm.circuit_prune_scores(edge_dict={E_0: 1.0})
    knockout_ps = {k: v - 0.5 for k, v in knockout_ps.items()}
    ((size, n_knockouts, kl, ko_kl),) = same_under_knockout(task, circuit_ps, knockout_ps, 3)
    assert (size, n_knockouts) == (3, 1)
    assert (kl, ko_kl) == pytest.approx(hand_knockout_kls(circuit, {E_0}, PAIRS), rel=1e-5)
    measured = measure_same_under_knockouts(
        {"micro": {"Random": circuit_ps}}, {"micro": {"Random": knockout_ps}}
    )
    assert list(measured["micro"]["Random"][0]) == [size, n_knockouts, kl, ko_kl]
    fig: Any = same_under_knockouts_fig(measured)
    assert fig.layout.annotations[0].text == "Micro"
    learnt = train_same_under_knockouts(
        {"micro": {"A": circuit_ps, "B": circuit_ps}}, ["A"], 0.1, 2, 1.0
    )
    assert list(learnt["micro"]) == ["A"]


# ---------------------------------------------------------------------------------------
# Areas under curves


def test_auc_helpers_are_trapezoids_by_hand() -> None:
    curve = [(0, 1.0), (2, 3.0), (5, 2.0)]
    # (2 - 0) * (1 + 3) / 2 + (5 - 2) * (3 + 2) / 2
    by_hand = 4.0 + 7.5
    algos = {"A": curve, "B": [(0, 0.0), (1, 1.0)], "Official": [(3, 1.0)]}
    assert algo_measurements_auc(algos, False, False) == {"A": by_hand, "B": 0.5}
    # log x: the point at 0 is dropped; (log10 5 - log10 2) * (3 + 2) / 2.
    log_auc = algo_measurements_auc({"A": curve}, True, False)["A"]
    assert log_auc == pytest.approx((math.log10(5) - math.log10(2)) * 2.5)
    tasks = {"t1": algos, "t2": {"A": curve}}
    assert task_measurements_auc(tasks, False, False) == {
        "t1": {"A": by_hand, "B": 0.5},
        "t2": {"A": by_hand},
    }
    assert metric_measurements_auc({"m": tasks}, False, False)["m"]["t2"] == {"A": by_hand}


def test_average_auc_plot_inverse() -> None:
    from auto_circuit.metrics.area_under_curve import average_auc_plot

    data = {"t": {"Random": [(0, 1.0), (1, 1.0)], "A": [(0, 0.5), (1, 0.5)]}}
    (bar,) = average_auc_plot(data, False, False, None, False).data
    assert dict(zip(bar.y, bar.x, strict=True)) == {"A": 0.5, "Random": 1.0}
    (bar,) = average_auc_plot(data, False, False, None, True).data
    assert dict(zip(bar.y, bar.x, strict=True)) == {"A": 1.5, "Random": 1.0}
