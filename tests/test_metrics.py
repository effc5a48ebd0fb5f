"""Circuit metrics, ROC, AUC, MIB's CPR/CMD and top-k overlap against hand computations.

Metric oracles are written with plain Python floats (``math.exp``/``math.log``) on small
tables of logits, independently of the torch code under test. A ``TableModel`` returns
fixed logits for each prompt id, so the model's reference outputs are known by hand.
"""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
import shape_checks
import torch as t
from conftest import make_tl_model

from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import patch_mode, patchable_model
from auto_circuit.evaluation.area_under_curve import average_auc, measurements_auc, normalised_aucs
from auto_circuit.evaluation.mib_faithfulness import (
    MIB_EDGE_FRACTIONS,
    faithfulness_curve,
    measure_mib_scores,
    mib_edge_counts,
    mib_scores,
)
from auto_circuit.evaluation.official_circuits.measure_roc import (
    measure_roc,
    measure_roc_auc,
    roc_auc,
)
from auto_circuit.evaluation.prune_metrics.answer_diff import (
    answer_diff_results,
    measure_answer_diff,
)
from auto_circuit.evaluation.prune_metrics.answer_diff_percent import answer_diff_percent_results
from auto_circuit.evaluation.prune_metrics.answer_value import answer_value_results
from auto_circuit.evaluation.prune_metrics.correct_answer_percent import (
    correct_answer_percent_results,
)
from auto_circuit.evaluation.prune_metrics.kl_div import kl_div_results, measure_kl_div
from auto_circuit.evaluation.prune_metrics.metric_result import MetricResult
from auto_circuit.evaluation.prune_metrics.prune_metrics import (
    PRUNE_METRIC_DICT,
    PruneMetric,
    prune_metric,
)
from auto_circuit.evaluation.prune_scores_similarity import prune_score_similarities
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, PatchType

# ---------------------------------------------------------------------------------------
# A model whose outputs are a table: prompt [i] -> TABLE[i]


class TableModel(t.nn.Module):
    """Returns ``table[prompt[:, 0]]``: fixed logits per prompt id."""

    def __init__(self, table: t.Tensor):
        super().__init__()
        self.table = table
        self.out_slice = (slice(None),)

    def forward(self, x: t.Tensor) -> t.Tensor:
        return self.table[x[:, 0]]


def table_loader(n: int, answers: Any, wrong: Any, batch_size: int) -> PromptDataLoader:
    """Prompts 0..n-1 (clean) and n..2n-1 (corrupt), one token each."""
    clean = t.arange(n).unsqueeze(1)
    dataset = PromptDataset(clean, clean + n, answers, wrong)
    return PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch_size)


def outs_by_batch(loader: PromptDataLoader, rows_by_size: dict[int, t.Tensor]) -> Any:
    """CircuitOutputs whose size-k outputs for prompt i are ``rows_by_size[k][i]``."""
    outs: dict[int, dict[int, t.Tensor]] = {k: {} for k in rows_by_size}
    start = 0
    for batch in loader:
        n = batch.clean.shape[0]
        for k, rows in rows_by_size.items():
            outs[k][batch.key] = rows[start : start + n]
        start += n
    return outs


def softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# Three prompts, vocab 5. Circuit logits (size 7) and the model's clean/corrupt logits.
CIRCUIT = [[1.0, 2.0, 0.5, -1.0, 3.0], [0.0, 0.0, 4.0, 1.0, -2.0], [2.0, -1.0, 1.0, 1.0, 0.0]]
CLEAN = [[2.0, 1.0, 0.0, -1.0, 1.0], [0.5, 0.0, 3.0, 1.0, 0.0], [3.0, -2.0, 1.0, 0.0, 0.5]]
CORRUPT = [[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, 0.0, 1.0, 0.0, -1.0]]
STACKED_ANSWERS = t.tensor([[0, 4], [2, 3], [0, 2]])
STACKED_WRONG = t.tensor([[1, 2], [0, 1], [1, 4]])
# Different numbers of answers per prompt: the loader gives lists.
LIST_ANSWERS = [t.tensor([0, 4, 1]), t.tensor([2]), t.tensor([0, 2])]
LIST_WRONG = [t.tensor([2]), t.tensor([0, 1, 4]), t.tensor([1])]


