"""Official circuits on graphs of the real models' shapes, built on the meta device.

Oracles: hand counts written out below, brute force over the materialised edge set for the
node-based circuits, and the edge counts the reference implementation (AutoCircuit 1.0.1)
is documented to give, where our definitions agree with it. Where they differ (the IOI
output MLPs, the IOI MLP-0-only circuit) the difference is counted by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch as t
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.evaluation.official_circuits.circuits import (
    docstring_node_based_official_edges,
    docstring_true_edges,
    greaterthan_true_edges,
    ioi_head_based_official_edges,
    ioi_true_edges,
    ioi_true_edges_mlp_0_only,
    sports_players_true_edges,
    tracr_reverse_acdc_edges,
    tracr_reverse_true_edges,
    tracr_xproportion_acdc_edges,
    tracr_xproportion_official_edges,
)
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Edge

# word_idxs of the IOI vanilla template as the loader returns them (BOS included): the
# file has IO 1, S1 3, S1+1 4, S2 9, end 13. The KV cache holds BOS and "When", so the
# 13 graph positions start at prompt index 2.
IOI_WORDS = {"IO": 2, "S1": 4, "S1+1": 5, "S2": 10, "end": 14}
IOI_SEQ_LEN, IOI_START = 13, 2


def meta_model(**cfg_kwargs) -> HookedTransformer:
    """A HookedTransformer of real shape with no storage (graph building needs no weights)."""
    cfg = HookedTransformerConfig(n_ctx=1024, normalization_type="LN", **cfg_kwargs)
    with t.device("meta"):
        return HookedTransformer(cfg, move_to_device=False)


def gpt2_small(seq_len: int | None = None, separate_qkv: bool = True) -> PatchableModel:
    model = meta_model(
        n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257,
        act_fn="gelu_new",
    )  # fmt: skip
    return patchable_model(model, True, seq_len=seq_len, separate_qkv=separate_qkv, device="cpu")


def attn_only_4l(seq_len: int | None = None, separate_qkv: bool = True) -> PatchableModel:
    model = meta_model(n_layers=4, n_heads=8, d_model=512, d_head=64, d_vocab=48262, attn_only=True)
    return patchable_model(model, True, seq_len=seq_len, separate_qkv=separate_qkv, device="cpu")


def pythia_2_8b(seq_len: int | None = None, separate_qkv: bool = False) -> PatchableModel:
    model = meta_model(
        n_layers=32, n_heads=32, d_model=2560, d_head=80, d_mlp=10240, d_vocab=50304,
        act_fn="gelu", parallel_attn_mlp=True, positional_embedding_type="rotary",
        rotary_dim=20,
    )  # fmt: skip
    return patchable_model(model, True, seq_len=seq_len, separate_qkv=separate_qkv, device="cpu")


def tracr_model(n_layers: int, seq_len: int | None = 6) -> PatchableModel:
    """The assumed shape of a tracr-compiled model: 1 head and 1 MLP per layer."""
    model = meta_model(
        n_layers=n_layers, n_heads=1, d_model=24, d_head=8, d_mlp=16, d_vocab=6, act_fn="relu"
    )
    return patchable_model(model, True, seq_len=seq_len, separate_qkv=True, device="cpu")


@pytest.fixture(scope="module")
def gpt2() -> PatchableModel:
    return gpt2_small()


@pytest.fixture(scope="module")
def gpt2_tokens() -> PatchableModel:
    return gpt2_small(seq_len=IOI_SEQ_LEN)


def assert_graph_edges(model: PatchableModel, edges: set[Edge]) -> None:
    """Each edge is the graph's edge of that name and position, and no edge was found by
    materialising the graph's edge set."""
    for edge in edges:
        assert model.edge(edge.name, edge.seq_idx) == edge
    assert "edges" not in model.__dict__ and "edge_dict" not in model.__dict__


def names(edges: set[Edge]) -> set[str]:
    return {e.name for e in edges}


# ----------------------------------------------------------------------------------------
# Greater-Than


