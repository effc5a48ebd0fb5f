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


# ---------------------------------------------------------------------------------------
# Metric aliases and AutoCircuit's parameter names


def micro_task(monkeypatch: pytest.MonkeyPatch, pairs=PAIRS, official=(E_IN, E_0)):
    from auto_circuit.app import tasks

    pm, loader = micro_setup(pairs)
    true_edges = {pm.edge(name) for name in official}
    task = SimpleNamespace(
        key="micro",
        name="Micro",
        model=pm,
        test_loader=loader,
        train_loader=loader,
        true_edges=true_edges,
        true_edge_count=len(true_edges),
        token_circuit=False,
    )
    monkeypatch.setitem(tasks.TASK_DICT, "micro", task)
    return task


def test_identity_and_answer_diff_percent_alias() -> None:
    from auto_circuit.metrics.prune_metrics import answer_diff, answer_diff_percent, answer_value
    from auto_circuit.metrics.prune_metrics.answer_diff_percent import answer_diff_percent_results

    from auto_circuit.algorithms.prune import run_circuits

    x = object()
    for module in (answer_diff, answer_diff_percent, answer_value):
        assert module.identity(x, 1, key=2) is x
    pm, loader = micro_setup(PAIRS)
    outs = run_circuits(pm, loader, [0, 5], pm.new_prune_scores(1.0), show_progress=False)
    got = answer_diff_percent.answer_diff_percent(pm, loader, outs, "logits", False)
    want = answer_diff_percent_results(pm, loader, outs, "logits", False)
    assert [(r.size, r.value) for r in got] == [(r.size, r.value) for r in want]
    # The full circuit (EDGE_PATCH, every edge clean) is the model: 100 %.
    assert got[-1].value == pytest.approx(100.0)
    by_name = answer_diff.measure_answer_diff(pm, test_loader=loader, circuit_outs=outs)
    assert by_name == answer_diff.measure_answer_diff(pm, loader, outs)


def test_correct_answer_percent_takes_pruned_outs() -> None:
    from auto_circuit.metrics.prune_metrics.correct_answer_percent import (
        measure_correct_ans_percent,
    )

    from auto_circuit.algorithms.prune import run_circuits

    pm, loader = micro_setup(PAIRS)
    outs = run_circuits(pm, loader, [5], pm.new_prune_scores(1.0), show_progress=False)
    # Answer 0, vocabulary of 2: correct when output[0] > output[1] = 5 c0 > 7 c1.
    by_hand = 100 * sum(5 * c[0] > 7 * c[1] for c, _ in PAIRS) / len(PAIRS)
    assert measure_correct_ans_percent(pm, loader, pruned_outs=outs) == [
        (5, pytest.approx(by_hand))
    ]
    assert measure_correct_ans_percent(pm, loader, circuit_outs=outs) == [
        (5, pytest.approx(by_hand))
    ]
    with pytest.raises(TypeError, match="pruned_outs"):
        measure_correct_ans_percent(pm, loader, outs, circuit_outs=outs)


# ---------------------------------------------------------------------------------------
# ROC, similarity, sweeps and constrained probing by task key


def test_measure_roc_task_form_and_measure_task_roc(monkeypatch: pytest.MonkeyPatch) -> None:
    from auto_circuit.metrics.official_circuits.measure_roc import measure_roc, measure_task_roc

    task = micro_task(monkeypatch)
    pm = task.model
    # Official: E_IN, E_0 (2 of 5). Ranking E_IN, A_0, E_0, then the rest tied.
    scores = pm.circuit_prune_scores(edge_dict={E_IN: 3.0, A_0: 2.0, E_0: 1.0})
    by_hand = [(0.0, 0.0), (0.0, 0.5), (1 / 3, 0.5), (1 / 3, 1.0), (1.0, 1.0)]
    assert measure_task_roc(pm, task.true_edges, scores, all_edges=True) == by_hand
    assert measure_roc(pm, task.true_edges, scores, all_edges=True) == by_hand
    assert measure_roc({"micro": {"A": scores}}, all_edges=True) == {"micro": {"A": by_hand}}
    assert measure_roc(task_prune_scores={"micro": {"A": scores}}, all_edges=True) == {
        "micro": {"A": by_hand}
    }
    with pytest.raises(TypeError, match="not both"):
        measure_roc(pm, task_prune_scores={"micro": {"A": scores}})


