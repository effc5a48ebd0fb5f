"""The engine's layers: the reference engine (the definition), the fast engine beside it,
families with and without fast paths, giving the model back, and the package's face.

The oracle suite (tests/test_tl_patching.py, tests/test_micro_model.py, ...) runs on
whichever engine ``AUTO_CIRCUIT_FAST_PATHS`` selects (CI runs it both ways); here the two
engines are compared with each other in one process."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.fast import FastEngine
from auto_circuit.engine.graph_utils import (
    patch_mode,
    patchable_model,
    set_mask_batch_size,
    train_mask_mode,
)
from auto_circuit.engine.reference import ReferenceEngine
from auto_circuit.families import transformer_lens as tl_family
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError

CLEAN = t.tensor([[3, 14, 15, 9, 2, 6], [5, 35, 8, 9, 7, 9]])
CORRUPT = t.tensor([[2, 7, 18, 28, 1, 8], [28, 4, 5, 9, 0, 4]])


def _random_masks(pm, seed: int) -> None:
    gen = t.Generator().manual_seed(seed)
    with t.no_grad():
        for mask in pm.patch_masks.values():
            mask.copy_(t.rand(mask.shape, generator=gen, dtype=mask.dtype))


def _run(pm, grad: bool, per_example: bool, seed: int = 3):
    """Logits and (with ``grad``) every mask's gradient at random fractional masks."""
    patch = src_ablations(pm, CORRUPT)
    batch = CLEAN.shape[0] if per_example else None
    with set_mask_batch_size(pm, batch), train_mask_mode(pm, requires_grad=grad) as masks:
        _random_masks(pm, seed)
        with t.set_grad_enabled(grad), patch_mode(pm, patch):
            out = pm(CLEAN)
            if grad:
                out[:, -1].logsumexp(-1).sum().backward()
        grads = {k: m.grad.clone() for k, m in masks.items() if m.grad is not None}
    return out.detach(), grads


def _without_fast_paths(monkeypatch) -> None:
    """The TransformerLens family as a family that implements only the plain contract."""
    build = tl_family.TransformerLensFamily.build

    def plain_build(self, model, factorized, separate_qkv):
        return dataclasses.replace(build(self, model, factorized, separate_qkv), fast_paths=None)

    monkeypatch.setattr(tl_family.TransformerLensFamily, "build", plain_build)


@pytest.mark.parametrize("seq_len", [None, 6])
@pytest.mark.parametrize("separate_qkv", [True, False])
@pytest.mark.parametrize("grad,per_example", [(False, False), (True, False), (True, True)])
def test_reference_and_fast_engines_agree(seq_len, separate_qkv, grad, per_example, monkeypatch):
    def wrap(fast_paths: bool):
        model = make_tl_model().to(t.float64)
        return patchable_model(
            model, True, seq_len=seq_len, separate_qkv=separate_qkv, fast_paths=fast_paths
        )

    reference, fast = wrap(False), wrap(True)
    assert type(reference.engine) is ReferenceEngine and type(fast.engine) is FastEngine
    ref_out, ref_grads = _run(reference, grad, per_example)
    fast_out, fast_grads = _run(fast, grad, per_example)
    assert (ref_out - make_tl_model().to(t.float64)(CLEAN)).abs().max() > 1e-2
    t.testing.assert_close(fast_out, ref_out, atol=1e-10, rtol=1e-10)
    assert ref_grads.keys() == fast_grads.keys() == (set(ref_grads) if grad else set())
    for name, value in ref_grads.items():
        assert value.abs().max() > 0, name
        t.testing.assert_close(fast_grads[name], value, atol=1e-10, rtol=1e-8)

    # A family with no fast paths gets the same from the fast engine.
    _without_fast_paths(monkeypatch)
    plain = wrap(True)
    assert plain.engine.graph.fast_paths is None
    plain_out, plain_grads = _run(plain, grad, per_example)
    t.testing.assert_close(plain_out, ref_out, atol=1e-10, rtol=1e-10)
    for name, value in ref_grads.items():
        t.testing.assert_close(plain_grads[name], value, atol=1e-10, rtol=1e-8)


