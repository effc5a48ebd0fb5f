"""Wrapping as users do it: one model wrapped several times, a PatchableModel wrapped
again with other settings, and every wrapper removed in any order."""

from __future__ import annotations

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model
from auto_circuit.families.micro import MicroModel

CLEAN = t.tensor([[3, 14, 15, 9, 2, 6], [5, 35, 8, 9, 7, 9]])
CORRUPT = t.tensor([[2, 7, 18, 28, 1, 8], [28, 4, 5, 9, 0, 4]])
SETTINGS = [
    {"factorized": True, "separate_qkv": True},
    {"factorized": False},
    {"factorized": True, "separate_qkv": False, "seq_len": 6},
]


def _masks(pm, seed: int) -> None:
    gen = t.Generator().manual_seed(seed)
    with t.no_grad():
        for mask in pm.patch_masks.values():
            mask.copy_(t.rand(mask.shape, generator=gen))


def _patched(pm, grad: bool = False) -> t.Tensor:
    with t.set_grad_enabled(grad), patch_mode(pm, src_ablations(pm, CORRUPT)):
        return pm(CLEAN).detach()


def _hooks(model: t.nn.Module) -> list:
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m)))
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("fast_paths", [False, True])
def test_wrappers_of_one_model_each_act_only_in_their_own_contexts(fast_paths):
    model = make_tl_model()
    bare = model(CLEAN)
    wrappers = [patchable_model(model, fast_paths=fast_paths, **kw) for kw in SETTINGS]
    for i, pm in enumerate(wrappers):
        _masks(pm, i)
    fresh = []  # each setting on its own model, with the same masks
    for i, kw in enumerate(SETTINGS):
        alone = patchable_model(make_tl_model(), fast_paths=fast_paths, **kw)
        _masks(alone, i)
        fresh.append(_patched(alone))
    for _ in range(2):  # interleaved, twice over
        for pm, expected in zip(wrappers, fresh, strict=True):
            got = _patched(pm)
            assert (got - bare).abs().max() > 1e-3
            t.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            assert t.equal(pm(CLEAN), bare), "outside its patch mode a wrapper is the model"
    assert t.equal(model(CLEAN), bare)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
def test_removing_wrappers_in_any_order_gives_the_model_back(order):
    model = make_tl_model()
    before, bare = _hooks(model), model(CLEAN)
    wrappers = [patchable_model(model, **kw) for kw in SETTINGS]
    for i, pm in enumerate(wrappers):
        _masks(pm, i)
    for k, i in enumerate(order):
        wrappers[i].remove()
        for j in order[k + 1 :]:  # the others still patch as before
            alone = patchable_model(make_tl_model(), **SETTINGS[j])
            _masks(alone, j)
            t.testing.assert_close(_patched(wrappers[j]), _patched(alone), atol=1e-5, rtol=1e-4)
    assert _hooks(model) == before
    assert t.equal(model(CLEAN), bare)


def test_a_patchable_model_is_wrapped_anew_with_new_settings():
    """The seed tutorial calls patchable_model on its PatchableModel to build the
    token-position graph."""
    pm = patchable_model(make_tl_model(), True, separate_qkv=True)
    per_position = patchable_model(pm, True, seq_len=6, separate_qkv=True)
    assert per_position.wrapped_model is pm.wrapped_model
    assert per_position.seq_len == 6 and pm.seq_len is None
    assert per_position.n_edges == 6 * pm.n_edges
    edge = "A0.1->A2.3.K"
    with patch_mode(pm, src_ablations(pm, CORRUPT), edges=[edge]):
        by_edge = pm(CLEAN)
    positions = [per_position.edge(edge, i) for i in range(6)]
    with patch_mode(per_position, src_ablations(per_position, CORRUPT), edges=positions):
        t.testing.assert_close(per_position(CLEAN), by_edge, atol=1e-5, rtol=1e-4)


def test_separate_qkv_is_accepted_and_ignored_for_the_micro_model():
    x = t.ones(1, 1, 2)
    for separate_qkv in (None, True, False):
        pm = patchable_model(MicroModel(), True, separate_qkv=separate_qkv)
        assert pm.separate_qkv is None and t.equal(pm(x), t.tensor([[[25.0, 49.0]]]))
