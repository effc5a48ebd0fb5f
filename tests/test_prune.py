"""run_circuits and edge_counts_util against the unpatched model and hand values."""

from __future__ import annotations

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.algorithms.prune import run_circuits
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import edge_counts_util, patchable_model
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType, EdgeCounts, PatchType


def loader_of(clean: t.Tensor, corrupt: t.Tensor, batch_size: int) -> PromptDataLoader:
    n = len(clean)
    answers = t.zeros(n, 1, dtype=t.long)
    dataset = PromptDataset(clean, corrupt, answers, answers + 1)
    return PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch_size)


def test_micro_model_top_k_circuits_by_hand():
    pm = patchable_model(MicroModel(2), factorized=True)
    loader = loader_of(t.tensor([[[1.0, 1.0]]]), t.tensor([[[-1.0, -1.0]]]), 1)
    scores = pm.circuit_prune_scores(
        edge_dict={"B0.1->Resid End": 3.0, "Resid Start->B1.1": -2.0, "B0.0->B1.0": 1.0}
    )
    outs = run_circuits(pm, loader, [0, 1, 2, 3], scores, PatchType.EDGE_PATCH)
    (key,) = outs[0].keys()
    # Hand values: see tests/test_micro_model.py::test_edge_patching_by_hand.
    expected = {0: [-25, -49], 1: [-19, -41], 2: [-13, -33], 3: [-11, -25]}
    assert {k: v[key].tolist() for k, v in outs.items()} == {k: [[v]] for k, v in expected.items()}
    assert not any(m.any() for m in pm.patch_masks.values()), "masks restored"


@pytest.mark.parametrize("patch_type", [PatchType.EDGE_PATCH, PatchType.TREE_PATCH])
@pytest.mark.parametrize(
    "ablation_type", [AblationType.RESAMPLE, AblationType.ZERO, AblationType.TOKENWISE_MEAN_CORRUPT]
)
def test_empty_and_full_circuits_reproduce_the_model(patch_type, ablation_type):
    model = make_tl_model()
    gen = t.Generator().manual_seed(0)
    clean, corrupt = (
        t.randint(0, 50, (6, 7), generator=gen),
        t.randint(0, 50, (6, 7), generator=gen),
    )
    clean_out, corrupt_out = model(clean)[:, -1], model(corrupt)[:, -1]
    pm = patchable_model(model, True, slice_output="last_seq", separate_qkv=True)
    loader = loader_of(clean, corrupt, 3)
    scores = {k: t.rand(v.shape) + 0.1 for k, v in pm.patch_masks.items()}
    outs = run_circuits(pm, loader, [0, pm.n_edges], scores, patch_type, ablation_type)
    full = t.cat(list(outs[pm.n_edges].values()))
    empty = t.cat(list(outs[0].values()))
    if patch_type == PatchType.EDGE_PATCH:
        # The full circuit carries clean (ablated-clean) values everywhere.
        if ablation_type == AblationType.RESAMPLE:
            t.testing.assert_close(full, clean_out, atol=1e-5, rtol=1e-4)
        assert t.equal(empty, corrupt_out)
    else:
        assert t.equal(full, clean_out)
        if ablation_type == AblationType.RESAMPLE:
            t.testing.assert_close(empty, corrupt_out, atol=1e-5, rtol=1e-4)
        else:
            assert (empty - clean_out).abs().max() > 1e-3


def test_ties_key_outputs_by_real_circuit_size():
    pm = patchable_model(MicroModel(2), factorized=True)
    loader = loader_of(t.tensor([[[1.0, 1.0]]]), t.tensor([[[-1.0, -1.0]]]), 1)
    scores = pm.new_prune_scores(1.0)  # every edge tied
    outs = run_circuits(pm, loader, [0, 5, 13], scores)
    assert sorted(outs) == [0, 13]


def test_edge_counts_util():
    assert edge_counts_util(10, EdgeCounts.ALL) == list(range(11))
    assert edge_counts_util(250, EdgeCounts.LOGARITHMIC) == [
        0,
        *range(1, 10),
        *range(10, 100, 10),
        100,
        200,
        250,
    ]
    assert edge_counts_util(100, [0.0, 0.5, 1.0]) == [0, 50, 100]
    assert edge_counts_util(100, [3, 7], true_edge_count=20) == [3, 7, 20]
    pm = patchable_model(MicroModel(2), factorized=True)
    scores = pm.circuit_prune_scores(
        edge_dict={"B0.1->Resid End": 2.0, "B0.0->B1.0": 2.0, "Resid Start->B1.1": 1.0}
    )
    # Tied groups by descending |score|: {2, 2}, {1}, then the 10 zeros.
    assert edge_counts_util(pm.n_edges, EdgeCounts.GROUPS, scores) == [0, 2, 3, 13]
    assert edge_counts_util(pm.n_edges, None, scores) == [0, 2, 3, 13]
    with pytest.raises(CircuitError, match=r"neither an int in \[0, 100\] nor a fraction"):
        edge_counts_util(100, [1.5])