def table_setup(answers: Any, wrong: Any, batch_size: int = 2):
    table = t.tensor(CLEAN + CORRUPT)
    model = cast(Any, TableModel(table))
    loader = table_loader(3, answers, wrong, batch_size)
    outs = outs_by_batch(loader, {0: t.tensor(CORRUPT), 7: t.tensor(CIRCUIT)})
    return model, loader, outs


def ids(a: Any, i: int) -> list[int]:
    return a[i].tolist()


ANSWER_CASES = [(STACKED_ANSWERS, STACKED_WRONG), (LIST_ANSWERS, LIST_WRONG)]


def hand_answer_value(logits: list[float], answer_ids: list[int], prob_func: str) -> float:
    if prob_func == "softmax":
        vals = softmax(logits)
    elif prob_func == "log_softmax":
        vals = [math.log(p) for p in softmax(logits)]
    else:
        vals = logits
    return mean([vals[a] for a in answer_ids])


# ---------------------------------------------------------------------------------------
# Answer metrics by hand


@pytest.mark.parametrize("answers, wrong", ANSWER_CASES)
@pytest.mark.parametrize("prob_func", ["logits", "softmax", "log_softmax"])
@pytest.mark.parametrize("wrong_answer", [False, True])
def test_answer_value_by_hand(answers, wrong, prob_func, wrong_answer):
    model, loader, outs = table_setup(answers, wrong)
    results = answer_value_results(model, loader, outs, prob_func, wrong_answer)
    read = wrong if wrong_answer else answers
    for result, rows in zip(results, [CORRUPT, CIRCUIT], strict=True):
        expected = [hand_answer_value(rows[i], ids(read, i), prob_func) for i in range(3)]
        assert result.per_prompt.tolist() == pytest.approx(expected, rel=1e-5)
        assert result.value == pytest.approx(mean(expected), rel=1e-5)
    assert [r.size for r in results] == [0, 7]


@pytest.mark.parametrize("answers, wrong", ANSWER_CASES)
@pytest.mark.parametrize("prob_func", ["logits", "softmax", "log_softmax"])
def test_answer_diff_by_hand(answers, wrong, prob_func):
    model, loader, outs = table_setup(answers, wrong)
    diffs = [
        hand_answer_value(CIRCUIT[i], ids(answers, i), prob_func)
        - hand_answer_value(CIRCUIT[i], ids(wrong, i), prob_func)
        for i in range(3)
    ]
    result = answer_diff_results(model, loader, outs, prob_func)[1]
    assert result.per_prompt.tolist() == pytest.approx(diffs, rel=1e-5)
    assert measure_answer_diff(model, loader, outs, prob_func)[1] == (
        7,
        pytest.approx(mean(diffs), rel=1e-5),
    )


@pytest.mark.parametrize("answers, wrong", ANSWER_CASES)
def test_answer_diff_percent_ratio_of_means_and_mean_of_ratios(answers, wrong):
    model, loader, outs = table_setup(answers, wrong)

    def diff(rows: list[list[float]], i: int) -> float:
        return mean([rows[i][a] for a in ids(answers, i)]) - mean(
            [rows[i][a] for a in ids(wrong, i)]
        )

    circuit = [diff(CIRCUIT, i) for i in range(3)]
    model_diff = [diff(CLEAN, i) for i in range(3)]  # the model on the clean prompts
    ratio_of_means = answer_diff_percent_results(model, loader, outs, diff_of_means=True)[1]
    assert ratio_of_means.value == pytest.approx(100 * mean(circuit) / mean(model_diff))
    assert ratio_of_means.per_prompt.tolist() == pytest.approx(
        [100 * c / mean(model_diff) for c in circuit]
    )
    mean_of_ratios = answer_diff_percent_results(model, loader, outs, diff_of_means=False)[1]
    ratios = [100 * c / m for c, m in zip(circuit, model_diff, strict=True)]
    assert mean_of_ratios.value == pytest.approx(mean(ratios))
    std = math.sqrt(sum((r - mean(ratios)) ** 2 for r in ratios) / 2)
    assert mean_of_ratios.std == pytest.approx(std)