def test_greaterthan_component_circuit(gpt2: PatchableModel) -> None:
    edges = greaterthan_true_edges(gpt2)
    assert_graph_edges(gpt2, edges)
    # Hand count of the ACDC edge set (heads take Q, K and V):
    embed = 3 * 3 + 4  # embedding -> heads 0.1, 0.3, 0.5 and MLPs 0-3
    output = 6 + 4  # mid heads and MLPs 8-11 -> Resid End
    mlp_chains = 36 + 6  # MLP i -> MLP j for i < j < 9, and among MLPs 8-11
    head_01 = 4 + 6 * 3  # 0.1 -> MLPs 0-3, 0.1 -> mid heads
    heads_0305 = 2 * 6 * 3  # 0.3, 0.5 -> mid heads
    early_mlps = 4 * 6 * 3  # MLPs 0-3 -> mid heads
    mid_to_late = 4 * 4 + 4 + 3  # heads in 5-7 feed MLPs 8-11; 8.11 MLPs 8-11; 9.1 MLPs 9-11
    mlp_to_queries = (5 + 6 + 6 + 7 + 8 + 9) - 4 * 6  # MLP k -> mid head Q, k < layer, new
    expected = (
        embed + output + mlp_chains + head_01 + heads_0305 + early_mlps + mid_to_late
    ) + mlp_to_queries
    assert expected == 235  # the count documented for the reference implementation
    assert len(edges) == expected
    assert all(e.seq_idx is None for e in edges)
    assert {"Resid Start->A0.1.V", "MLP 5->A9.1.Q", "A8.11->MLP 8", "MLP 11->Resid End"} <= names(
        edges
    )
    assert "MLP 5->A9.1.K" not in names(edges)  # past MLP 3, only the queries get MLPs


def test_greaterthan_every_position_at_token_level() -> None:
    model = gpt2_small(seq_len=4)
    edges = greaterthan_true_edges(model, token_positions=True)
    assert_graph_edges(model, edges)
    assert len(edges) == 235 * 4
    assert {e.seq_idx for e in edges if e.name == "A9.1->Resid End"} == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------
# IOI


def test_ioi_component_circuit(gpt2: PatchableModel) -> None:
    edges = ioi_true_edges(gpt2)
    assert_graph_edges(gpt2, edges)
    # The reference gives 739 edges without word_idxs: it bounds the MLPs in front of the
    # output by the END token index (0 when word_idxs is empty), so it has none. Ours has
    # MLPs 9-11 there: heads -> MLPs 9.9, 9.6: 3 each, 10.0: 2; backup 9.0, 9.7: 3 each,
    # 10.1/2/6/10: 2 each, 11.2, 11.9: 1 each; negative 10.7: 2, 11.10: 1 (27), plus
    # MLP 9 -> 11, MLP 10 -> 11 (MLP 9 -> 10 is already in, through S-inhibition ->
    # backup) and MLPs 9-11 -> Resid End.
    heads_to_mlps = (3 + 3 + 2) + (3 + 3 + 4 * 2 + 1 + 1) + (2 + 1)
    assert len(edges) == 739 + heads_to_mlps + 2 + 3 == 771
    assert {"A9.9->MLP 9", "MLP 10->MLP 11", "MLP 11->Resid End"} <= names(edges)
    # A few connections of Wang et al.'s circuit diagram, through the input they name.
    assert {"A2.2->A5.5.K", "A0.1->A7.3.V", "A7.3->A9.9.Q", "A9.9->Resid End"} <= names(edges)
    assert "A2.2->A5.5.Q" not in names(edges)
    assert "A7.3->A9.9.K" not in names(edges)