def test_micro_model_engines_agree_with_the_hand_computation():
    """The MicroModel family has no fast paths; with input [1, 1] its output is
    [25, 49]. Patching every edge with zero ablation leaves only the input: [1, 1]."""
    x = t.ones(1, 1, 2)
    for fast_paths in (False, True):
        pm = patchable_model(MicroModel(n_layers=2), True, fast_paths=fast_paths)
        assert pm.engine.graph.fast_paths is None
        assert t.equal(pm(x), t.tensor([[[25.0, 49.0]]]))
        zero = t.zeros(len(pm.srcs), 1, 1, 2)
        # Every edge into the output zero-ablated except Resid Start's.
        edges = [e for e in pm.edges if e.dest.name == "Resid End" and e.src.name != "Resid Start"]
        with patch_mode(pm, zero, edges=edges):
            assert t.equal(pm(x), t.tensor([[[1.0, 1.0]]]))


def test_fast_paths_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv("AUTO_CIRCUIT_FAST_PATHS", "0")
    assert type(patchable_model(MicroModel(), True).engine) is ReferenceEngine
    monkeypatch.setenv("AUTO_CIRCUIT_FAST_PATHS", "1")
    assert type(patchable_model(MicroModel(), True).engine) is FastEngine
    monkeypatch.setenv("AUTO_CIRCUIT_FAST_PATHS", "maybe")
    with pytest.raises(CircuitError, match="AUTO_CIRCUIT_FAST_PATHS must be 1 or 0"):
        patchable_model(MicroModel(), True)


def _hooks_of(model: t.nn.Module) -> list[tuple[str, int, int, int]]:
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("fast_paths", [False, True])
def test_remove_gives_back_the_unmodified_model(fast_paths):
    model = make_tl_model()
    before_hooks, before_out = _hooks_of(model), model(CLEAN)
    before_dicts = {name: set(vars(m)) for name, m in model.named_modules()}
    pm = patchable_model(model, True, separate_qkv=True, fast_paths=fast_paths)
    _random_masks(pm, 0)
    with patch_mode(pm, src_ablations(pm, CORRUPT)):
        assert not t.equal(pm(CLEAN), before_out)
    assert _hooks_of(model) != before_hooks
    assert pm.remove() is model
    assert _hooks_of(model) == before_hooks
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before_dicts
    assert t.equal(model(CLEAN), before_out)
    pm.remove()  # harmless twice
    with pytest.raises(CircuitError, match="was removed"):
        pm(CLEAN)
    again = patchable_model(model, True, separate_qkv=False)  # can be wrapped anew
    assert t.equal(again(CLEAN), before_out)


def test_a_patchable_model_is_a_context_manager():
    model = MicroModel()
    x = t.ones(1, 1, 2)
    with patchable_model(model, True) as pm:
        assert pm(x).sum() == 74.0
    assert pm.removed and _hooks_of(model) == _hooks_of(MicroModel())


def test_the_readme_example_needs_one_import():
    import auto_circuit

    for name in auto_circuit.__all__:
        assert getattr(auto_circuit, name) is not None, name
    from auto_circuit import mask_gradient_prune_scores, patchable_model
    from auto_circuit.algorithms.mask_gradient import mask_gradient_prune_scores as deep

    assert mask_gradient_prune_scores is deep
    assert (
        patchable_model
        is importlib.import_module("auto_circuit.engine.graph_utils").patchable_model
    )
    with pytest.raises(AttributeError, match="no attribute 'patchable_modle'"):
        auto_circuit.patchable_modle  # noqa: B018


def test_autocircuit_paths_are_the_moved_modules():
    from auto_circuit.autocircuit_paths import ALIASES, NAMESPACES

    for old, new in ALIASES.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    for name in NAMESPACES:
        importlib.import_module(name)
    # A child of a moved package resolves too, to the same module object.
    deep = "auto_circuit.metrics.official_circuits.circuits.ioi_official"
    assert importlib.import_module(deep) is importlib.import_module(
        "auto_circuit.evaluation.official_circuits.circuits.ioi_official"
    )
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("auto_circuit.utils.no_such_module")


def test_no_module_imports_from_a_later_stage():
    """Stages in pipeline order; a module may import its own stage and earlier ones."""
    import ast
    from pathlib import Path

    import auto_circuit

    order = ["vocabulary", "families", "engine", "data", "algorithms", "evaluation", "figures"]
    order.append("app")
    root = Path(auto_circuit.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] not in order:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "auto_circuit" and len(bits) > 1 and bits[1] in order:
                    if order.index(bits[1]) > order.index(parts[0]):
                        bad.append(f"{path.relative_to(root)} imports {name}")
    assert bad == []


def test_old_module_paths_run_with_python_m():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "auto_circuit.cli", "tasks"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Tracr Reverse" in out.stdout