def test_correct_answer_percent_by_hand_with_ties_and_multiple_answers():
    circuit = [
        [1.0, 2.0, 0.5, -1.0, 3.0],  # answers {0,4}: best 3.0 beats all others -> correct
        [0.0, 0.0, 4.0, 4.0, -2.0],  # answers {2}: ties with token 3 -> wrong
        [2.0, -1.0, 1.0, 5.0, 0.0],  # answers {0,2}: token 3 (5.0) wins -> wrong
    ]
    answers = [t.tensor([0, 4]), t.tensor([2]), t.tensor([0, 2])]
    wrong = [t.tensor([1, 2]), t.tensor([0, 1]), t.tensor([1, 4])]
    model = cast(Any, TableModel(t.tensor(CLEAN + CORRUPT)))
    loader = table_loader(3, answers, wrong, batch_size=3)
    outs = outs_by_batch(loader, {1: t.tensor(circuit)})
    vocab = correct_answer_percent_results(model, loader, outs, False)[0]
    assert vocab.per_prompt.tolist() == [100.0, 0.0, 0.0]
    assert vocab.value == pytest.approx(100 / 3)
    # Against the wrong answers only: 3.0 > {2.0, 0.5}; 4.0 > {0.0, 0.0}; 2.0 > {-1.0, 0.0}.
    vs_wrong = correct_answer_percent_results(model, loader, outs, True)[0]
    assert vs_wrong.per_prompt.tolist() == [100.0, 100.0, 100.0]


# ---------------------------------------------------------------------------------------
# KL divergence by hand


def hand_kl(p_logits: list[float], q_logits: list[float]) -> float:
    p, q = softmax(p_logits), softmax(q_logits)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


@pytest.mark.parametrize("compare_to_clean", [True, False])
def test_kl_div_by_hand(compare_to_clean):
    model, loader, outs = table_setup(STACKED_ANSWERS, STACKED_WRONG)
    target = CLEAN if compare_to_clean else CORRUPT
    results = kl_div_results(model, loader, outs, compare_to_clean)
    for result, rows in zip(results, [CORRUPT, CIRCUIT], strict=True):
        expected = [hand_kl(target[i], rows[i]) for i in range(3)]
        assert result.per_prompt.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert result.value == pytest.approx(mean(expected), rel=1e-5, abs=1e-7)
    if not compare_to_clean:
        assert results[0].value == 0.0  # the empty circuit is the corrupt model