def test_ioi_mlp_edges_do_not_depend_on_word_idxs(
    gpt2: PatchableModel, gpt2_tokens: PatchableModel
) -> None:
    # The reference's bug: its component circuit has 739 edges without word_idxs and 771
    # with them.
    assert ioi_true_edges(gpt2) == ioi_true_edges(gpt2, word_idxs=IOI_WORDS)
    # At token level, moving END (the reference used it as a layer bound) must not change
    # which MLP edges are in the circuit, only where they are.
    other_words = {"IO": 2, "S1": 4, "S1+1": 5, "S2": 8, "end": 11}
    first = ioi_true_edges(gpt2_tokens, True, IOI_WORDS, IOI_START)
    second = ioi_true_edges(gpt2_tokens, True, other_words, IOI_START)
    mlp_names = {n for n in names(ioi_true_edges(gpt2)) if "MLP" in n}
    assert {n for n in names(first) if "MLP" in n} == mlp_names
    assert {n for n in names(second) if "MLP" in n} == mlp_names
    assert {e.seq_idx for e in second if e.name == "MLP 11->Resid End"} == {11 - IOI_START}


def test_ioi_token_circuit(gpt2_tokens: PatchableModel) -> None:
    edges = ioi_true_edges(gpt2_tokens, True, IOI_WORDS, IOI_START)
    assert_graph_edges(gpt2_tokens, edges)
    # The reference's count on the vanilla template (13 positions after a 2-token
    # prefix); its END index (14) is past the last layer, so its MLP bug does not show.
    assert len(edges) == 869

    def at(name: str) -> set[int | None]:
        return {e.seq_idx for e in edges if e.name == name}

    pos = {word: idx - IOI_START for word, idx in IOI_WORDS.items()}
    assert at("A9.9->Resid End") == {pos["end"]}
    assert at("Resid Start->A2.2.Q") == {pos["S1+1"]}  # previous-token head's query
    assert at("Resid Start->A2.2.K") == {pos["S1"]}
    assert at("A2.2->A5.5.K") == {pos["S1+1"]}  # induction reads it at S1+1
    assert at("A5.5->A7.3.V") == {pos["S2"]}
    assert at("Resid Start->A9.9.V") == {pos["IO"]}
    # An MLP between connected groups sits at every token of the connection's inputs.
    assert at("Resid Start->MLP 0") == {pos[w] for w in ("S1", "S1+1", "S2", "IO", "end")}


def test_ioi_mlp_0_only(gpt2: PatchableModel) -> None:
    edges = ioi_true_edges_mlp_0_only(gpt2)
    assert_graph_edges(gpt2, edges)
    full = ioi_true_edges(gpt2)
    mlp_0_to_other = {e for e in full if e.src.name == "MLP 0" and e.dest.name.startswith("MLP")}
    # MLP 0 -> MLPs 1-10 come in through the input connections (MLP 11 only follows the
    # name movers, which start at layer 9).
    assert names(mlp_0_to_other) == {f"MLP 0->MLP {k}" for k in range(1, 11)}
    # The reference keeps every edge whose name contains "MLP 0" (242 edges), so also
    # these ten, which keep MLPs 1-10 in the circuit.
    assert len(edges) == 242 - len(mlp_0_to_other) == 232
    for edge in edges:
        for node in (edge.src.name, edge.dest.name):
            assert not node.startswith("MLP") or node == "MLP 0"
    assert edges < full


IOI_HEADS = {
    (9, 9), (10, 0), (9, 6),  # name movers
    (10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9),  # backup
    (10, 7), (11, 10),  # negative name movers
    (7, 3), (7, 9), (8, 6), (8, 10),  # S-inhibition
    (5, 5), (5, 8), (5, 9), (6, 9),  # induction
    (0, 1), (0, 10), (3, 0),  # duplicate token
    (2, 2), (4, 11),  # previous token
}  # fmt: skip


