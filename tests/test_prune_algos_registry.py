"""Every registered algorithm resolves to a function that accepts its preset."""

from __future__ import annotations

import inspect

import pytest
import torch as t

from auto_circuit.algorithms.registry import PRUNE_ALGOS, prune_algo, run_prune_algos
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError


@pytest.mark.parametrize("algo", PRUNE_ALGOS, ids=lambda a: a.key)
def test_presets_match_signatures(algo):
    signature = inspect.signature(algo.func)
    signature.bind(None, None, None, **algo.kwargs)  # raises on an unknown parameter
    doc = algo.func.__doc__ or ""
    assert any(w in doc for w in ("important", "largest", "|score|")), (
        "docstring states the ranking"
    )


def test_unknown_algorithm_lists_close_matches():
    with pytest.raises(CircuitError, match="No prune algorithm 'ACDc'.*Did you mean 'ACDC'"):
        prune_algo("ACDc")


def test_fast_algorithms_run_and_return_mask_shaped_scores():
    pm = patchable_model(MicroModel(2), factorized=True)
    clean = t.tensor([[[1.0, 1.0]], [[2.0, 1.0]]])
    loader = PromptDataLoader(
        PromptDataset(clean, -clean, t.tensor([[0], [0]]), t.tensor([[1], [1]])), None, 0,
        batch_size=2,
    )  # fmt: skip
    keys = ["Random", "Logit Diff Gradients", "EAP-IG", "Exact Patching", "Act Mag"]
    official = {pm.edge("B0.1->Resid End")}
    results = run_prune_algos(pm, loader, [prune_algo(k) for k in keys], official)
    for scores in results.values():
        assert {k: v.shape for k, v in scores.items()} == {
            k: m.shape for k, m in pm.patch_masks.items()
        }