def test_kl_div_averages_over_positions_and_is_stable_for_extreme_logits():
    # Two prompts, two positions each, vocab 3; logits of +-1000 underflow a softmax.
    clean = t.tensor(
        [[[1000.0, 0.0, -1000.0], [0.0, 1.0, 2.0]], [[0.0, 0.0, 0.0], [3.0, 1.0, 0.0]]]
    )
    circuit = t.tensor(
        [[[0.0, 1000.0, -1000.0], [2.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [3.0, 1.0, 0.0]]]
    )
    model = cast(Any, TableModel(t.cat([clean, clean])))
    loader = table_loader(2, t.zeros(2, 1, dtype=t.long), t.ones(2, 1, dtype=t.long), 1)
    outs = outs_by_batch(loader, {3: circuit})
    (result,) = kl_div_results(model, loader, outs)
    # Position 0 of prompt 0: p puts all mass on token 0, q gives it log-prob -1000.
    expected_00 = 1000.0
    per_pos = [
        [expected_00, hand_kl([0.0, 1.0, 2.0], [2.0, 1.0, 0.0])],
        [hand_kl([0.0, 0.0, 0.0], [1.0, 0.0, 0.0]), 0.0],
    ]
    assert result.per_prompt.tolist() == pytest.approx([mean(r) for r in per_pos], rel=1e-5)
    assert result.value == pytest.approx(mean([v for r in per_pos for v in r]), rel=1e-5)
    assert math.isfinite(result.value)


class CountingTableModel(TableModel):
    def __init__(self, table: t.Tensor):
        super().__init__(table)
        self.calls = 0

    def forward(self, x: t.Tensor) -> t.Tensor:
        self.calls += 1
        return super().forward(x)


def test_reference_forward_runs_once_per_batch_and_half_outputs_are_promoted():
    counting = CountingTableModel(t.tensor(CLEAN + CORRUPT))
    loader = table_loader(3, STACKED_ANSWERS, STACKED_WRONG, batch_size=2)  # 2 batches
    rows = {k: t.tensor(CIRCUIT, dtype=t.float16) for k in (1, 2, 3, 4)}
    results = kl_div_results(cast(Any, counting), loader, outs_by_batch(loader, rows))
    assert counting.calls == 2  # not once per circuit size
    expected = mean([hand_kl(CLEAN[i], CIRCUIT[i]) for i in range(3)])
    assert all(r.value == pytest.approx(expected, rel=1e-3) for r in results)
    assert all(r.per_prompt.dtype == t.float32 for r in results)


def test_metric_result_summaries():
    result = MetricResult(size=3, value=2.0, per_prompt=t.tensor([1.0, 4.0, 1.0]))
    assert (result.min, result.max, result.n_prompts) == (1.0, 4.0, 3)
    assert result.std == pytest.approx(math.sqrt(3.0))
    assert result.worst(lower_better=True).tolist() == [1]
    assert result.worst(lower_better=False, n=2).tolist()[0] in (0, 2)
    with shape_checks.off(), pytest.raises(CircuitError, match="1-D"):
        MetricResult(size=0, value=0.0, per_prompt=t.zeros(2, 2))


def test_metric_errors():
    model, loader, outs = table_setup(STACKED_ANSWERS, STACKED_WRONG)
    with pytest.raises(CircuitError, match="no outputs for batch key"):
        answer_diff_results(model, loader, {0: {}})
    with pytest.raises(CircuitError, match="circuit_outs is empty"):
        answer_diff_results(model, loader, {})
    bad_loader = table_loader(3, t.tensor([[0], [9], [1]]), STACKED_WRONG, 3)
    bad_outs = outs_by_batch(bad_loader, {0: t.tensor(CIRCUIT)})
    with pytest.raises(CircuitError, match=r"token ids in \[0, 5\)"):
        answer_diff_results(model, bad_loader, bad_outs)
    with pytest.raises(CircuitError, match="prob_func"):
        answer_value_results(model, loader, outs, prob_func=cast(Any, "probs"))


# ---------------------------------------------------------------------------------------
# Registry


def test_registry_validates_in_post_init_and_lists_keys():
    assert "Logit Diff" in PRUNE_METRIC_DICT and "Clean KL Div" in PRUNE_METRIC_DICT
    assert all(key == metric.key for key, metric in PRUNE_METRIC_DICT.items())
    with pytest.raises(CircuitError, match="log_y=True needs y_min"):
        PruneMetric("k", "K", measure_kl_div, log_y=True)
    with pytest.raises(CircuitError, match="non-empty"):
        PruneMetric("", "K", measure_kl_div)
    with pytest.raises(CircuitError, match="Did you mean 'Logit Diff'"):
        prune_metric("Logit Dif")


def test_registry_metric_func_matches_its_results():
    model, loader, outs = table_setup(LIST_ANSWERS, LIST_WRONG)
    for metric in PRUNE_METRIC_DICT.values():
        results = metric.results(model, loader, outs)
        assert metric.metric_func(model, loader, outs) == [(r.size, r.value) for r in results]


# ---------------------------------------------------------------------------------------
# Empty and full circuits of a real model reproduce the model


def tl_loader(multi: bool):
    gen = t.Generator().manual_seed(1)
    clean = t.randint(0, 50, (6, 5), generator=gen)
    corrupt = t.randint(0, 50, (6, 5), generator=gen)
    # Answers in [0, 25), wrong answers in [25, 50): no prompt has a zero difference.
    if multi:
        answers: Any = [t.randint(0, 25, (1 + i % 3,), generator=gen) for i in range(6)]
        wrong: Any = t.randint(25, 50, (6, 2), generator=gen)
    else:
        answers = t.randint(0, 25, (6, 1), generator=gen)
        wrong = t.randint(25, 50, (6, 1), generator=gen)
    dataset = PromptDataset(clean, corrupt, answers, wrong)
    return PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=3), clean, corrupt


