"""AutoCircuit's parameters of the algorithms stage, each against an independent value:
run_circuits' rendering, ACDC's test_mode and show_graphs, the probing training graph
and validation curve, EAP's answer_diff, PruneAlgo(func), run_prune_algos(tasks, ...),
get_tracr_model(tracr_task_key) and graph_edges(seq_len)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.algorithms.acdc import acdc_prune_scores, run_acdc
from auto_circuit.algorithms.acdc.evaluator import Evaluator
from auto_circuit.algorithms.circuit_probing import circuit_probing_prune_scores
from auto_circuit.algorithms.edge_attribution_patching import (
    edge_attribution_patching_prune_scores,
)
from auto_circuit.algorithms.mask_gradient import mask_gradient_prune_scores
from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.algorithms.registry import PruneAlgo, prune_algo, run_prune_algos
from auto_circuit.algorithms.subnetwork_probing import (
    ProbingEpoch,
    subnetwork_probing_prune_scores,
)
from auto_circuit.app.tasks import MICRO_MODEL_TASK, Task
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import graph_edges, patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.families.micro import MicroModel
from auto_circuit.families.tracr import get_tracr_model
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import PatchType, PruneScores


def micro_setup() -> tuple[PatchableModel, PromptDataLoader]:
    pm = patchable_model(MicroModel(2), factorized=True)
    clean = t.tensor([[[1.0, 1.0]], [[2.0, 1.0]], [[1.0, 3.0]]])
    answers = t.tensor([[0], [1], [0]])
    dataset = PromptDataset(clean, -clean, answers, 1 - answers)
    return pm, PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=2)


def tl_setup(**patchable: Any) -> tuple[PatchableModel, PromptDataLoader]:
    model = make_tl_model(n_layers=2, n_heads=2, d_model=8)
    patchable.setdefault("separate_qkv", True)
    pm = patchable_model(model, True, slice_output="last_seq", **patchable)
    gen = t.Generator().manual_seed(0)
    clean = t.randint(0, 50, (6, 5), generator=gen)
    corrupt = t.randint(0, 50, (6, 5), generator=gen)
    answers = t.randint(0, 50, (6, 1), generator=gen)
    dataset = PromptDataset(clean, corrupt, answers, (answers + 1) % 50)
    return pm, PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=4)


def ranked_scores(pm: PatchableModel) -> PruneScores:
    """Distinct scores 1..n_edges, in mask order."""
    scores, start = {}, 1
    for name in sorted(pm.patch_masks):
        mask = pm.patch_masks[name]
        scores[name] = t.arange(start, start + mask.numel(), dtype=t.float).view(mask.shape)
        start += mask.numel()
    return scores


def drawn_edges(page: str) -> set[str]:
    """The edge names of every Sankey link in a written figure (its ``customdata``)."""
    names, decoder, key = set(), json.JSONDecoder(), '"customdata":'
    start = page.find(key)
    while start != -1:
        data, _ = decoder.raw_decode(page, start + len(key))
        if isinstance(data, list):  # links: [[edge name, score], ...]; nodes have none
            names.update(item[0] for item in data if isinstance(item, list))
        start = page.find(key, start + 1)
    return names


def assert_outputs_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for key in a[k]:
            assert t.equal(a[k][key], b[k][key])


# ---- run_circuits(render_graph, render_score_threshold, render_file_path) ------------


def test_run_circuits_renders_each_circuit_to_a_file_and_changes_no_output(tmp_path):
    pm, loader = tl_setup()
    scores = ranked_scores(pm)
    plain = run_circuits(pm, loader, [3], scores, PatchType.TREE_PATCH, show_progress=False)
    path = tmp_path / "circuit.html"
    rendered = run_circuits(
        pm, loader, [3], scores, PatchType.TREE_PATCH, render_graph=True, render_file_path=path
    )
    assert_outputs_equal(plain, rendered)
    # The circuit is the 3 best edges, drawn with their scores (not the ablated rest).
    by_score = sorted(pm.edges, key=lambda e: -float(e.prune_score(scores)))
    assert drawn_edges(path.read_text()) == {e.name for e in by_score[:3]}


def test_run_circuits_renders_one_file_per_circuit_size(tmp_path):
    pm, loader = micro_setup()
    scores = ranked_scores(pm)
    outs = run_circuits(
        pm, loader, [1, 4], scores, render_graph=True, render_file_path=tmp_path / "c.html"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c-1-edges.html", "c-4-edges.html"]
    assert_outputs_equal(outs, run_circuits(pm, loader, [1, 4], scores))


def test_run_circuits_render_threshold_hides_small_scores(tmp_path):
    pm, loader = micro_setup()
    scores = ranked_scores(pm)
    path = tmp_path / "c.html"
    threshold = pm.n_edges - 1.5  # the two best edges
    run_circuits(
        pm, loader, [pm.n_edges], scores, render_graph=True, render_score_threshold=threshold,
        render_file_path=path,
    )  # fmt: skip
    best = {e.name for e in pm.edges if float(e.prune_score(scores)) >= threshold}
    assert len(best) == 2 and drawn_edges(path.read_text()) == best


def test_run_circuits_without_rendering_imports_no_figures():
    code = """
