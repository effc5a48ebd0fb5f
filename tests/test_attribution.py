"""Attribution algorithms against independent oracles."""

from __future__ import annotations

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.algorithms.eap_ig import eap_ig_prune_scores
from auto_circuit.algorithms.edge_attribution_patching import (
    edge_attribution_patching_prune_scores,
)
from auto_circuit.algorithms.exact_patching import exact_patching_prune_scores
from auto_circuit.algorithms.mask_gradient import (
    answer_metric,
    mask_gradient_per_example_scores,
    mask_gradient_prune_scores,
)
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model, set_all_masks
from auto_circuit.families.micro import MicroModel


def token_loader(n: int = 6, batch_size: int = 3, seq: int = 6, seed: int = 0) -> PromptDataLoader:
    gen = t.Generator().manual_seed(seed)
    clean = t.randint(0, 50, (n, seq), generator=gen)
    corrupt = t.randint(0, 50, (n, seq), generator=gen)
    answers = t.randint(0, 50, (n, 2), generator=gen)  # two answers per prompt
    wrong = t.randint(0, 50, (n, 1), generator=gen)
    return PromptDataLoader(
        PromptDataset(clean, corrupt, answers, wrong), None, 0, batch_size=batch_size
    )


def assert_scores_close(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for name in a:
        t.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize(
    "grad_function, answer_function",
    [("logit", "avg_diff"), ("prob", "avg_val"), ("logprob", "avg_diff"), ("logit_exp", "avg_val")],
)
@pytest.mark.parametrize("separate_qkv", [True, False])
def test_mask_gradient_equals_activation_gradient_eap(grad_function, answer_function, separate_qkv):
    pm = patchable_model(make_tl_model(), True, slice_output="last_seq", separate_qkv=separate_qkv)
    loader = token_loader()
    fast = mask_gradient_prune_scores(
        pm, loader, None, grad_function, answer_function, mask_val=0.0
    )
    reference = edge_attribution_patching_prune_scores(
        pm, loader, None, grad_function, answer_function
    )
    assert max(s.abs().max() for s in reference.values()) > 1e-3
    assert_scores_close(fast, reference)
    assert not any(m.requires_grad or m.any() for m in pm.patch_masks.values())


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
@pytest.mark.parametrize("separate_qkv", [True, False])
def test_mask_gradient_at_zero_masks_for_every_normalisation(norm, separate_qkv):
    """At all-zero masks the q/k/v deltas get their gradient in closed form (no rebuild);
    it equals the hook-based EAP and the general rebuild just off zero."""
    model = make_tl_model(normalization_type=norm, positional_embedding_type="rotary", rotary_dim=4)
    pm = patchable_model(model, True, slice_output="last_seq", separate_qkv=separate_qkv)
    loader = token_loader()
    at_zero = mask_gradient_prune_scores(pm, loader, None, "logprob", "avg_diff", mask_val=0.0)
    reference = edge_attribution_patching_prune_scores(pm, loader, None, "logprob", "avg_diff")
    scale = max(float(s.abs().max()) for s in reference.values())
    assert scale > 1e-3
    # float32 rounding relative to the largest score (up to ~20 here, without norm weights)
    assert_scores_close(at_zero, reference, atol=2e-5 * scale)
    off_zero = mask_gradient_prune_scores(pm, loader, None, "logprob", "avg_diff", mask_val=1e-9)
    assert_scores_close(at_zero, off_zero, atol=2e-5 * scale)


def test_mask_gradient_equals_eap_per_position_and_node_graph():
    loader = token_loader()
    for kwargs in ({"factorized": True, "seq_len": 6, "separate_qkv": True}, {"factorized": False}):
        pm = patchable_model(make_tl_model(), slice_output="last_seq", **kwargs)
        fast = mask_gradient_prune_scores(pm, loader, None, "logit", "avg_diff", mask_val=0.0)
        assert_scores_close(fast, edge_attribution_patching_prune_scores(pm, loader))


def test_exact_patching_equals_one_forward_per_edge():
    pm = patchable_model(
        make_tl_model(n_layers=2), True, slice_output="last_seq", separate_qkv=True
    )
    loader = token_loader()
    scores = exact_patching_prune_scores(pm, loader, edges_per_forward=7, show_progress=False)
    for edge in list(pm.edges)[::5]:
        total = 0.0
        for batch in loader:
            with t.no_grad():
                clean = answer_metric(pm(batch.clean)[:, -1], batch, "avg_diff")
                with patch_mode(pm, src_ablations(pm, batch.corrupt), edges=[edge]):
                    patched = answer_metric(pm(batch.clean)[:, -1], batch, "avg_diff")
            total += float(clean - patched)
        assert float(edge.prune_score(scores)) == pytest.approx(total, abs=1e-5)


def total_effect(pm, loader) -> float:
    """metric(clean) - metric(every edge ablated) summed over batches."""
    total = 0.0
    with t.no_grad():
        for batch in loader:
            clean = answer_metric(pm(batch.clean)[pm.out_slice], batch, "avg_diff")
            with patch_mode(pm, src_ablations(pm, batch.corrupt)):
                set_all_masks(pm, 1.0)
                ablated = answer_metric(pm(batch.clean)[pm.out_slice], batch, "avg_diff")
            total += float(clean - ablated)
    return total


def test_integrated_gradients_complete_as_steps_grow():
    pm = patchable_model(make_tl_model(), True, slice_output="last_seq", separate_qkv=True)
    loader = token_loader()
    target = total_effect(pm, loader)
    errors = []
    for steps in (1, 4, 16):
        scores = mask_gradient_prune_scores(pm, loader, integrated_grad_samples=steps)
        errors.append(abs(sum(float(s.sum()) for s in scores.values()) - target))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.02 * abs(target)


def test_eap_ig_inputs_is_complete_on_a_linear_model():
    # The MicroModel is linear in its input, so every gradient is constant along the
    # path and EAP-IG (any steps) equals EAP equals the exact per-edge effect.
    pm = patchable_model(MicroModel(2), factorized=True)
    clean = t.tensor([[[1.0, 1.0]], [[2.0, 1.0]]])
    loader = PromptDataLoader(
        PromptDataset(clean, -clean, t.tensor([[0], [0]]), t.tensor([[1], [1]])),
        None,
        0,
        batch_size=2,
    )
    exact = exact_patching_prune_scores(pm, loader, show_progress=False)
    for method in ("inputs", "clean-corrupted", "activations"):
        assert_scores_close(eap_ig_prune_scores(pm, loader, method=method, steps=3), exact)


@pytest.mark.parametrize("steps", [1, 4])
def test_eap_ig_inputs_equals_hook_implementation(steps):
    # Oracle: TransformerLens hooks replace the embeddings by corrupt + a (clean - corrupt)
    # and read activation gradients at every destination hook (no patching engine).
    pm = patchable_model(make_tl_model(), True, slice_output="last_seq", separate_qkv=True)
    loader = token_loader()
    ours = eap_ig_prune_scores(pm, loader, method="inputs", steps=steps)
    oracle = edge_attribution_patching_prune_scores(pm, loader, input_interpolation_steps=steps)
    assert_scores_close(ours, oracle)
    # With one step (a = 1, the clean run) EAP-IG is plain EAP.
    if steps == 1:
        assert_scores_close(ours, mask_gradient_prune_scores(pm, loader, mask_val=0.0))


def test_eap_ig_clean_corrupted_averages_the_endpoint_gradients():
    # Oracle: the gradient on the corrupt input is plain EAP with clean and corrupt
    # swapped (which also flips the sign of corrupt - clean).
    pm = patchable_model(make_tl_model(), True, slice_output="last_seq", separate_qkv=True)
    loader = token_loader()
    swapped = PromptDataLoader(
        PromptDataset(
            loader.dataset.corrupt_prompts,
            loader.dataset.clean_prompts,
            loader.dataset.answers,
            loader.dataset.wrong_answers,
        ),
        None,
        0,
        batch_size=3,
    )
    at_clean = edge_attribution_patching_prune_scores(pm, loader)
    at_corrupt = edge_attribution_patching_prune_scores(pm, swapped)
    expected = {k: (at_clean[k] - at_corrupt[k]) / 2 for k in at_clean}
    ours = eap_ig_prune_scores(pm, loader, method="clean-corrupted")
    assert max((expected[k] - at_clean[k]).abs().max() for k in ours) > 1e-4
    assert_scores_close(ours, expected)


def test_per_example_scores_equal_single_prompt_runs():
    pm = patchable_model(make_tl_model(), True, slice_output="last_seq", separate_qkv=True)
    loader = token_loader(n=3, batch_size=3)
    (per_example,) = mask_gradient_per_example_scores(pm, loader).values()
    ds = loader.dataset
    for i in range(3):
        single = PromptDataLoader(
            PromptDataset(
                ds.clean_prompts[i : i + 1],
                ds.corrupt_prompts[i : i + 1],
                ds.answers[i : i + 1],
                ds.wrong_answers[i : i + 1],
            ),
            None,
            0,
            batch_size=1,
        )
        oracle = mask_gradient_prune_scores(pm, single, mask_val=0.0)
        assert_scores_close({k: v[i] for k, v in per_example.items()}, oracle)
    # Other functions still see ordinary masks afterwards.
    assert all(
        m.shape == pm.engine.mask_shape(pm.engine.dest_sites[n]) for n, m in pm.patch_masks.items()
    )
    mask_gradient_prune_scores(pm, loader, mask_val=0.0)