@pytest.mark.parametrize("multi", [False, True])
def test_empty_and_full_edge_patch_circuits_give_corrupt_and_clean_metric_values(multi):
    loader, clean, corrupt = tl_loader(multi)
    raw = make_tl_model()
    clean_out, corrupt_out = raw(clean)[:, -1].detach(), raw(corrupt)[:, -1].detach()
    pm = patchable_model(raw, True, slice_output="last_seq", separate_qkv=True)
    scores = {
        k: t.rand(v.shape, generator=t.Generator().manual_seed(2)) + 0.1
        for k, v in pm.patch_masks.items()
    }
    outs = run_circuits(
        pm, loader, [0, pm.n_edges], scores, PatchType.EDGE_PATCH, AblationType.RESAMPLE
    )
    direct = outs_by_batch(loader, {0: corrupt_out, pm.n_edges: clean_out})
    for metric in PRUNE_METRIC_DICT.values():
        got = metric.metric_func(pm, loader, outs)
        expected = metric.metric_func(pm, loader, direct)
        assert [x for x, _ in got] == [0, pm.n_edges]
        for (_, g), (_, e) in zip(got, expected, strict=True):
            assert g == pytest.approx(e, rel=1e-3, abs=1e-4), metric.key
    # The full circuit is the clean model, the empty one the corrupt model.
    clean_kl = dict(PRUNE_METRIC_DICT["Clean KL Div"].metric_func(pm, loader, outs))
    corrupt_kl = dict(PRUNE_METRIC_DICT["Corrupt KL Div"].metric_func(pm, loader, outs))
    assert clean_kl[pm.n_edges] < 1e-5 and corrupt_kl[0] < 1e-5
    assert clean_kl[0] > 1e-3
    expected_kl = mean([hand_kl(clean_out[i].tolist(), corrupt_out[i].tolist()) for i in range(6)])
    assert clean_kl[0] == pytest.approx(expected_kl, rel=1e-4)
    percent = dict(PRUNE_METRIC_DICT["Logit Diff Percent"].metric_func(pm, loader, outs))
    assert percent[pm.n_edges] == pytest.approx(100.0, rel=1e-4)


def test_metrics_refuse_to_run_in_patch_mode():
    loader, _, _ = tl_loader(False)
    pm = patchable_model(make_tl_model(), True, slice_output="last_seq", separate_qkv=True)
    scores = pm.new_prune_scores(1.0)
    outs = run_circuits(pm, loader, [0], scores, show_progress=False)
    patch = t.zeros(len(pm.srcs), 1, 1, pm.cfg.d_model)
    with patch_mode(pm, patch), pytest.raises(CircuitError, match="outside the patch_mode"):
        kl_div_results(pm, loader, outs)


# ---------------------------------------------------------------------------------------
# ROC against an official circuit


@pytest.fixture(scope="module")
def roc_model():
    # Per-position graph: 5 positions x the factorized edges of a 2-layer model.
    return patchable_model(make_tl_model(n_layers=2), True, seq_len=5, separate_qkv=True)


def official_subset(pm, frac: float, seed: int):
    edges = sorted(pm.edges, key=lambda e: (e.seq_idx, e.name))
    gen = t.Generator().manual_seed(seed)
    keep = t.rand(len(edges), generator=gen) < frac
    return edges, {e for e, k in zip(edges, keep.tolist(), strict=True) if k}


def scores_from(pm, edges, values: t.Tensor):
    return pm.circuit_prune_scores(
        edge_dict={e: float(v) for e, v in zip(edges, values.tolist(), strict=True)}
    )


