"""The MicroModel against values worked out by hand.

Head i of a block multiplies its input by row i of [[1, 2], [3, 4]] and the block adds
both heads to the residual stream. Clean input [1, 1]:
  block 0: heads [1, 2] and [3, 4]      -> resid [5, 7]
  block 1: heads [5, 14] and [15, 28]   -> output [25, 49]
The corrupt input [-1, -1] negates everything: output [-25, -49].
"""

from __future__ import annotations

import pytest
import torch as t

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model, set_all_masks
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.types import AblationType

CLEAN = t.tensor([[[1.0, 1.0]]])
CORRUPT = -CLEAN


def edge_patched(pm, edges, inputs=CORRUPT, patch_from=CLEAN):
    with patch_mode(pm, src_ablations(pm, patch_from), edges=edges):
        return pm(inputs)


def test_clean_and_corrupt_outputs():
    pm = patchable_model(MicroModel(2), factorized=True)
    assert pm(CLEAN).tolist() == [[[25.0, 49.0]]]
    assert pm(CORRUPT).tolist() == [[[-25.0, -49.0]]]
    assert pm.n_edges == 13 == len(pm.edges)


@pytest.mark.parametrize(
    "edges, expected",
    [
        # B0.1 writes [3, 4] clean, [-3, -4] corrupt: +[6, 8] at the output.
        (["B0.1->Resid End"], [-19.0, -41.0]),
        # Resid Start->B1.1: B1.1 reads [-5, -7] + [2, 2] = [-3, -5] -> [-9, -20]
        # instead of [-15, -28]: another +[6, 8].
        (["B0.1->Resid End", "Resid Start->B1.1"], [-13.0, -33.0]),
        # B0.0->B1.0: B1.0 reads [-5, -7] + [2, 4] = [-3, -3] -> [-3, -6] instead of
        # [-5, -14]: +[2, 8].
        (["B0.1->Resid End", "Resid Start->B1.1", "B0.0->B1.0"], [-11.0, -25.0]),
    ],
)
def test_edge_patching_by_hand(edges, expected):
    pm = patchable_model(MicroModel(2), factorized=True)
    assert edge_patched(pm, edges).tolist() == [[expected]]


def test_upstream_patch_composes_downstream():
    # Tree patching: clean input, Resid Start->B0.0 ablated with the corrupt input.
    # B0.0 reads [-1, -1] -> [-1, -2]; resid [1, 1] + [-1, -2] + [3, 4] = [3, 3];
    # block 1 heads [3, 6] + [9, 12] -> output [15, 21].
    pm = patchable_model(MicroModel(2), factorized=True)
    out = edge_patched(pm, ["Resid Start->B0.0"], inputs=CLEAN, patch_from=CORRUPT)
    assert out.tolist() == [[[15.0, 21.0]]]


def test_interpolated_mask_is_linear_at_the_output():
    pm = patchable_model(MicroModel(2), factorized=True)
    with patch_mode(pm, src_ablations(pm, CLEAN)):
        pm.patch_masks["output"].data[pm.edge("B0.1->Resid End").patch_idx] = 0.5
        assert pm(CORRUPT).tolist() == [[[-22.0, -45.0]]]
    assert pm.patch_masks["output"].sum() == 0, "masks restored after patch_mode"


def test_all_masks_reproduce_clean_and_corrupt():
    pm = patchable_model(MicroModel(3), factorized=True)
    clean, corrupt = t.randn(4, 3, 2), t.randn(4, 3, 2)
    with patch_mode(pm, src_ablations(pm, corrupt)):
        assert t.equal(pm(clean), pm.wrapped_model(clean))
        set_all_masks(pm, 1.0)
        assert t.allclose(pm(clean), MicroModel(3)(corrupt))


def test_per_position_edges():
    pm = patchable_model(MicroModel(2), factorized=True, seq_len=3)
    assert pm.n_edges == 39
    clean, corrupt = CLEAN.repeat(1, 3, 1), CORRUPT.repeat(1, 3, 1)
    with patch_mode(pm, src_ablations(pm, clean), edges=[pm.edge("B0.1->Resid End", 1)]):
        out = pm(corrupt)
    assert out.tolist() == [[[-25.0, -49.0], [-19.0, -41.0], [-25.0, -49.0]]]
    # A name (not an Edge) covers every position.
    with patch_mode(pm, src_ablations(pm, clean), edges=["B0.1->Resid End"]):
        assert pm(corrupt).tolist() == [[[-19.0, -41.0]] * 3]


def test_per_position_edge_into_a_head():
    # Position 2 only: B1.0 reads [-5, -7] + [2, 4] = [-3, -3] -> +[2, 8] at position 2.
    pm = patchable_model(MicroModel(2), factorized=True, seq_len=3)
    clean, corrupt = CLEAN.repeat(2, 3, 1), CORRUPT.repeat(2, 3, 1)
    out = edge_patched(pm, [pm.edge("B0.0->B1.0", 2)], inputs=corrupt, patch_from=clean)
    assert out[:, 2].tolist() == [[-23.0, -41.0]] * 2
    assert out[:, :2].tolist() == [[[-25.0, -49.0]] * 2] * 2


def test_node_patching_equals_all_outgoing_edges():
    # Patching B0.1 as a node (clean value into a corrupt run): resid after block 0 is
    # [-1, -1] + [-1, -2] + [3, 4] = [1, 1], so block 1 gives [1, 1] + [4, 6] = [5, 7].
    factorized = patchable_model(MicroModel(2), factorized=True)
    outgoing = ["B0.1->B1.0", "B0.1->B1.1", "B0.1->Resid End"]
    assert edge_patched(factorized, outgoing).tolist() == [[[5.0, 7.0]]]
    nodes = patchable_model(MicroModel(2), factorized=False)
    assert nodes.n_edges == 6  # per block: previous residual and two heads -> next residual
    assert edge_patched(nodes, ["B0.1->Resid Post 0"]).tolist() == [[[5.0, 7.0]]]


def test_zero_and_mean_ablations():
    pm = patchable_model(MicroModel(2), factorized=True)
    x = t.tensor([[[1.0, 1.0]], [[3.0, 3.0]]])
    zero = src_ablations(pm, x, AblationType.ZERO)
    assert zero.shape == (5, 2, 1, 2) and not zero.any()
    resample = src_ablations(pm, x, AblationType.RESAMPLE)
    # Sources in src_idx order: input, B0.0, B0.1, B1.0, B1.1 (first prompt by hand).
    assert resample[:, 0, 0].tolist() == [[1, 1], [1, 2], [3, 4], [5, 14], [15, 28]]
    mean = src_ablations(pm, x, AblationType.BATCH_TOKENWISE_MEAN)
    assert t.allclose(mean[:, 1], (resample[:, 0] + resample[:, 1]) / 2)