def test_task_prune_scores_similarities_with_true_edge_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from auto_circuit.metrics.prune_scores_similarity import (
        prune_score_similarities_plotly,
        task_prune_scores_similarities,
    )

    pm = micro_task(monkeypatch).model
    a = pm.circuit_prune_scores(edge_dict={E_IN: 5.0, E_0: 4.0, A_0: 3.0, E_1: 2.0, A_1: 1.0})
    b = pm.circuit_prune_scores(edge_dict={E_IN: 5.0, A_0: 4.0, E_0: 3.0, E_1: 2.0, A_1: 1.0})
    sims = task_prune_scores_similarities({"micro": {"a": a, "b": b}}, [3], True)
    # Top 2 (the official size): {E_IN, E_0} vs {E_IN, A_0}; top 3: identical sets.
    assert sims["micro"][2]["a"]["b"] == 0.5 and sims["micro"][3]["a"]["b"] == 1.0
    assert list(task_prune_scores_similarities({"micro": {"a": a}}, [3])["micro"]) == [3]
    fig: Any = prune_score_similarities_plotly({"micro": {"a": a, "b": b}}, [3], True)
    assert [tr.z[0][1] for tr in fig.data] == [0.5, 1.0]


def test_measure_prune_metrics_and_figs(monkeypatch: pytest.MonkeyPatch) -> None:
    from auto_circuit.metrics.prune_metrics.measure_prune_metrics import (
        default_factory,
        double_default_factory,
        measure_prune_metrics,
        measurement_figs,
    )
    from auto_circuit.metrics.prune_metrics.prune_metrics import (
        CLEAN_KL_DIV_METRIC,
        LOGIT_DIFF_METRIC,
    )

    from auto_circuit.vocabulary.types import AblationType, PatchType

    assert default_factory()["x"] == {} and double_default_factory()["x"]["y"] == {}
    pm = micro_task(monkeypatch).model
    scores = {"Random": pm.new_prune_scores(1.0)}
    got = measure_prune_metrics(
        [AblationType.RESAMPLE],
        [CLEAN_KL_DIV_METRIC, LOGIT_DIFF_METRIC],
        {"micro": scores},
        PatchType.EDGE_PATCH,
        test_edge_counts=[0, 5],
        show_progress=False,
    )
    kl = got[AblationType.RESAMPLE]["Clean KL Div"]["micro"]["Random"]
    # No edge: the corrupt run; every edge: the clean run.
    corrupt_kl = sum(
        hand_kl(hand_out(set(ALL_EDGES), c, r), hand_out(set(), c, r)) for c, r in PAIRS
    ) / len(PAIRS)
    assert kl[0] == (0, pytest.approx(corrupt_kl, rel=1e-5)) and kl[1][1] == pytest.approx(0.0)
    diff = got[AblationType.RESAMPLE]["Logit Diff"]["micro"]["Random"]
    # Logit difference of answer 0 over wrong answer 1 on the clean run: 5 c0 - 7 c1.
    assert diff[1][1] == pytest.approx(sum(5 * c[0] - 7 * c[1] for c, _ in PAIRS) / 3)
    figs = measurement_figs(got, auc_plots=False)
    assert len(figs) == 2 and figs[0].layout.annotations[0].text == "Micro"


def test_run_constrained_prune_funcs(monkeypatch: pytest.MonkeyPatch) -> None:
    from auto_circuit.metrics.avoid_edges import run_constrained_prune_funcs, top_edges

    pm = micro_task(monkeypatch).model
    official = pm.circuit_prune_scores(edge_dict={E_IN: 1.0, E_0: 1.0})
    assert {e.name for e in top_edges(pm, official, 2)} == {E_IN, E_0}
    got = run_constrained_prune_funcs(
        {"micro": {"Official Circuit": official, "Random": official}}, epochs=2
    )
    assert list(got["micro"]) == ["Constrained Circuit Probing Official Circuit"]
    ps = got["micro"]["Constrained Circuit Probing Official Circuit"]
    assert {k: v.shape for k, v in ps.items()} == {k: m.shape for k, m in pm.patch_masks.items()}