def mann_whitney_auc(edges, official, values: t.Tensor) -> float:
    """P(official edge's |score| > another's), ties counted 1/2: an independent oracle."""
    is_pos = t.tensor([e in official for e in edges])
    pos, neg = values.abs()[is_pos].double(), values.abs()[~is_pos].double()
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + ties / 2)


def test_roc_perfect_reversed_and_tied(roc_model):
    pm = roc_model
    edges, official = official_subset(pm, 0.1, seed=0)
    is_official = t.tensor([float(e in official) for e in edges])
    noise = t.rand(len(edges), generator=t.Generator().manual_seed(1))
    perfect = scores_from(pm, edges, noise + 2 * is_official)
    reversed_ = scores_from(pm, edges, noise + 2 * (1 - is_official))
    assert measure_roc_auc(pm, official, perfect) == pytest.approx(1.0)
    assert measure_roc_auc(pm, official, reversed_) == pytest.approx(0.0)
    points = measure_roc(pm, official, perfect, all_edges=True)
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    assert (0.0, 1.0) in points  # every official edge before any other
    # All scores tied: one step from (0, 0) to (1, 1).
    tied = pm.new_prune_scores(1.0)
    assert measure_roc(pm, official, tied, all_edges=True) == [(0.0, 0.0), (1.0, 1.0)]
    assert measure_roc_auc(pm, official, tied) == pytest.approx(0.5)


def test_roc_auc_equals_mann_whitney_with_ties(roc_model):
    pm = roc_model
    edges, official = official_subset(pm, 0.2, seed=3)
    # Scores from {0, ..., 9}: many ties, signed (ROC ranks |score|).
    values = t.randint(-9, 10, (len(edges),), generator=t.Generator().manual_seed(4)).float()
    scores = scores_from(pm, edges, values)
    assert measure_roc_auc(pm, official, scores) == pytest.approx(
        mann_whitney_auc(edges, official, values), abs=1e-6
    )
    # Brute-force ROC: one point per distinct |score| threshold.
    n_pos, n_neg = len(official), len(edges) - len(official)
    brute = [(0.0, 0.0)]
    for thr in sorted(set(values.abs().tolist()), reverse=True):
        chosen = [e for e, v in zip(edges, values.abs().tolist(), strict=True) if v >= thr]
        tp = sum(e in official for e in chosen)
        brute.append(((len(chosen) - tp) / n_neg, tp / n_pos))
    got = measure_roc(pm, official, scores, all_edges=True)
    assert len(got) == len(brute)
    for point, expected in zip(got, brute, strict=True):
        assert point == pytest.approx(expected)
    coarse = measure_roc(pm, official, scores, all_edges=False, test_edge_counts=[0.1, 0.5])
    assert set(coarse) <= set(measure_roc(pm, official, scores, all_edges=True))


def test_roc_random_scores_average_half(roc_model):
    pm = roc_model
    edges, official = official_subset(pm, 0.3, seed=5)
    n_pos, n_neg = len(official), len(edges) - len(official)
    aucs = []
    for seed in range(20):
        values = t.rand(len(edges), generator=t.Generator().manual_seed(100 + seed))
        aucs.append(measure_roc_auc(pm, official, scores_from(pm, edges, values)))
    # Under a random ranking the AUC (Mann-Whitney U / (P N)) has mean 1/2 and standard
    # deviation sqrt((P + N + 1) / (12 P N)); the mean of 20 runs has sd / sqrt(20).
    sd = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    assert sd < 0.03, "graph too small for a tight test"
    assert mean(aucs) == pytest.approx(0.5, abs=5 * sd / math.sqrt(20))
    assert all(abs(a - 0.5) < 5 * sd for a in aucs)


def test_roc_official_edges_by_name_cover_every_position(roc_model):
    pm = roc_model
    name = "A0.1->MLP 1"
    by_edges = {pm.edge(name, pos) for pos in range(5)}
    values = t.rand(pm.n_edges, generator=t.Generator().manual_seed(6))
    edges = sorted(pm.edges, key=lambda e: (e.seq_idx, e.name))
    scores = scores_from(pm, edges, values)
    assert measure_roc(pm, [name], scores, all_edges=True) == measure_roc(
        pm, by_edges, scores, all_edges=True
    )
    with pytest.raises(CircuitError, match="Did you mean"):
        measure_roc(pm, ["A0.1->MLP 9"], scores)
    with pytest.raises(CircuitError, match="empty"):
        measure_roc(pm, [], scores)


