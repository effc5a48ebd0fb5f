"""PatchableModel's pass-throughs and prune-score helpers."""

from __future__ import annotations

import torch as t
from conftest import make_tl_model
from tokenizers_for_tests import make_word_tokenizer

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import (
    patch_mode,
    patchable_model,
    set_masks_from_prune_scores,
)
from auto_circuit.families.micro import MicroModel

WORDS = ["When", "Mary", "and", "John", "went", "to", "the", "store", ",", "gave", "a", "drink"]


def test_tokenizer_pass_throughs():
    from transformer_lens import HookedTransformer

    tokenizer = make_word_tokenizer(WORDS)
    model = HookedTransformer(make_tl_model(d_vocab=len(tokenizer)).cfg, tokenizer=tokenizer)
    pm = patchable_model(model, True, separate_qkv=True)
    tokens = pm.to_tokens("When Mary and John went to the store")
    assert tokens.shape == (1, 9)  # BOS + 8 words
    assert tokens[0, 0].item() == tokenizer.bos_token_id
    expected = ["<|endoftext|>", "Mary", " gave", " a", " drink"]
    assert pm.to_str_tokens("Mary gave a drink") == expected
    assert pm.to_string(tokens[0, 1:]).split() == "When Mary and John went to the store".split()
    assert pm.tokenizer is tokenizer and pm.cfg is model.cfg and pm.blocks is model.blocks
    logits, cache = pm.run_with_cache(tokens)
    assert t.equal(logits, model(tokens)) and "blocks.0.attn.hook_z" in cache


def test_prune_score_helpers_round_trip():
    pm = patchable_model(MicroModel(2), factorized=True)
    scores = pm.circuit_prune_scores(edge_dict={"B0.1->Resid End": 0.5, "Resid Start->B1.0": 2.0})
    assert scores["output"].tolist() == [0.0, 0.0, 0.5, 0.0, 0.0]
    # B1.0 is head 0 of blocks.1.head_inputs, fed by sources 0..2.
    assert scores["blocks.1.head_inputs"].tolist() == [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    as_bool = pm.circuit_prune_scores(edges=["B0.1->Resid End"], bool=True)
    assert as_bool["output"].dtype == t.bool and int(as_bool["output"].sum()) == 1
    set_masks_from_prune_scores(pm, scores)
    assert pm.current_patch_masks_as_prune_scores()["output"].tolist() == [0, 0, 0.5, 0, 0]
    assert {k: v.shape for k, v in pm.new_prune_scores(1.0).items()} == {
        k: v.shape for k, v in scores.items()
    }
    for mask in pm.patch_masks.values():
        mask.data.zero_()


def test_edge_objects_agree_with_mask_layout():
    pm = patchable_model(make_tl_model(), True, separate_qkv=True, seq_len=5)
    assert len(pm.edges) == pm.n_edges
    for edge in list(pm.edges)[::97]:
        single = pm.circuit_prune_scores(edges=[edge])
        assert sum(int(s.sum()) for s in single.values()) == 1
        assert single[edge.dest.module_name][edge.patch_idx] == 1
        assert pm.edge(edge.name, edge.seq_idx) == edge
    by_name = pm.circuit_prune_scores(edges=["A0.1->A2.3.K"])
    assert int(by_name["blocks.2.hook_k_input"].sum()) == 5, "a name covers every position"


def test_masks_follow_the_requested_device():
    pm = patchable_model(MicroModel(2), factorized=True, device="meta")
    assert all(m.device.type == "meta" for m in pm.patch_masks.values())
    assert patchable_model(MicroModel(2), factorized=True).device.type == "cpu"


def test_patch_mode_edges_are_scoped():
    pm = patchable_model(MicroModel(2), factorized=True)
    clean = t.tensor([[[1.0, 1.0]]])
    with patch_mode(pm, src_ablations(pm, clean), edges=["B0.1->Resid End"]):
        assert pm.patch_masks["output"].sum() == 1
    assert pm.patch_masks["output"].sum() == 0