# ---------------------------------------------------------------------------------------
# Figures with AutoCircuit's parameters


def test_task_roc_plot_and_edge_patching_plot_autocircuit_forms() -> None:
    from auto_circuit.metrics.official_circuits.roc_plot import roc_plot, task_roc_plot
    from auto_circuit.metrics.prune_metrics.prune_metrics_plot import edge_patching_plot

    points = {"t": {"A": [(0.0, 0.0), (0.5, 1.0), (1.0, 1.0)]}}
    fig: Any = task_roc_plot(points)
    assert list(fig.data[1].x) == [0.0, 0.5, 1.0]
    assert (
        task_roc_plot(task_measurements=points).to_dict()
        == roc_plot(taskname_measurements=points).to_dict()
    )
    rows = [
        {"Task": "t", "Algorithm": "A", "X": 1, "Y": 0.5},
        {"Task": "t", "Algorithm": "A", "X": 2, "Y": 0.7},
    ]
    official = {"t": {"A": [(1, 0.5), (2, 0.7)], "Official": [(3, 0.9)]}}
    fig = edge_patching_plot(
        data=rows,
        task_measurements=official,
        ablation_type="RESAMPLE",
        metric_name="Logit Diff",
        log_x=False,
        log_y=False,
        y_axes_match=False,
        y_max=1.0,
        y_min=0.0,
    )
    assert [(tr.name, list(tr.x), list(tr.y)) for tr in fig.data] == [
        ("A", [1.0, 2.0], [0.5, 0.7]),
        ("Official", [3.0], [0.9]),
    ]
    assert list(fig.layout.yaxis.range) == [0.0, 1.0]
    assert fig.layout.yaxis.title.text == "Logit Diff"
    positional: Any = edge_patching_plot(rows, official, log_x=False)
    assert len(positional.data) == 2


# ---------------------------------------------------------------------------------------
# Official-circuit helpers


def test_conn_idx_to_nodes_and_sports_players_probe() -> None:
    from auto_circuit.metrics.official_circuits.circuits.greaterthan_official import (
        idx_to_nodes,
    )
    from auto_circuit.metrics.official_circuits.circuits.ioi_official import (
        CONNECTIONS,
        Conn,
    )
    from auto_circuit.metrics.official_circuits.circuits.sports_players_official import (
        sports_players_probe_true_edges,
    )
    from test_official_circuits import pythia_2_8b

    assert idx_to_nodes(5, 5, True) == ["A5.5"]
    assert idx_to_nodes(5, 5, False) == ["A5.5.Q", "A5.5.K", "A5.5.V"]
    assert idx_to_nodes(3, None, True) == idx_to_nodes(3, None, False) == ["MLP 3"]
    conn = Conn("s2 inhibition", "name mover", (("q", "end"),))
    assert conn.to_connection() in CONNECTIONS

    words = {"first_name_tok": 13, "final_name_tok": 15, "end": 19}
    model = pythia_2_8b(seq_len=7)
    edges = sports_players_probe_true_edges(model, True, words, 13)
    # Earlier name tokens (2), as in the full circuit: embedding -> MLP 0, A0.*, A1.*
    # (65); MLP 0 -> A1.* (32); A0.* -> A1.* (1024).
    earlier = 2 * (65 + 32 + 1024)
    # Final name token, MLPs up to 31 (parallel blocks): embedding -> A0.*, A1.*, MLPs
    # (64 + 32); A0.* -> A1.*, MLPs 1-31 (1024 + 32 * 31); A1.* -> MLPs 2-31 (32 * 30);
    # MLP 0 -> A1.*, MLPs 1-31 (32 + 31); MLP 1 -> MLPs 2-31 (30); MLP k -> MLP j for
    # 2 <= k < j <= 31 (30 * 29 / 2).
    final = 96 + 1024 + 992 + 960 + 63 + 30 + 435
    assert len(edges) == earlier + final
    assert not any("Resid End" in e.name or "A16.20" in e.dest.name for e in edges)
    assert {e.seq_idx for e in edges if e.name == "MLP 30->MLP 31"} == {15 - 13}