def test_roc_auc_trapezoid_by_hand():
    assert roc_auc([(0.0, 0.0), (0.5, 1.0), (1.0, 1.0)]) == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------
# Area under the curve


def test_measurements_auc_by_hand():
    assert measurements_auc([(2, 1.0), (0, 0.0), (1, 1.0)]) == pytest.approx(1.5)
    # Linear y measured from the floor y_min.
    assert measurements_auc([(0, 3.0), (2, 5.0)], y_min=1.0) == pytest.approx(6.0)
    # log_x: the point at 0 is dropped; x' = 0, 1, 2.
    points = [(0, 5.0), (1, 1.0), (10, 2.0), (100, 2.0)]
    assert measurements_auc(points, log_x=True) == pytest.approx(1.5 + 2.0)
    # log_y: heights 9e-3 and 99e-3 above the floor 1 are 1 and 2 decades above eps.
    eps = 1e-3
    points = [(1, 1.0 + 9 * eps), (10, 1.0 + 99 * eps), (100, 0.5)]
    assert measurements_auc(points, log_x=True, log_y=True, y_min=1.0, eps=eps) == pytest.approx(
        1.5 + 1.0
    )
    with pytest.raises(CircuitError, match="needs y_min"):
        measurements_auc(points, log_y=True)


def test_average_auc_normalised_by_random():
    task_measurements = {
        "task1": {"Random": [(0, 1.0), (2, 1.0)], "A": [(0, 1.0), (2, 3.0)]},
        "task2": {"Random": [(0, 2.0), (1, 2.0)], "A": [(0, 1.0), (1, 1.0)]},
    }
    assert normalised_aucs(task_measurements) == {
        "task1": {"Random": 1.0, "A": 2.0},
        "task2": {"Random": 1.0, "A": 0.5},
    }
    assert average_auc(task_measurements) == {"Random": 1.0, "A": 1.25}
    with pytest.raises(CircuitError, match="baseline algorithm 'Random'"):
        average_auc({"task": {"A": [(0, 1.0), (1, 1.0)]}})


# ---------------------------------------------------------------------------------------
# MIB's CPR and CMD


def mib_measurements(f, n_edges: int = 1000, empty: float = -1.0, model: float = 3.0):
    """Metric values m = empty + f(x) (model - empty) at MIB's sizes (x = size / n), and
    m = empty for the empty circuit."""
    sizes = mib_edge_counts(n_edges)[1:]
    return [(0, empty)] + [(k, empty + f(k / n_edges) * (model - empty)) for k in sizes]


def test_mib_edge_counts():
    assert mib_edge_counts(1000) == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert mib_edge_counts(32491)[1:3] == [32, 64]  # MIB rounds down
    assert len(MIB_EDGE_FRACTIONS) == 10


@pytest.mark.parametrize(
    "f, cpr, cmd",
    [
        # f(x) = x: the trapezoid is exact for linear pieces.
        (lambda x: x, (1 - 0.001**2) / 2, (1 - 0.001) ** 2 / 2),
        (lambda x: 1.0, 0.999, 0.0),  # a perfect circuit at every size
        (lambda x: 2.0, 2 * 0.999, 0.999),  # overshooting: CPR > 1
        (lambda x: 0.0, 0.0, 0.999),
    ],
)
def test_cpr_cmd_on_constructed_curves(f, cpr, cmd):
    scores = mib_scores(mib_measurements(f), 1000, model_value=3.0)
    assert scores.cpr == pytest.approx(cpr)
    assert scores.cmd == pytest.approx(cmd)
    assert scores.curve[0][0] == pytest.approx(0.001) and scores.curve[-1][0] == 1.0


