"""ACDC against hand values, a plain sequential implementation and full re-evaluations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.algorithms.acdc import acdc_prune_scores, run_acdc
from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, Edge, PatchType

TESTS_DIR = Path(__file__).parent
INF = float("inf")


def micro_setup(tau_free: bool = False):
    """MicroModel(2): clean input [1, 1], corrupt [-1, -1], MSE against the clean output."""
    pm = patchable_model(MicroModel(2), factorized=True)
    clean = t.tensor([[[1.0, 1.0]]])
    answers = t.tensor([[25.0, 49.0]])  # the clean output
    dataset = PromptDataset(clean, -clean, answers, t.zeros(1, 2))
    return pm, PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=1)


def tl_setup(
    seq_len: int | None = None,
    n_prompts: int = 6,
    batch_size: int = 4,
    slice_output: Literal["last_seq", "not_first_seq"] | None = "last_seq",
    separate_qkv: bool | None = True,
    factorized: bool = True,
    n_tokens: int = 5,
    **model_kwargs,
):
    model = make_tl_model(n_layers=2, n_heads=2, d_model=8, **model_kwargs)
    pm = patchable_model(
        model, factorized, slice_output=slice_output, seq_len=seq_len, separate_qkv=separate_qkv
    )
    gen = t.Generator().manual_seed(0)
    clean = t.randint(0, 50, (n_prompts, n_tokens), generator=gen)
    corrupt = t.randint(0, 50, (n_prompts, n_tokens), generator=gen)
    answers = t.randint(0, 50, (n_prompts, 1), generator=gen)
    dataset = PromptDataset(clean, corrupt, answers, (answers + 1) % 50)
    loader = PromptDataLoader(dataset, seq_len=seq_len, diverge_idx=0, batch_size=batch_size)
    return pm, loader


def edge_at(pm: PatchableModel, module_name: str, mask_idx: tuple[int, ...]) -> Edge:
    (edge,) = [e for e in pm.edges if e.dest.module_name == module_name and e.patch_idx == mask_idx]
    return edge


def removed_edges(pm: PatchableModel, result, tau_idx: int) -> list[Edge]:
    return [edge_at(pm, s.module_name, s.mask_idx) for s in result.steps[tau_idx]]


# ---- an independent, plain implementation ---------------------------------------------


def sequential_order(pm: PatchableModel) -> list[Edge]:
    """The documented order, written directly over Edge objects."""
    return sorted(
        pm.edges,
        key=lambda e: (
            -e.dest.layer,
            e.dest.module_name,
            -1 if e.dest.head_idx is None else e.dest.head_idx,
            -e.src.src_idx,
            e.seq_idx or 0,
        ),
    )


def logit_diff(logits: t.Tensor, batch) -> t.Tensor:
    right = logits.gather(-1, batch.answers).mean(-1)
    return right - logits.gather(-1, batch.wrong_answers).mean(-1)


def metric(pm: PatchableModel, prepared: list, removed: list[Edge], target: str) -> float:
    """The faithfulness metric of the circuit without ``removed``: one plain full forward
    per batch, the mean over every prompt."""
    total, n, ld_total = 0.0, 0, 0.0
    for batch, patch, clean_out in prepared:
        with patch_mode(pm, patch, edges=removed):
            out = pm(batch.clean)[pm.out_slice]
        n += len(batch.clean)
        if target == "kl_div":
            kl = t.nn.functional.kl_div(
                out.double().log_softmax(-1),
                clean_out.double().log_softmax(-1),
                reduction="none",
                log_target=True,
            ).sum(-1)
            total += kl.reshape(len(batch.clean), -1).mean(-1).sum().item()
        else:
            ld_total += (
                (logit_diff(out.double(), batch) - logit_diff(clean_out.double(), batch))
                .sum()
                .item()
            )
    return abs(ld_total / n) if target == "logit_diff" else total / n


def sequential_acdc(pm, loader, taus, target="kl_div") -> list[list[Edge]]:
    """ACDC as the paper states it: one full evaluation per edge, greedy."""
    prepared = [(b, src_ablations(pm, b.corrupt), pm(b.clean)[pm.out_slice]) for b in loader]
    order = sequential_order(pm)
    removed_per_tau = []
    for tau in taus:
        removed: list[Edge] = []
        current = metric(pm, prepared, removed, target)
        for edge in order:
            value = metric(pm, prepared, removed + [edge], target)
            if value - current < tau:
                removed.append(edge)
                current = value
        removed_per_tau.append(removed)
    return removed_per_tau


# ---- hand values on the MicroModel ------------------------------------------------------


def test_micro_model_greedy_steps_by_hand():
    # Clean contributions to the output [25, 49]: B1.1 [15, 28], B1.0 [5, 14], B0.1 [3, 4],
    # B0.0 [1, 2], Resid Start [1, 1]. The model is linear and corrupt = -clean, so
    # ablating an edge moves its destination's input by -2x the source's contribution.
    # MSE against [25, 49], starting at 0, edges into Resid End first (sources descending):
    #   B1.1 ([-30, -56]) 2018, B1.0 ([-10, -28]) 442, B0.1 ([-6, -8]) 50: kept at tau 20;
    #   B0.0: [-2, -4] -> (4 + 16) / 2 = 10 < 20: removed, current 10;
    #   Resid Start: [-4, -6] in all -> 26, +16 < 20: removed, current 26.
    # Into B1.0 (output = its input * [1, 2]), on top of [-4, -6]:
    #   B0.1: [-6, -16] -> [-10, -22] = 292; B0.0: [-2, -8] -> 116; Resid Start: [-2, -4] -> 68;
    # into B1.1 (x [3, 4]): B0.1 [-18, -32], B0.0 [-6, -16] -> 292, Resid Start [-6, -8] -> 148;
    # into B0.0: [-2, -4] reaches B1.0 and B1.1 -> [-12, -30] = 522; into B0.1: larger.
    # All these rise by more than 20, so they are kept.
    pm, loader = micro_setup()
    result = run_acdc(
        pm, loader, tao_exps=[0], tao_bases=[20], faithfulness_target="mse", show_progress=False
    )
    assert [e.name for e in removed_edges(pm, result, 0)] == [
        "B0.0->Resid End",
        "Resid Start->Resid End",
    ]
    assert [s.value for s in result.steps[0]] == [10.0, 26.0]
    assert result.base_value == 0.0 and result.final_values == [26.0]
    scores = result.prune_scores
    assert pm.edge("B0.0->Resid End").prune_score(scores) == 0.0
    assert pm.edge("Resid Start->Resid End").prune_score(scores) == 0.0
    removed = {"B0.0->Resid End", "Resid Start->Resid End"}
    others = [e for e in pm.edges if e.name not in removed]
    assert len(others) == 11 and all(e.prune_score(scores) == INF for e in others)


def test_micro_model_extreme_taus_and_score_semantics():
    pm, loader = micro_setup()
    # tau 1e-9: every edge changes the output, so nothing is removed.
    # tau 20: the two edges above are removed. tau 1e6: everything is removed, and the
    # empty circuit is the corrupt run: output [-25, -49], MSE (50^2 + 98^2) / 2 = 6052.
    result = run_acdc(
        pm,
        loader,
        tao_exps=[-9, 0, 6],
        tao_bases=[1, 20],
        faithfulness_target="mse",
        show_progress=False,
    )
    assert result.taus == [1e-9, 2e-8, 1.0, 20.0, 1e6, 2e7]
    assert [len(s) for s in result.steps] == [0, 0, 0, 2, 13, 13]
    assert result.final_values[-2:] == [6052.0, 6052.0]
    flat = t.cat([v.flatten() for v in result.prune_scores.values()])
    # Largest tau whose circuit kept the edge: 20 for 11 edges, 1 for the two removed
    # at tau=20, none kept at every tau (so no +inf).
    assert sorted(flat.tolist()) == [1.0, 1.0] + [20.0] * 11
    huge = acdc_prune_scores(
        pm, loader, tao_exps=[6], faithfulness_target="mse", show_progress=False
    )
    assert all(not v.any() for v in huge.values())
    tiny = acdc_prune_scores(
        pm, loader, tao_exps=[-9], faithfulness_target="mse", show_progress=False
    )
    assert all(bool((v == INF).all()) for v in tiny.values())
    assert not any(m.any() for m in pm.patch_masks.values()), "masks restored"


# ---- batched == sequential, and every step == a full re-evaluation ----------------------

GRAPHS = {
    "qkv": {},
    "qkv_per_position": {"seq_len": 3, "n_tokens": 3, "n_prompts": 4, "batch_size": 2},
    "attn_in": {"separate_qkv": False},
    "attn_only": {"attn_only": True},
    "parallel": {"parallel_attn_mlp": True},
    "node_graph": {"factorized": False, "separate_qkv": None},
}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_batched_acdc_equals_sequential_acdc(graph):
    pm, loader = tl_setup(**GRAPHS[graph])
    taus = [1e-5, 1e-4, 1e-3]
    expected = sequential_acdc(pm, loader, taus)
    sizes = [len(r) for r in expected]
    assert len(set(sizes)) > 1 and any(0 < n < pm.n_edges for n in sizes), sizes  # a real mix
    for k in (1, 5, 1000) if graph == "qkv" else (5, 1000):
        result = run_acdc(
            pm, loader, tao_exps=[-5, -4, -3], candidates_per_forward=k, show_progress=False
        )
        for i in range(len(taus)):
            assert removed_edges(pm, result, i) == expected[i], (graph, k, taus[i])
    # The scores follow from the circuits: largest tau that kept the edge.
    for edge in pm.edges:
        kept = [tau for tau, removed in zip(taus, expected, strict=True) if edge not in removed]
        want = INF if len(kept) == len(taus) else max(kept, default=0.0)
        assert edge.prune_score(result.prune_scores) == want


@pytest.mark.parametrize("target", ["kl_div", "logit_diff"])
def test_batched_acdc_equals_sequential_acdc_per_target(target):
    pm, loader = tl_setup(n_prompts=5, batch_size=2)  # batches of 2, 2 and 1
    taus = [1e-3, 1e-2]
    expected = sequential_acdc(pm, loader, taus, target)
    result = run_acdc(
        pm,
        loader,
        tao_exps=[-3, -2],
        faithfulness_target=target,  # type: ignore[arg-type]
        candidates_per_forward=8,
        show_progress=False,
    )
    assert [removed_edges(pm, result, i) for i in range(2)] == expected


def kl_of_outputs(outs: dict, clean: dict) -> float:
    kls = [
        t.nn.functional.kl_div(
            outs[key].double().log_softmax(-1),
            clean[key].double().log_softmax(-1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        for key in clean
    ]
    return t.cat([k.reshape(len(k), -1).mean(-1) for k in kls]).mean().item()


@pytest.mark.parametrize(
    "graph", ["qkv", "qkv_per_position", "node_graph", "not_first_seq", "mean_ablation"]
)
def test_every_accepted_step_matches_run_circuits(graph):
    """Each accepted removal's metric, computed from cached activations starting at the
    destination's block with many candidates per forward, equals a full TREE_PATCH
    evaluation of that circuit by run_circuits."""
    kwargs: dict[str, Any] = dict(GRAPHS.get(graph, {}))
    ablation = AblationType.RESAMPLE
    if graph == "not_first_seq":
        kwargs["slice_output"] = "not_first_seq"
    if graph == "mean_ablation":
        ablation = AblationType.TOKENWISE_MEAN_CORRUPT
        kwargs["batch_size"] = 3  # run_circuits needs equal batches for dataset means
    pm, loader = tl_setup(**kwargs)
    result = run_acdc(pm, loader, tao_exps=[-4, -3], ablation_type=ablation, show_progress=False)
    (clean,) = run_circuits(
        pm,
        loader,
        [pm.n_edges],
        pm.new_prune_scores(1.0),
        PatchType.TREE_PATCH,
        ablation,
        show_progress=False,
    ).values()
    for tau_idx, steps in enumerate(result.steps):
        assert steps, "some edges are removed"
        # Removal order as scores: circuit after step i = the top (n_edges - i) edges.
        scores = pm.new_prune_scores(float(len(steps) + 1))
        for i, step in enumerate(steps):
            scores[step.module_name][step.mask_idx] = float(i + 1)
        counts = [pm.n_edges - i for i in range(1, len(steps) + 1)]
        outs = run_circuits(
            pm, loader, counts, scores, PatchType.TREE_PATCH, ablation, show_progress=False
        )
        for i, step in enumerate(steps):
            full = kl_of_outputs(outs[pm.n_edges - i - 1], clean)
            assert step.value == pytest.approx(full, rel=1e-4, abs=1e-9), (tau_idx, i)
        assert result.final_values[tau_idx] == steps[-1].value
    assert result.n_edges_tested == 2 * pm.n_edges


def test_start_at_block_saves_compute_and_batching_saves_forwards():
    pm, loader = tl_setup()
    one = run_acdc(pm, loader, tao_exps=[-4], candidates_per_forward=1, show_progress=False)
    many = run_acdc(pm, loader, tao_exps=[-4], show_progress=False)
    n_batches = len(loader)
    # One forward per batch per edge, each starting at the destination's block: edges
    # into block 1 (most of them) run half the model.
    assert one.n_forwards == n_batches * (pm.n_edges - one.n_skipped + 1)
    assert one.forward_equivalents_per_edge < 0.75
    assert many.n_forwards * 2 < one.n_forwards
    assert many.n_skipped == one.n_skipped > 0
    assert many.n_rows >= pm.n_edges - many.n_skipped


@pytest.mark.parametrize("graph", ["qkv", "attn_in", "parallel", "qkv_per_position"])
def test_edges_into_destinations_cut_off_from_the_output_are_skipped(graph):
    """An edge into a head or MLP none of whose outgoing edges the circuit kept is removed
    without a forward: exactly those edges, counted from the final circuit's Edge objects.
    Per position: a query or MLP input at position p feeds its node at p only; a key or
    value input (or a whole attention input) feeds it at p and every later position."""
    pm, loader = tl_setup(**GRAPHS[graph])
    result = run_acdc(pm, loader, tao_exps=[-3], show_progress=False)
    removed = set(removed_edges(pm, result, 0))
    kept = {(e.src.name, e.seq_idx) for e in pm.edges if e not in removed}
    owners = {s.name for s in pm.srcs}

    def owner(dest_name: str) -> str | None:
        name = dest_name[:-2] if dest_name.endswith((".Q", ".K", ".V")) else dest_name
        return name if name in owners else None

    def is_cut_off(edge: Edge) -> bool:
        node = owner(edge.dest.name)
        if node is None:
            return False
        if edge.seq_idx is None:
            return all(src != node for src, _ in kept)
        local = edge.dest.name.endswith(".Q") or edge.dest.head_idx is None
        positions = [edge.seq_idx] if local else range(edge.seq_idx, pm.seq_len or 0)
        return all((node, p) not in kept for p in positions)

    cut_off = [e for e in pm.edges if is_cut_off(e)]
    assert cut_off and all(e in removed for e in cut_off)
    assert result.n_skipped == len(cut_off)
    assert result.n_rows < pm.n_edges - len(cut_off) + 10  # skipped edges take no rows


# ---- determinism and resumption --------------------------------------------------------

SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_acdc import tl_setup
from auto_circuit.algorithms.acdc import acdc_prune_scores
pm, loader = tl_setup()
scores = acdc_prune_scores(pm, loader, tao_exps=[-5, -4, -3], show_progress=False)
print(json.dumps({{k: v.flatten().tolist() for k, v in sorted(scores.items())}}))
"""


