"""The front doors other layers use (``PatchableModel``'s graph queries and the family
capability ``BlockForward``), against independent expectations."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import shape_checks
import torch as t
from conftest import make_tl_model

from auto_circuit.algorithms.eap_ig import eap_ig_prune_scores
from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError

PACKAGE = Path(__file__).parents[1] / "auto_circuit"


def tl_model(seq_len: int | None = None, separate_qkv: bool = True):
    model = make_tl_model(n_layers=2, n_heads=2, d_model=8)
    return model, patchable_model(model, True, seq_len=seq_len, separate_qkv=separate_qkv)


# ---- graph queries -------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [None, 5])
@pytest.mark.parametrize("separate_qkv", [True, False])
def test_mask_sites_describe_the_masks(seq_len, separate_qkv):
    _, pm = tl_model(seq_len, separate_qkv)
    assert set(pm.mask_sites) == set(pm.patch_masks)
    for name, mask in pm.patch_masks.items():
        site = pm.mask_site(name)
        assert site.module_name == name
        assert site.shape == tuple(mask.shape)
        assert site.shape[-1] == len(site.in_srcs) == len(pm.srcs_into(name))
        heads = sorted(d.head_idx for d in pm.dests if d.module_name == name)
        assert site.n_heads == (len(heads) if heads != [None] else None)
        assert site.hook_modules and all(isinstance(h, str) for h in site.hook_modules)


def test_in_srcs_of_a_second_layer_query_are_the_first_layer_sources():
    _, pm = tl_model()
    query = pm.dest_node("A1.0.Q")
    first_layer = {"Resid Start", "A0.0", "A0.1", "MLP 0"}
    assert {s.name for s in pm.srcs_into(query.module_name)} == first_layer
    assert pm.mask_site(query.module_name).in_srcs == range(len(first_layer))
    for src in pm.srcs:
        assert pm.feeds(src, query) == (src.name in first_layer)
    assert pm.feeds(pm.src_node("A1.1"), pm.dest_node("MLP 1"))
    assert not pm.feeds(pm.src_node("MLP 1"), pm.dest_node("MLP 1"))


def test_source_sites_cover_every_source_once_in_order():
    _, pm = tl_model()
    covered = [i for site in pm.source_sites for i in site.src_idxs]
    assert covered == list(range(len(pm.srcs)))
    for site in pm.source_sites:
        for i in site.src_idxs:
            assert pm.sorted_srcs[i].module_name == site.module_name


def test_unknown_mask_site_lists_close_matches():
    _, pm = tl_model()
    with pytest.raises(CircuitError, match="No destination mask 'blocks.1.hook_q_inpt'.*Did you"):
        pm.mask_site("blocks.1.hook_q_inpt")


def test_is_patching_only_inside_patch_mode():
    _, pm = tl_model()
    tokens = t.randint(0, 50, (2, 4))
    assert not pm.is_patching
    with patch_mode(pm, src_ablations(pm, tokens)):
        assert pm.is_patching
    assert not pm.is_patching


# ---- the BlockForward capability -----------------------------------------------------


def test_block_forward_reproduces_the_full_forward():
    model, pm = tl_model()
    forward = pm.block_forward("this test")
    tokens = t.randint(0, 50, (3, 5), generator=t.Generator().manual_seed(1))
    with t.no_grad():
        with forward.recording_block_inputs() as recorded:
            logits = pm(tokens)
        assert sorted(recorded) == list(range(forward.n_blocks)) == [0, 1]
        _, cache = model.run_with_cache(tokens)
        t.testing.assert_close(recorded[0].resid, cache[forward.input_hook])
        t.testing.assert_close(recorded[1].resid, cache["blocks.1.hook_resid_pre"])
        for block, inp in recorded.items():
            t.testing.assert_close(forward.run_from_block(inp.resid, block), logits)
            final = forward.run_from_block(inp.resid, block, stop_before_unembed=True)
            assert forward.unembeds_per_position
            t.testing.assert_close(forward.unembed(final[:, -1]), logits[:, -1])
        resid, kwargs = pm.embed(tokens, need="this test")
        t.testing.assert_close(resid, cache[forward.input_hook])
        t.testing.assert_close(pm(resid, **kwargs), logits)


def test_block_of_names_the_block_holding_a_module():
    _, pm = tl_model()
    forward = pm.block_forward("this test")
    assert forward.block_of("blocks.1.attn.hook_z") == 1
    assert forward.block_of("blocks.0.hook_mlp_out") == 0
    assert forward.block_of("embed") is None
    assert forward.block_of("ln_final") is None


def test_a_family_without_block_forward_says_what_needs_it():
    pm = patchable_model(MicroModel(2), factorized=True)
    assert not pm.has_block_forward
    with pytest.raises(CircuitError, match="ACDC's block skipping needs a block forward.*micro"):
        pm.block_forward("ACDC's block skipping")
    # EAP-IG's input path on token inputs needs the embedding from the capability.
    tokens = t.tensor([[[1, 1]], [[2, 0]]])
    dataset = PromptDataset(
        tokens, -tokens, t.zeros(2, 1, dtype=t.long), t.ones(2, 1, dtype=t.long)
    )
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=2)
    # Token ids are the wrong input for the MicroModel (it takes floats): the error says so.
    with (
        shape_checks.off(),
        pytest.raises(
            CircuitError,
            match="EAP-IG's path over the inputs.*the micro family has no block forward",
        ),
    ):
        eap_ig_prune_scores(pm, loader, method="inputs")


# ---- python -O ---------------------------------------------------------------------------

_PURE_CALLS = {"isinstance", "len", "all", "any", "bool", "int", "float", "tuple", "set", "list"}


def test_no_library_assert_calls_anything_but_pure_builtins():
    """``python -O`` strips asserts: none may do work (``assert self.decide(...)``)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Assert):
                continue
            for call in ast.walk(node.test):
                if isinstance(call, ast.Call) and not (
                    isinstance(call.func, ast.Name) and call.func.id in _PURE_CALLS
                ):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, f"asserts that call functions: {offenders}"