def test_cmd_uses_endpoint_absolute_values_like_mib():
    # f goes 0 -> 2 over [0.5, 1]: |1 - f| is 1 at both ends, so the trapezoid gives 0.5.
    curve_points = [(0, 0.0), (500, 0.0), (1000, 2.0)]
    scores = mib_scores(curve_points, 1000, model_value=1.0)
    assert scores.cmd == pytest.approx(0.5) and scores.cpr == pytest.approx(0.5)


def test_faithfulness_curve_errors():
    with pytest.raises(CircuitError, match="no empty circuit"):
        faithfulness_curve([(5, 1.0), (10, 2.0)], 10)
    with pytest.raises(CircuitError, match="no full circuit"):
        faithfulness_curve([(0, 1.0), (5, 2.0)], 10)
    with pytest.raises(CircuitError, match="faithfulness is undefined"):
        faithfulness_curve([(0, 1.0), (10, 1.0)], 10)


def test_measure_mib_scores_full_circuit_is_faithful():
    loader, _, _ = tl_loader(False)
    pm = patchable_model(make_tl_model(), True, slice_output="last_seq", separate_qkv=True)
    gen = t.Generator().manual_seed(7)
    scores = {k: t.rand(v.shape, generator=gen) for k, v in pm.patch_masks.items()}
    result = measure_mib_scores(pm, loader, scores)
    # TREE_PATCH + RESAMPLE: all edges kept is the clean model, so f(1) = 1.
    assert result.curve[-1][0] == 1.0
    assert result.curve[-1][1] == pytest.approx(1.0, abs=1e-4)
    assert len(result.curve) == len(set(mib_edge_counts(pm.n_edges))) - 1


# ---------------------------------------------------------------------------------------
# Top-k overlap


def test_prune_score_similarities_by_hand():
    a = {"m": t.tensor([5.0, 4.0, 3.0, 2.0, 1.0])}
    b = {"m": t.tensor([1.0, 2.0, 3.0, 4.0, -5.0])}  # |score| ranks
    c = {"m": t.tensor([5.0, 4.0, 4.0, 2.0, 1.0])}  # tie at ranks 2 and 3
    sims = prune_score_similarities({"a": a, "b": b, "c": c}, [1, 2, 3, 5])
    assert sims[2]["a"]["b"] == 0.0
    assert sims[3]["a"]["b"] == pytest.approx(1 / 3)
    assert sims[5]["a"]["b"] == 1.0 and sims[1]["a"]["a"] == 1.0
    assert math.isnan(sims[2]["a"]["c"]) and math.isnan(sims[2]["c"]["c"])
    assert sims[3]["a"]["c"] == 1.0  # the tie lies inside the top 3
    with pytest.raises(CircuitError, match=r"ints in \[1, 5\]"):
        prune_score_similarities({"a": a}, [0])


def test_answer_values_per_prompt_per_position_and_ragged():
    from auto_circuit.vocabulary.tensor_ops import answer_values

    vals = t.arange(2 * 3 * 5, dtype=t.float32).view(2, 3, 5)
    per_position = t.tensor([[0, 4, 2], [1, 1, 3]])
    expected = t.tensor([[0.0, 9.0, 12.0], [16.0, 21.0, 28.0]])  # vals[b, p, answer[b, p]]
    assert t.equal(answer_values(vals, per_position), expected)
    last = vals[:, -1]  # [[10..14], [25..29]]
    assert t.equal(answer_values(last, t.tensor([[0, 4], [1, 3]])), t.tensor([12.0, 27.0]))
    assert t.equal(answer_values(last, t.tensor([[0, 4], [1, 3]]), "max"), t.tensor([14.0, 28.0]))
    ragged = [t.tensor([2]), t.tensor([0, 1, 2])]
    assert t.equal(answer_values(last, ragged), t.tensor([12.0, 26.0]))
    with pytest.raises(CircuitError, match="do not fit 2 prompts"):
        answer_values(vals, t.tensor([[0, 1], [2, 3]]))
    with pytest.raises(CircuitError, match="integer token ids in \\[0, 5\\)"):
        answer_values(last, t.tensor([[5], [0]]))
