"""Graph shapes: node names and edge counts against published and closed-form counts."""

from __future__ import annotations

import pytest
import torch as t
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.engine.graph_utils import patchable_model


def meta_model(**cfg_kwargs) -> HookedTransformer:
    """A HookedTransformer of real shape with no storage (graph building needs no weights)."""
    cfg = HookedTransformerConfig(n_ctx=1024, normalization_type="LN", **cfg_kwargs)
    with t.device("meta"):
        return HookedTransformer(cfg, move_to_device=False)


def gpt2_small() -> HookedTransformer:
    return meta_model(
        n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257,
        act_fn="gelu_new",
    )  # fmt: skip


def closed_form_separate_qkv(n_layers: int, n_heads: int) -> int:
    """Edges with separate Q/K/V: each head's 3 inputs read every earlier source, each MLP
    reads every earlier source, Resid End reads all sources."""
    srcs_before = [1 + (n_heads + 1) * b for b in range(n_layers)]
    qkv = 3 * n_heads * sum(srcs_before)
    mlp = sum(s + n_heads for s in srcs_before)
    return qkv + mlp + 1 + n_layers * (n_heads + 1)


# Published counts for GPT-2 small (AutoCircuit's graph): 32,491 edges with separate
# Q/K/V, 11,611 with one input per head, 180 in the node-level graph.
@pytest.mark.parametrize(
    "factorized, separate_qkv, expected",
    [(True, True, 32_491), (True, False, 11_611), (False, None, 180)],
)
def test_gpt2_small_edge_counts(factorized, separate_qkv, expected):
    pm = patchable_model(gpt2_small(), factorized, separate_qkv=separate_qkv, device="cpu")
    assert pm.n_edges == expected
    assert sum(m.numel() for m in pm.patch_masks.values()) == expected
    if factorized and separate_qkv:
        assert expected == closed_form_separate_qkv(12, 12)


def test_gpt2_small_per_position_graph():
    pm = patchable_model(gpt2_small(), True, seq_len=15, separate_qkv=True, device="cpu")
    assert pm.n_edges == 32_491 * 15 == 487_365
    assert pm.patch_masks["blocks.3.hook_q_input"].shape == (15, 12, 1 + 13 * 3)
    assert pm.patch_masks["blocks.11.hook_resid_post"].shape == (15, 157)


def test_attn_only_4l_edge_count():
    # attn-only-4l (the docstring model): 4 layers x 8 heads, no MLPs: 1,281 edges.
    model = meta_model(n_layers=4, n_heads=8, d_model=512, d_head=64, d_vocab=48262, attn_only=True)
    pm = patchable_model(model, True, separate_qkv=True, device="cpu")
    assert pm.n_edges == 1_281
    # 3 * 8 * (1 + 9 + 17 + 25) Q/K/V edges + 33 into Resid End.
    assert pm.n_edges == 3 * 8 * (1 + 9 + 17 + 25) + 33


def test_parallel_model_edge_count():
    # pythia-70m shape (6 layers x 8 heads, parallel attention/MLP): 3,580 edges; the
    # MLP of a block cannot read that block's heads.
    model = meta_model(
        n_layers=6, n_heads=8, d_model=512, d_head=64, d_mlp=2048, d_vocab=100,
        act_fn="gelu", parallel_attn_mlp=True, positional_embedding_type="rotary",
        rotary_dim=16,
    )  # fmt: skip
    pm = patchable_model(model, True, separate_qkv=True, device="cpu")
    assert pm.n_edges == 3_580
    assert "A2.0->MLP 2" not in {e.name for e in pm.edges}
    assert "A1.0->MLP 2" in {e.name for e in pm.edges}


def test_node_names_and_topological_indices():
    pm = patchable_model(gpt2_small(), True, separate_qkv=True, device="cpu")
    srcs = pm.sorted_srcs
    assert [s.name for s in srcs[:3]] == ["Resid Start", "A0.0", "A0.1"]
    assert srcs[13].name == "MLP 0" and srcs[14].name == "A1.0"
    assert srcs[-1].name == "MLP 11"
    dests = {d.name for d in pm.dests}
    assert {"A0.0.Q", "A11.11.V", "MLP 0", "Resid End"} <= dests
    edge = pm.edge("A1.4->A2.0.V")
    assert edge.patch_idx == (0, 1 + 13 + 4)  # Resid Start, A0.*, MLP 0, then A1.0..A1.4
    assert pm.edge("MLP 3->Resid End").dest.module_name == "blocks.11.hook_resid_post"


def test_edges_materialise_lazily_with_unique_names():
    pm = patchable_model(gpt2_small(), True, separate_qkv=False, device="cpu")
    edges = pm.edges
    assert len(edges) == len({e.name for e in edges}) == 11_611
    scores = pm.circuit_prune_scores(edges=["A0.1->A3.2", "MLP 5->Resid End"])
    assert sum(int(s.sum()) for s in scores.values()) == 2


_MASK_ORDER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import make_tl_model
from auto_circuit.families.micro import MicroModel
from auto_circuit.engine.graph_utils import patchable_model
for pm in (patchable_model(make_tl_model(), True, separate_qkv=True),
           patchable_model(make_tl_model(), False, separate_qkv=False),
           patchable_model(MicroModel(), True)):
    print(list(pm.patch_masks))
"""


def test_masks_are_in_forward_order_in_every_process():
    """``patch_masks`` (and the engine's destination sites) follow the model's module
    order, whatever the hashes of the graph's node sets are: two processes with
    different hash seeds (and, for ``None``, different addresses) list the same order.
    Code that seeds masks by iterating them, or saves and reloads them, relies on it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = _MASK_ORDER_SCRIPT.format(tests=str(Path(__file__).parent))
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    factorized, nodes, micro = (eval(line) for line in outputs[0].splitlines())
    per_block = ["hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"]
    assert factorized == [f"blocks.{b}.{k}" for b in range(3) for k in per_block] + [
        "blocks.2.hook_resid_post"
    ]
    assert nodes == [f"blocks.{b}.hook_resid_{k}" for b in range(3) for k in ("mid", "post")]
    assert micro == ["blocks.0.head_inputs", "blocks.1.head_inputs", "output"]


def test_dests_are_grouped_in_module_order_whatever_the_input_order():
    from conftest import make_tl_model

    from auto_circuit.families.contract import dests_by_module

    model = make_tl_model()
    pm = patchable_model(model, True, separate_qkv=True)
    dests = sorted(pm.dests, key=lambda d: (d.module_name, d.head_idx or 0), reverse=True)
    grouped = dests_by_module(model, dests)  # type: ignore[arg-type]  (any iterable)
    per_block = ["hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"]
    expected = [f"blocks.{b}.{k}" for b in range(3) for k in per_block]
    assert list(grouped) == expected + ["blocks.2.hook_resid_post"]
    for nodes in grouped.values():
        assert [d.head_idx or 0 for d in nodes] == sorted(d.head_idx or 0 for d in nodes)