def test_same_result_in_processes_with_different_hash_seeds():
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT.format(tests=str(TESTS_DIR))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in ("0", "12345")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    pm, loader = tl_setup()
    here = acdc_prune_scores(pm, loader, tao_exps=[-5, -4, -3], show_progress=False)
    assert results[0] == {k: v.flatten().tolist() for k, v in sorted(here.items())}
    assert len({x for v in results[0].values() for x in v}) > 2  # not all tied


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("stop_after", [7, 15])
def test_resume_after_interruption_gives_the_same_result(tmp_path, stop_after):
    pm, loader = tl_setup()
    kwargs = dict(tao_exps=[-5, -4, -3], candidates_per_forward=4, show_progress=False)
    uninterrupted = run_acdc(pm, loader, **kwargs)  # type: ignore[arg-type]

    state = tmp_path / "acdc_state.pt"
    killed = tmp_path / "as_if_killed.pt"
    calls = {"n": 0}

    def interrupt(module, args):
        if pm.engine.state.patch_mode:
            calls["n"] += 1
            if calls["n"] > stop_after:
                # What a hard kill (no chance to save) would leave: the periodic save.
                shutil.copy(state, killed)
                raise Interrupted

    handle = pm.wrapped_model.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(Interrupted):
            run_acdc(pm, loader, state_path=state, save_every=2, **kwargs)  # type: ignore[arg-type]
    finally:
        handle.remove()
    assert not any(m.any() for m in pm.patch_masks.values()), "masks restored"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acdc_state.pt", "as_if_killed.pt"]
    for path in (state, killed):
        resumed = run_acdc(pm, loader, resume_from=path, **kwargs)  # type: ignore[arg-type]
        for name, scores in uninterrupted.prune_scores.items():
            assert t.equal(resumed.prune_scores[name], scores)
        assert resumed.steps == uninterrupted.steps
        assert resumed.final_values == uninterrupted.final_values
        if path == state:  # saved on interruption: nothing is decided twice
            assert resumed.n_edges_tested == uninterrupted.n_edges_tested
        else:  # the decisions made after the last periodic save are made again
            assert resumed.n_edges_tested >= uninterrupted.n_edges_tested