import sys, torch as t
from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.families.micro import MicroModel
pm = patchable_model(MicroModel(2), factorized=True)
clean = t.tensor([[[1.0, 1.0]], [[2.0, 1.0]]])
loader = PromptDataLoader(PromptDataset(clean, -clean, t.tensor([[0], [0]]),
                          t.tensor([[1], [1]])), None, 0, batch_size=2)
run_circuits(pm, loader, [0, 3], pm.new_prune_scores(1.0), render_graph=False)
assert "auto_circuit.figures" not in sys.modules
assert "plotly" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- ACDC(test_mode, run_circuits_ref, show_graphs, draw_seq_graph_ref) -----------------


@pytest.mark.parametrize("setup", ["micro", "tl"])
def test_acdc_test_mode_passes_and_checks_every_step(setup):
    pm, loader = micro_setup() if setup == "micro" else tl_setup()
    calls = []

    def counting_run_circuits(*args: Any, **kwargs: Any):
        calls.append(args[2])
        return run_circuits(*args, **kwargs)

    taus = [-3, -1] if setup == "micro" else [-4, -3]
    checked = acdc_prune_scores(
        pm, loader, tao_exps=taus, test_mode=True, run_circuits_ref=counting_run_circuits,
        show_progress=False,
    )  # fmt: skip
    plain = acdc_prune_scores(pm, loader, tao_exps=taus, show_progress=False)
    assert all(t.equal(checked[k], plain[k]) for k in plain)
    # One plain evaluation per edge per tau, and one of the full model.
    assert len(calls) == 2 * pm.n_edges + 1
    assert calls[0] == [pm.n_edges] and calls.count([pm.n_edges]) == 1


def test_acdc_test_mode_uses_run_circuits_by_default():
    pm, loader = micro_setup()
    acdc_prune_scores(pm, loader, tao_exps=[-2], test_mode=True, show_progress=False)


def test_acdc_test_mode_raises_when_the_fast_evaluation_is_wrong(monkeypatch):
    pm, loader = tl_setup()
    original = Evaluator.outputs

    def sabotaged(self, *args: Any, **kwargs: Any):
        return original(self, *args, **kwargs) * 1.5  # KL ignores a constant shift

    monkeypatch.setattr(Evaluator, "outputs", sabotaged)
    # Without test_mode the wrong values go unnoticed.
    acdc_prune_scores(pm, loader, tao_exps=[-3], show_progress=False)
    with pytest.raises(CircuitError, match="test_mode: the fast evaluation of the full model"):
        acdc_prune_scores(pm, loader, tao_exps=[-3], test_mode=True, show_progress=False)
    # Wrong only for candidates (every forward after the full model's, one per batch).
    n_forwards = []

    def wrong_candidates(self, *args: Any, **kwargs: Any):
        n_forwards.append(1)
        out = original(self, *args, **kwargs)
        return out if len(n_forwards) <= len(loader) else out * 1.5

    monkeypatch.setattr(Evaluator, "outputs", wrong_candidates)
    with pytest.raises(CircuitError, match="evaluation of the circuit without edge 0 of the"):
        acdc_prune_scores(pm, loader, tao_exps=[-3], test_mode=True, show_progress=False)