def test_ioi_head_based_component_circuit(gpt2: PatchableModel) -> None:
    edges = ioi_head_based_official_edges(gpt2)

    # Hand count: 445 destinations (432 Q/K/V, 12 MLPs, Resid End). The embedding feeds
    # all of them; MLP b feeds the 37 destinations of each later block and Resid End; a
    # head of layer b feeds Q/K/V of later blocks, MLPs b..11 and Resid End.
    def head_fanout(b: int) -> int:
        return 36 * (11 - b) + (12 - b) + 1

    expected = 445 + sum(37 * (11 - b) + 1 for b in range(12))
    expected += sum(head_fanout(layer) for layer, _ in IOI_HEADS)
    assert len(IOI_HEADS) == 26 and expected == 6_540  # the reference's count
    assert len(edges) == expected
    # Brute force over the materialised graph (a different code path).
    fresh = gpt2_small()
    brute = {
        e
        for e in fresh.edges
        if e.src.head_idx is None or (e.src.layer // 2, e.src.head_idx) in IOI_HEADS
    }
    assert names(edges) == names(brute)


def test_ioi_head_based_token_circuit(gpt2_tokens: PatchableModel) -> None:
    edges = ioi_head_based_official_edges(gpt2_tokens, True, IOI_WORDS, IOI_START)
    assert len(edges) == 41_328  # the reference's count (its metric test's constant)
    end, s2, s1_next = (IOI_WORDS[w] - IOI_START for w in ("end", "S2", "S1+1"))
    assert {e.seq_idx for e in edges if e.src.name == "A9.9"} == {end}
    assert {e.seq_idx for e in edges if e.src.name == "A5.5"} == {s2}
    assert {e.seq_idx for e in edges if e.src.name == "A2.2"} == {s1_next}
    assert {e.seq_idx for e in edges if e.src.name == "MLP 4"} == set(range(IOI_SEQ_LEN))
    assert not any(e.src.name == "A1.1" for e in edges)


def test_ioi_head_based_combined_qkv_graph() -> None:
    model = gpt2_small(separate_qkv=False)
    edges = ioi_head_based_official_edges(model)
    # One input per head instead of three: 12 * 12 + 12 + 1 = 157 destinations.
    expected = 157 + sum(13 * (11 - b) + 1 for b in range(12))
    expected += sum(12 * (11 - layer) + (12 - layer) + 1 for layer, _ in IOI_HEADS)
    assert len(edges) == expected


# ----------------------------------------------------------------------------------------
# Docstring


DOC_WORDS = {  # the packaged docstring dataset's word_idxs + 1 (BOS)
    "A_def": 10, "B_def": 12, ",_B": 13, "C_def": 14, "A_doc": 28, "param_2": 35,
    "B_doc": 36, "param_3": 43,
}  # fmt: skip
DOC_SEQ_LEN, DOC_START = 42, 2  # 44 tokens; BOS and "def" are shared by every prompt


def test_docstring_component_circuit() -> None:
    model = attn_only_4l()
    edges = docstring_true_edges(model)
    assert_graph_edges(model, edges)
    # 12 edges into layers 0-2 and 6 into / out of each of 3.0 and 3.6.
    assert len(edges) == 12 + 2 * 6 == 24  # the reference's count
    assert {"A1.4->A3.6.Q", "A2.0->A3.0.K", "Resid Start->A2.0.K"} <= names(edges)


def test_docstring_token_circuit() -> None:
    model = attn_only_4l(seq_len=DOC_SEQ_LEN)
    edges = docstring_true_edges(model, True, DOC_WORDS, DOC_START)
    assert_graph_edges(model, edges)
    # Positions per edge (hand count): into layers 0-2: 2+3+1+1+0+1+1+2+4+2+1+2 = 20;
    # per layer-3 head: output, Q, V (x2), K from 2.0 at one token each, K from 1.2 at 2.
    assert len(edges) == 20 + 2 * (5 + 2) == 34
    ks = {e.seq_idx for e in edges if e.name == "A1.2->A3.0.K"}
    assert ks == {DOC_WORDS["A_doc"] - DOC_START, DOC_WORDS["B_doc"] - DOC_START}
    assert not any(e.name == "Resid Start->A2.0.K" for e in edges)


def test_docstring_node_based_circuit() -> None:
    model = attn_only_4l()
    edges = docstring_node_based_official_edges(model)
    # A head of layer b feeds 3 * 8 * (3 - b) Q/K/V inputs and Resid End; the embedding
    # feeds all 97 destinations. Heads: 0.1, 0.2, 0.4, 0.5; 1.0, 1.2, 1.4; 2.0, 2.3;
    # 3.0, 3.6.
    expected = 97 + sum(n * (24 * (3 - b) + 1) for b, n in enumerate([4, 3, 2, 2]))
    assert expected == len(edges) == 588  # the reference's count


def test_docstring_node_based_token_circuit() -> None:
    model = attn_only_4l(seq_len=DOC_SEQ_LEN)
    edges = docstring_node_based_official_edges(model, True, DOC_WORDS, DOC_START)
    words = {k: v - DOC_START for k, v in DOC_WORDS.items()}
    span = set(range(words["B_def"], words["param_3"] + 1))
    kept = {
        "A1.4": {words[",_B"]},
        "A2.0": {words["C_def"]},
        "A3.0": {words["param_3"]},
        "A3.6": {words["param_3"]},
        "A0.5": {words["B_def"], words["C_def"], words["B_doc"]},
        "A1.2": {words["A_doc"], words["B_doc"]},
        "A0.2": {words["B_doc"]},
        "A0.4": {words["param_3"]},
        "A1.0": span,
        "A0.1": span,
        "A2.3": span,
    }
    brute = {
        e
        for e in attn_only_4l(seq_len=DOC_SEQ_LEN).edges
        if e.src.head_idx is None or e.seq_idx in kept.get(e.src.name, set())
    }
    assert {(e.name, e.seq_idx) for e in edges} == {(e.name, e.seq_idx) for e in brute}


# ----------------------------------------------------------------------------------------
# Sports players


def test_sports_players_token_circuit() -> None:
    # Sports-players prompts: first name token 12, final name token 14, END 18 (+1 BOS);
    # the graph starts at the first name token.
    words = {"first_name_tok": 13, "final_name_tok": 15, "end": 19}
    model = pythia_2_8b(seq_len=7)
    edges = sports_players_true_edges(model, True, words, 13)
    assert_graph_edges(model, edges)
    # Parallel blocks: layer-b heads and MLP b read the same residual stream.
    # Earlier name tokens (2): embedding -> MLP 0, A0.*, A1.* (65); MLP 0 -> A1.* (32);
    # A0.* -> A1.* (1024).
    earlier = 2 * (65 + 32 + 1024)
    # Final name token: embedding -> A0.*, A1.*, MLPs 0-15 (80); A0.* -> A1.*, MLPs 1-15
    # (1024 + 480); A1.* -> MLPs 2-15 (448); MLP 0 -> A1.*, MLPs 1-15 (47); MLP 1 -> MLPs
    # 2-15 (14); MLP k -> MLP j for 2 <= k < j <= 15 (91).
    final = 80 + 1504 + 448 + 47 + 14 + 91
    lookup_to_16_20 = 1 + 64 + 16
    extract = 5 + 6  # 16.20 -> the five heads; the six heads -> Resid End
    assert len(edges) == earlier + final + lookup_to_16_20 + extract == 4_518  # reference
    assert {e.seq_idx for e in edges if e.name == "A16.20->Resid End"} == {19 - 13}
    assert {e.seq_idx for e in edges if e.name == "A0.3->A1.7"} == {0, 1, 2}


def test_sports_players_component_circuit() -> None:
    model = pythia_2_8b()
    edges = sports_players_true_edges(model)
    assert_graph_edges(model, edges)
    # The earlier-token edges are a subset of the final-token ones by name.
    assert len(edges) == 2184 + 81 + 5 + 6


# ----------------------------------------------------------------------------------------
# tracr


def test_tracr_reverse_circuits() -> None:
    model = tracr_model(4)
    # The token-level graph of the reference's tracr-reverse model has 462 edges.
    assert model.n_edges == 462
    true_edges = tracr_reverse_true_edges(model, token_positions=True)
    acdc = tracr_reverse_acdc_edges(model, token_positions=True)
    assert_graph_edges(model, true_edges | acdc)
    # 5 positions: 1-5. The reference's 8 / 40 left out the middle token, whose output
    # head 3.0 also writes (see tests/test_tracr_models.py).
    assert len(true_edges) == 2 * 5 and len(acdc) == 10 * 5
    assert {e.seq_idx for e in true_edges} == {1, 2, 3, 4, 5}
    assert true_edges < acdc
    component = tracr_model(4, seq_len=None)
    assert names(tracr_reverse_true_edges(component)) == {
        "Resid Start->A3.0.V",
        "A3.0->Resid End",
    }
    assert len(tracr_reverse_acdc_edges(component)) == 10


def test_tracr_xproportion_circuits() -> None:
    model = tracr_model(2)
    assert model.n_edges == 138  # the reference's tracr-xproportion token-level graph
    official = tracr_xproportion_official_edges(model, token_positions=True)
    acdc = tracr_xproportion_acdc_edges(model, token_positions=True)
    assert_graph_edges(model, official | acdc)
    assert len(official) == 3 * 5 and len(acdc) == 5 * 5
    assert {e.seq_idx for e in acdc} == {1, 2, 3, 4, 5}
    # With a 1-token prefix removed, position p of the prompt is graph position p - 1.
    shifted = tracr_xproportion_official_edges(tracr_model(2, seq_len=5), True, None, 1)
    assert {e.seq_idx for e in shifted} == {0, 1, 2, 3, 4}


# ----------------------------------------------------------------------------------------
# Errors


def test_wrong_model_shape_names_the_expected_shape() -> None:
    with pytest.raises(CircuitError, match=r"GPT-2 small: 12 layers x 12 heads.*4 layers x 8"):
        ioi_true_edges(attn_only_4l())
    with pytest.raises(CircuitError, match=r"attn-only-4l.*attention-only"):
        docstring_true_edges(tracr_model(4, seq_len=None))
    with pytest.raises(CircuitError, match="parallel attention/MLP"):
        sports_players_true_edges(gpt2_small(separate_qkv=False))
    with pytest.raises(CircuitError, match="TransformerLens HookedTransformer"):
        greaterthan_true_edges(patchable_model(MicroModel(2), factorized=True))


@pytest.mark.parametrize(
    "circuit, make_model",
    [
        (greaterthan_true_edges, lambda: gpt2_small(separate_qkv=False)),
        (ioi_true_edges, lambda: gpt2_small(separate_qkv=False)),
        (sports_players_true_edges, lambda: pythia_2_8b(separate_qkv=True)),
    ],
)
def test_wrong_qkv_split(circuit: Callable[..., set[Edge]], make_model) -> None:
    with pytest.raises(CircuitError, match="separate_qkv="):
        circuit(make_model())


def test_ioi_edge_circuit_needs_factorized_graph() -> None:
    model = meta_model(
        n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257,
        act_fn="gelu_new",
    )  # fmt: skip
    with pytest.raises(CircuitError, match="factorized=True"):
        ioi_true_edges(patchable_model(model, False, device="cpu"))


def test_token_positions_need_a_token_graph(gpt2: PatchableModel) -> None:
    with pytest.raises(CircuitError, match=r"patchable_model\(\.\.\., seq_len="):
        ioi_true_edges(gpt2, True, IOI_WORDS, IOI_START)
    with pytest.raises(CircuitError, match="seq_len"):
        greaterthan_true_edges(gpt2, token_positions=True)


def test_token_positions_need_word_idxs(gpt2_tokens: PatchableModel) -> None:
    with pytest.raises(CircuitError, match=r"missing \['IO', 'S1', 'S1\+1', 'S2', 'end'\]"):
        ioi_true_edges(gpt2_tokens, token_positions=True)
    with pytest.raises(CircuitError, match=r"missing \['end'\]"):
        ioi_head_based_official_edges(gpt2_tokens, True, {"S1+1": 5, "S2": 10})


def test_positions_outside_the_graph(gpt2_tokens: PatchableModel) -> None:
    # word_idxs without BOS and no prefix offset: IO lands before position 0.
    with pytest.raises(CircuitError, match="outside the model's 13 token positions"):
        ioi_true_edges(gpt2_tokens, True, {**IOI_WORDS, "IO": 1}, IOI_START)
    with pytest.raises(CircuitError, match=r"word_idxs\['end'\]=20"):
        ioi_head_based_official_edges(gpt2_tokens, True, {**IOI_WORDS, "end": 20}, IOI_START)