def test_resume_from_a_different_run_is_refused(tmp_path):
    pm, loader = tl_setup()
    state = tmp_path / "state.pt"
    done = run_acdc(pm, loader, tao_exps=[-3], state_path=state, show_progress=False)
    again = run_acdc(pm, loader, tao_exps=[-3], resume_from=state, show_progress=False)
    assert again.steps == done.steps and again.n_forwards == done.n_forwards  # nothing rerun
    with pytest.raises(CircuitError, match="different run.*taus"):
        run_acdc(pm, loader, tao_exps=[-4], resume_from=state, show_progress=False)
    with pytest.raises(CircuitError, match="does not exist"):
        run_acdc(pm, loader, resume_from=tmp_path / "missing.pt", show_progress=False)


# ---- errors -------------------------------------------------------------------------


def test_bad_arguments_raise_circuit_errors():
    pm, loader = tl_setup()
    with pytest.raises(CircuitError, match="faithfulness_target must be one of"):
        run_acdc(pm, loader, faithfulness_target="kl", show_progress=False)  # type: ignore[arg-type]
    with pytest.raises(CircuitError, match="finite and positive"):
        run_acdc(pm, loader, tao_bases=[-1], show_progress=False)
    with pytest.raises(CircuitError, match="at least one value"):
        run_acdc(pm, loader, tao_exps=[], show_progress=False)
    with pytest.raises(CircuitError, match="candidates_per_forward must be a positive int"):
        run_acdc(pm, loader, candidates_per_forward=0, show_progress=False)
    with pytest.raises(CircuitError, match="float answers"):
        run_acdc(pm, loader, faithfulness_target="mse", show_progress=False)
    pm_all, loader_all = tl_setup(slice_output=None)
    with pytest.raises(CircuitError, match="slice_output='last_seq'"):
        run_acdc(pm_all, loader_all, faithfulness_target="logit_diff", show_progress=False)