def test_acdc_show_graphs_draws_the_circuit_after_every_removal():
    pm, loader = tl_setup()
    drawn: list[PruneScores] = []

    def draw(model: PatchableModel, prune_scores: PruneScores, **kwargs: Any) -> None:
        assert model is pm and kwargs == {"score_threshold": 0.5}
        drawn.append({k: v.clone() for k, v in prune_scores.items()})

    result = run_acdc(
        pm, loader, tao_exps=[-3], show_graphs=True, draw_seq_graph_ref=draw, show_progress=False
    )
    (steps,) = result.steps
    assert len(drawn) == len(steps) > 0
    kept = pm.n_edges
    for step, circuit in zip(steps, drawn, strict=True):
        kept -= 1
        assert circuit[step.module_name][step.mask_idx] == 0  # the removed edge is out
        assert int(sum(v.sum() for v in circuit.values())) == kept
    assert all(t.equal(drawn[-1][k] > 0, result.prune_scores[k] > 0) for k in drawn[-1])


def test_acdc_show_graphs_off_draws_nothing():
    pm, loader = micro_setup()

    def draw(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("show_graphs is off")

    acdc_prune_scores(pm, loader, tao_exps=[-2], draw_seq_graph_ref=draw, show_progress=False)


# ---- subnetwork and circuit probing: show_train_graph, validation_dataloader ---------

SP_ARGS: dict[str, Any] = {"epochs": 3, "learning_rate": 0.05, "show_progress": False}


def test_subnetwork_probing_writes_its_training_graph_and_returns_the_same_scores(tmp_path):
    pm, loader = micro_setup()
    plain = subnetwork_probing_prune_scores(pm, loader, **SP_ARGS)
    path = tmp_path / "train.html"
    drawn = subnetwork_probing_prune_scores(
        pm, loader, **SP_ARGS, show_train_graph=path, validation_dataloader=loader
    )
    assert all(t.equal(plain[k], drawn[k]) for k in plain)
    page = path.read_text()
    assert "Expected circuit size" in page and "Faithfulness loss (validation)" in page


def test_subnetwork_probing_validation_needs_somewhere_to_go():
    pm, loader = micro_setup()
    with pytest.raises(CircuitError, match="validation_dataloader is only reported"):
        subnetwork_probing_prune_scores(pm, loader, **SP_ARGS, validation_dataloader=loader)


def test_circuit_probing_validation_curve_and_training_graph(tmp_path):
    pm, loader = micro_setup()
    records: list[ProbingEpoch] = []
    path = tmp_path / "train.html"
    scores = circuit_probing_prune_scores(
        pm, loader, **SP_ARGS, circuit_sizes=[2, 4], validation_dataloader=loader,
        epoch_callback=records.append, show_train_graph=path,
    )  # fmt: skip
    assert [(r.circuit_size, r.epoch) for r in records] == [(2, 0), (2, 1), (2, 2)] + [
        (4, 0), (4, 1), (4, 2)
    ]  # fmt: skip
    assert all(r.validation_faithfulness is not None for r in records)
    # The validation loader is the training loader, so its faithfulness with the
    # deterministic gates is that of run_circuits-free expected gates: finite, >= 0.
    assert all(r.validation_faithfulness >= 0 for r in records)  # type: ignore[operator]
    page = path.read_text()
    assert "target 2 edges" in page and "target 4 edges" in page
    assert scores.keys() == pm.patch_masks.keys()


# ---- edge_attribution_patching_prune_scores(answer_diff) ------------------------------


def hand_resid_end_attribution(pm: PatchableModel, loader: PromptDataLoader) -> dict[str, float]:
    """Edges into Resid End, by hand with TransformerLens hooks: the gradient of minus the
    mean answer logit at the final residual stream, dotted with corrupt - clean source
    outputs, summed over prompts and positions."""
    inner: Any = pm.wrapped_model
    (end,) = [d for d in pm.dests if d.name == "Resid End"]
    srcs = [s for s in pm.sorted_srcs if s.layer < end.layer]
    names = sorted({s.module_name for s in srcs})
    expected = {s.name: 0.0 for s in srcs}
    inner.cfg.use_attn_result = True
    try:
        for batch in loader:
            with t.no_grad():
                _, clean = inner.run_with_cache(batch.clean, names_filter=names)
                _, corrupt = inner.run_with_cache(batch.corrupt, names_filter=names)
            saved: dict[str, t.Tensor] = {}

            def keep(x: t.Tensor, hook: Any, saved: dict[str, t.Tensor] = saved) -> t.Tensor:
                x = x.detach().requires_grad_(True)
                saved["resid"] = x
                return x

            logits = inner.run_with_hooks(batch.clean, fwd_hooks=[(end.module_name, keep)])
            answer_logit = logits[:, -1].gather(-1, batch.answers).mean()
            (grad,) = t.autograd.grad(-answer_logit, saved["resid"])
            for s in srcs:
                diff = corrupt[s.module_name] - clean[s.module_name]
                if s.head_idx is not None:
                    diff = diff[:, :, s.head_idx]
                expected[s.name] += float((grad * diff).sum())
    finally:
        inner.cfg.use_attn_result = False
    return expected


def test_eap_answer_diff_false_is_the_answer_logit_attribution_by_hand():
    pm, loader = tl_setup()
    scores = edge_attribution_patching_prune_scores(pm, loader, answer_diff=False)
    expected = hand_resid_end_attribution(pm, loader)
    for edge in pm.edges:
        if edge.dest.name == "Resid End":
            got = float(edge.prune_score(scores))
            assert got == pytest.approx(expected[edge.src.name], rel=1e-4, abs=1e-5), edge.name
    # And for every edge: the mask-gradient attribution of the answer value.
    fast = mask_gradient_prune_scores(
        pm, loader, grad_function="logit", answer_function="avg_val", mask_val=0.0
    )
    for k in fast:
        assert t.allclose(scores[k], fast[k], rtol=1e-4, atol=1e-5), k


def test_eap_answer_diff_names_the_answer_function():
    pm, loader = tl_setup()
    diff = edge_attribution_patching_prune_scores(pm, loader, answer_diff=True)
    default = edge_attribution_patching_prune_scores(pm, loader)
    val = edge_attribution_patching_prune_scores(pm, loader, answer_function="avg_val")
    no_diff = edge_attribution_patching_prune_scores(pm, loader, answer_diff=False)
    assert all(t.equal(diff[k], default[k]) and t.equal(val[k], no_diff[k]) for k in diff)
    assert not all(t.allclose(diff[k], val[k]) for k in diff)
    with pytest.raises(CircuitError, match="not both"):
        edge_attribution_patching_prune_scores(
            pm, loader, answer_function="avg_val", answer_diff=False
        )


# ---- PruneAlgo(func) and run_prune_algos(tasks, prune_algos) --------------------------


def test_prune_algo_runs_a_function():
    pm, loader = micro_setup()
    calls = []

    def func(model, dataloader, official_edges):
        calls.append((model, dataloader, official_edges))
        return model.new_prune_scores(2.0)

    official = {pm.edge("B0.1->Resid End")}
    algo = PruneAlgo("Twos", "Twos", func=func)
    scores = algo(pm, loader, official)
    assert calls == [(pm, loader, official)]
    assert all(bool((v == 2.0).all()) for v in scores.values())
    assert algo.func is func and algo.short_name == "Twos"
    assert (algo.module, algo.function) == (func.__module__, func.__qualname__)
    positional = PruneAlgo("Twos", "Twos", func, "2s")  # AutoCircuit's order
    assert positional.func is func and positional.short_name == "2s"
    with pytest.raises(CircuitError, match="not both"):
        PruneAlgo("x", "x", "auto_circuit.algorithms.random_edges", func=func)
    with pytest.raises(CircuitError, match="give func, or module and function"):
        PruneAlgo("x", "x")


def micro_task() -> Task:
    base = MICRO_MODEL_TASK
    task = Task(
        key=base.key, name=base.name, batch_size=base.batch_size, batch_count=base.batch_count,
        token_circuit=base.token_circuit, model_def=base.model_def,
        dataset_name=base.dataset_name, separate_qkv=base.separate_qkv,
    )  # fmt: skip
    task.init_task("cpu")
    return task


def test_run_prune_algos_over_tasks_equals_calling_the_functions():
    task = micro_task()
    eap = prune_algo("Logit Diff Gradients")
    twos = PruneAlgo("Twos", "Twos", func=lambda m, d, o: m.new_prune_scores(2.0))
    results = run_prune_algos([task], [eap, twos])
    assert list(results) == [task.key] and list(results[task.key]) == [eap.key, "Twos"]
    direct = mask_gradient_prune_scores(
        task.model, task.train_loader, task.true_edges, grad_function="logit",
        answer_function="avg_diff", mask_val=0.0,
    )  # fmt: skip
    got = results[task.key][eap.key]
    assert got.keys() == direct.keys()
    assert all(t.equal(got[k], direct[k]) for k in direct)
    # The older form still works.
    old = run_prune_algos(task.model, task.train_loader, [eap], task.true_edges)
    assert all(t.equal(old[eap.key][k], direct[k]) for k in direct)


def test_run_prune_algos_with_a_func_algo_passes_the_tasks_fields():
    task = micro_task()
    seen = []

    def func(model, dataloader, official_edges):
        seen.append((model, dataloader, official_edges))
        return model.new_prune_scores()

    run_prune_algos([task], [PruneAlgo("f", "f", func=func)])
    assert seen == [(task.model, task.train_loader, task.true_edges)]
    with pytest.raises(CircuitError, match="takes no algos"):
        run_prune_algos([task], [], [PruneAlgo("f", "f", func=func)])  # type: ignore[call-overload]


# ---- get_tracr_model(tracr_task_key) ---------------------------------------------------


def test_get_tracr_model_accepts_tracr_task_key():
    by_key, vocab = get_tracr_model(tracr_task_key="reverse")
    by_name, _ = get_tracr_model("reverse")
    assert by_key.cfg.model_name == "tracr-reverse"
    assert all(
        t.equal(a, b) for a, b in zip(by_key.parameters(), by_name.parameters(), strict=True)
    )
    assert vocab is not None
    with pytest.raises(CircuitError, match="give the model's name once"):
        get_tracr_model("reverse", tracr_task_key="reverse")
    with pytest.raises(CircuitError, match="give the model's name once"):
        get_tracr_model()


# ---- graph_edges(seq_len) --------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [None, 3])
def test_graph_edges_matches_the_closed_form_and_patchable_model(seq_len):
    model = make_tl_model(n_layers=2, n_heads=2, d_model=8)
    nodes, srcs, dests, edge_dict, edges, seq_dim, got_len = graph_edges(
        model, True, separate_qkv=True, seq_len=seq_len
    )
    # AutoCircuit's closed form with L = 2 layers, H = 2 heads, separate Q, K, V:
    # 3H sum_b (1 + (H+1) b) + sum_b (H+1)(b+1) + (1 + L(H+1)) = 30 + 9 + 7.
    per_position = 46
    assert len(edges) == per_position * (seq_len or 1)
    assert (seq_dim, got_len) == (1, seq_len)
    assert list(edge_dict) == (list(range(seq_len)) if seq_len else [None])
    assert all(e.seq_idx == pos for pos, es in edge_dict.items() for e in es)
    assert nodes == srcs | dests
    pm = patchable_model(model, True, seq_len=seq_len, separate_qkv=True)
    assert edges == pm.edges and pm.n_edges == len(edges)


def test_graph_edges_node_graph_and_bad_seq_len():
    model = MicroModel(2)
    graph = graph_edges(model, False)
    pm = patchable_model(MicroModel(2), False)
    assert graph.edges == pm.edges
    assert all(e.src.layer + 1 == e.dest.layer for e in graph.edges)
    with pytest.raises(CircuitError, match="seq_len must be a positive"):
        graph_edges(model, True, seq_len=0)


def test_edge_counts_util_keeps_autocircuits_parameters():
    import inspect

    from auto_circuit.engine.graph_utils import edge_counts_util

    assert list(inspect.signature(edge_counts_util).parameters) == [
        "edges", "test_counts", "prune_scores", "zero_edges", "all_edges", "true_edge_count",
    ]  # fmt: skip
