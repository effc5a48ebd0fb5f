"""Bad input raises a CircuitError that says what is wrong; state is restored after it."""

from __future__ import annotations

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import (
    mask_fn_mode,
    patch_mode,
    patchable_model,
    set_mask_batch_size,
    train_mask_mode,
)
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError

CLEAN = t.tensor([[[1.0, 1.0]]])


@pytest.fixture
def micro():
    return patchable_model(MicroModel(2), factorized=True)


def assert_clean_state(pm) -> None:
    state = pm.engine.state
    assert not state.patch_mode and state.patch_src_outs is None and state.mask_fn is None
    assert not state.training and not state.outputs
    assert all(not m.requires_grad and not m.any() for m in pm.patch_masks.values())
    assert pm(CLEAN).tolist() == [[[25.0, 49.0]]]


def test_unknown_edge_name_lists_close_matches(micro):
    with pytest.raises(CircuitError, match=r"No source node 'B0\.2'.*Did you mean 'B0\.[01]'"):
        micro.edge("B0.2->Resid End")
    with pytest.raises(CircuitError, match=r"No destination node 'Resid Ends'.*'Resid End'"):
        micro.circuit_prune_scores(edges=["B0.1->Resid Ends"])
    with pytest.raises(CircuitError, match="not of the form 'SRC->DEST'"):
        micro.edge("B0.1 to Resid End")


def test_edge_between_unconnected_nodes(micro):
    with pytest.raises(CircuitError, match=r"B1\.0 \(layer 2\) does not feed B0\.1 \(layer 1\)"):
        micro.edge("B1.0->B0.1")


def test_unknown_edge_in_patch_mode_restores_masks(micro):
    with pytest.raises(CircuitError, match="No source node"):
        with patch_mode(micro, src_ablations(micro, -CLEAN), edges=["B0.1->Resid End", "X->Y"]):
            pass
    assert_clean_state(micro)


def test_unsupported_model_lists_families():
    with pytest.raises(
        CircuitError, match=r"(?s)Unsupported model type .*Linear.*micro.*transformer_lens"
    ):
        patchable_model(t.nn.Linear(2, 2), factorized=True)


def test_transformer_needs_separate_qkv():
    with pytest.raises(CircuitError, match="separate_qkv must be True or False"):
        patchable_model(make_tl_model(), factorized=True)


def test_unsupported_transformer_configuration():
    gqa = make_tl_model(n_key_value_heads=2)
    with pytest.raises(CircuitError, match="grouped-query attention"):
        patchable_model(gqa, factorized=True, separate_qkv=True)


def test_unfactorized_parallel_model_is_refused():
    with pytest.raises(CircuitError, match="parallel attention.*factorized=True"):
        patchable_model(make_tl_model(parallel_attn_mlp=True), factorized=False)


def test_deep_copies(micro):
    """A PatchableModel refuses to be deep-copied (its hooks would still belong to the
    original); a deep copy of a wrapped transformer computes with its own weights."""
    import copy

    with pytest.raises(CircuitError, match="cannot be deep-copied"):
        copy.deepcopy(micro)
    model, reference = make_tl_model(), make_tl_model()
    patchable_model(model, True, separate_qkv=True)
    duplicate = copy.deepcopy(model)
    with t.no_grad():
        for m in (duplicate, reference):
            m.blocks[0].attn.W_Q.mul_(3.0)
            m.blocks[1].attn.W_V.mul_(0.5)
    x = t.randint(0, 50, (2, 5))
    assert (reference(x) - model(x)).abs().max() > 1e-3
    t.testing.assert_close(duplicate(x), reference(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 0}, "seq_len must be a positive int"),
        ({"slice_output": "last"}, "slice_output must be None, 'last_seq' or 'not_first_seq'"),
    ],
)
def test_bad_patchable_model_arguments(kwargs, message):
    with pytest.raises(CircuitError, match=message):
        patchable_model(MicroModel(2), factorized=True, **kwargs)


def test_wrong_sequence_length_for_a_per_position_graph():
    pm = patchable_model(MicroModel(2), factorized=True, seq_len=3)
    patch = src_ablations(pm, CLEAN.repeat(1, 2, 1))
    with pytest.raises(CircuitError, match="seq_len=3, but this input has 2 token positions"):
        with patch_mode(pm, patch, edges=["B0.1->Resid End"]):
            pm(-CLEAN.repeat(1, 2, 1))
    assert not pm.engine.state.patch_mode and not pm.patch_masks["output"].any()


def test_patch_values_of_the_wrong_shape(micro):
    with pytest.raises(
        CircuitError, match=r"patch_src_outs must be \[n_src=5, batch, seq, d_model\]"
    ):
        with patch_mode(micro, t.zeros(4, 1, 1, 2)):
            pass
    patch = src_ablations(micro, CLEAN.repeat(3, 2, 1))
    with pytest.raises(CircuitError, match=r"\[batch, seq, d_model\] = \[3, 2, 2\].*\[1, 1, 2\]"):
        with patch_mode(micro, patch, edges=["B0.1->Resid End"]):
            micro(-CLEAN)
    assert_clean_state(micro)


def test_patch_values_on_another_device(micro):
    with pytest.raises(CircuitError, match="patch_src_outs is on meta but the masks are on cpu"):
        with patch_mode(micro, t.zeros(5, 1, 1, 2, device="meta")):
            pass


def test_bad_mask_function(micro):
    with pytest.raises(CircuitError, match="mask_fn must be None, 'hard_concrete' or 'sigmoid'"):
        with mask_fn_mode(micro, "relu"):  # type: ignore[arg-type]
            pass


def test_every_context_manager_restores_state_on_exception(micro):
    patch = src_ablations(micro, -CLEAN)  # batch 1: broadcasts over any batch
    with pytest.raises(RuntimeError, match="boom"):
        with train_mask_mode(micro), mask_fn_mode(micro, "sigmoid", dropout_p=0.5):
            with set_mask_batch_size(micro, 4), patch_mode(micro, patch):
                micro.patch_masks["output"].data.fill_(3.0)
                assert micro.patch_masks["output"].shape == (4, 5)
                with pytest.raises(CircuitError, match="batch size 4 but the input has 1 prompts"):
                    micro(CLEAN)
                micro(CLEAN.repeat(4, 1, 1))
                raise RuntimeError("boom")
    assert_clean_state(micro)
    assert micro.patch_masks["output"].shape == (5,)


def test_per_example_masks_give_per_example_gradients(micro):
    clean = t.tensor([[[1.0, 1.0]], [[2.0, 3.0]]])
    with set_mask_batch_size(micro, 2), train_mask_mode(micro) as masks:
        with patch_mode(micro, src_ablations(micro, -clean)):
            micro(clean)[:, 0, 0].sum().backward()
        grad = masks["output"].grad
        assert grad is not None and grad.shape == (2, 5)
        # d out[b, 0] / d mask[b, src] = patch - clean of that source's first element.
        expected = (
            src_ablations(micro, -clean)[:, :, 0, 0] - src_ablations(micro, clean)[:, :, 0, 0]
        )
        t.testing.assert_close(grad, expected.T)


def test_sigmoid_mask_function_interpolates(micro):
    with mask_fn_mode(micro, "sigmoid"), patch_mode(micro, src_ablations(micro, -CLEAN)):
        # sigmoid(0) = 0.5 on every edge, including Resid Start->Resid End.
        half = micro(CLEAN)
    with patch_mode(micro, src_ablations(micro, -CLEAN)):
        for mask in micro.patch_masks.values():
            mask.data.fill_(0.5)
        t.testing.assert_close(half, micro(CLEAN))
