"""Edge patching in HookedTransformers against the same intervention written
independently with TransformerLens' own hooks on an unwrapped copy of the model.

The oracle turns on TransformerLens' per-head flags (``use_attn_result``,
``use_split_qkv_input``/``use_attn_in``, ``use_hook_mlp_in``) and adds
``source(corrupt) - source(clean)`` to the destination's input hook: a path that shares
no code with the engine, which keeps those flags off.
"""

from __future__ import annotations

import pytest
import torch as t
from conftest import make_tl_model

from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patch_mode, patchable_model, set_all_masks
from auto_circuit.vocabulary.types import AblationType

SEQ = 7


def tokens(seed: int, batch: int = 3, d_vocab: int = 50) -> t.Tensor:
    return t.randint(0, d_vocab, (batch, SEQ), generator=t.Generator().manual_seed(seed))


CLEAN, CORRUPT = tokens(1), tokens(2)


def flagged_oracle(model_kwargs: dict, separate_qkv: bool):
    """An unwrapped copy with TransformerLens' per-head and MLP-input hooks turned on."""
    oracle = make_tl_model(**model_kwargs)
    oracle.set_use_attn_result(True)
    if not oracle.cfg.attn_only:
        oracle.set_use_hook_mlp_in(True)
    if separate_qkv:
        oracle.set_use_split_qkv_input(True)
    else:
        oracle.set_use_attn_in(True)
    return oracle


def source_hook(name: str) -> tuple[str, int | None]:
    """The oracle's hook holding a source's output, and its head index."""
    if name == "Resid Start":
        return "blocks.0.hook_resid_pre", None
    if name.startswith("MLP"):
        return f"blocks.{int(name.split()[1])}.hook_mlp_out", None
    layer, head = map(int, name[1:].split("."))
    return f"blocks.{layer}.attn.hook_result", head


def source_value(cache, name: str) -> t.Tensor:
    hook_name, head = source_hook(name)
    return cache[hook_name] if head is None else cache[hook_name][:, :, head]


def dest_hook(oracle, dest: str) -> tuple[str, int | None]:
    """The oracle's hook holding a destination's input, and its head index."""
    if dest == "Resid End":
        return f"blocks.{oracle.cfg.n_layers - 1}.hook_resid_post", None
    if dest.startswith("MLP"):
        return f"blocks.{int(dest.split()[1])}.hook_mlp_in", None
    parts = dest[1:].split(".")
    kind = f"{parts[2].lower()}_input" if len(parts) == 3 else "attn_in"
    return f"blocks.{parts[0]}.hook_{kind}", int(parts[1])


def at_position(diff: t.Tensor, seq_idx: int | None) -> t.Tensor:
    """``diff`` [batch, seq, d] kept only at ``seq_idx`` (all positions: None)."""
    if seq_idx is None:
        return diff
    only_here = t.zeros(SEQ, 1)
    only_here[seq_idx] = 1.0
    return diff * only_here


def add_at(x: t.Tensor, head: int | None, diff: t.Tensor) -> None:
    if head is None:
        x += diff
    else:
        x[:, :, head] += diff


def oracle_edge_patch(
    model_kwargs: dict, edge: str, seq_idx: int | None, separate_qkv: bool
) -> t.Tensor:
    """Clean run with one edge carrying its source's corrupt value, by plain hooks."""
    oracle = flagged_oracle(model_kwargs, separate_qkv)
    _, clean_cache = oracle.run_with_cache(CLEAN)
    _, corrupt_cache = oracle.run_with_cache(CORRUPT)
    src, dest = edge.split("->")
    diff = source_value(corrupt_cache, src) - source_value(clean_cache, src)
    diff = at_position(diff, seq_idx)
    hook_name, head = dest_hook(oracle, dest)

    def add_diff(x: t.Tensor, hook) -> t.Tensor:
        x = x.clone()
        add_at(x, head, diff)
        return x

    return oracle.run_with_hooks(CLEAN, fwd_hooks=[(hook_name, add_diff)])


def engine_edge_patch(
    model_kwargs: dict, edge: str, seq_idx, separate_qkv: bool, grad: bool = True
) -> t.Tensor:
    """The engine's patch, with gradients on (the checkpointed per-head rebuild) or off
    (the rebuild in the delta's own memory)."""
    seq_len = None if seq_idx is None else SEQ
    pm = patchable_model(
        make_tl_model(**model_kwargs), True, seq_len=seq_len, separate_qkv=separate_qkv
    )
    with t.set_grad_enabled(grad):
        with patch_mode(pm, src_ablations(pm, CORRUPT), edges=[pm.edge(edge, seq_idx)]):
            return pm(CLEAN)


EDGES_QKV = [
    "A0.1->A2.3.K",
    "MLP 0->A1.2.Q",
    "Resid Start->A1.0.V",
    "A1.3->MLP 2",
    "MLP 1->Resid End",
    "A0.0->Resid End",
    "Resid Start->MLP 0",
    "A1.1->A2.1.Q",
]
EDGES_COMBINED = ["A0.1->A2.3", "MLP 0->A1.2", "Resid Start->A1.0", "A1.3->MLP 2"]


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("seq_idx", [None, 4])
@pytest.mark.parametrize("edge", EDGES_QKV)
def test_single_edge_separate_qkv(edge, seq_idx, grad):
    got = engine_edge_patch({}, edge, seq_idx, separate_qkv=True, grad=grad)
    expected = oracle_edge_patch({}, edge, seq_idx, separate_qkv=True)
    clean = make_tl_model()(CLEAN)
    assert (expected - clean).abs().max() > 1e-4, "the patch must change the output"
    t.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("seq_idx", [None, 6])
@pytest.mark.parametrize("edge", EDGES_COMBINED)
def test_single_edge_combined_qkv(edge, seq_idx, grad):
    got = engine_edge_patch({}, edge, seq_idx, separate_qkv=False, grad=grad)
    expected = oracle_edge_patch({}, edge, seq_idx, separate_qkv=False)
    assert (expected - make_tl_model()(CLEAN)).abs().max() > 1e-4
    t.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "model_kwargs, edge",
    [
        ({"attn_only": True}, "A0.2->A1.1.K"),
        ({"attn_only": True}, "A1.3->Resid End"),
        ({"parallel_attn_mlp": True}, "A0.2->MLP 1"),
        ({"parallel_attn_mlp": True}, "MLP 0->A1.1.V"),
        ({"positional_embedding_type": "rotary", "rotary_dim": 4}, "A0.3->A1.0.Q"),
        ({"normalization_type": "RMS"}, "MLP 0->A2.2.K"),
        ({"normalization_type": "RMSPre"}, "A0.1->A1.3.Q"),
        ({"normalization_type": "LNPre"}, "Resid Start->A2.0.V"),
        ({"normalization_type": None}, "A0.1->A1.3.V"),
    ],
)
@pytest.mark.parametrize("grad", [True, False])
def test_single_edge_other_architectures(model_kwargs, edge, grad):
    got = engine_edge_patch(model_kwargs, edge, None, separate_qkv=True, grad=grad)
    expected = oracle_edge_patch(model_kwargs, edge, None, separate_qkv=True)
    assert (expected - make_tl_model(**model_kwargs)(CLEAN)).abs().max() > 1e-4
    # float32 rounding grows with the logits (up to ~60 without a normalisation)
    scale = max(1.0, float(expected.abs().max()) / 10)
    t.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize(
    "factorized, separate_qkv, seq_len",
    [(True, True, None), (True, False, None), (True, True, SEQ), (False, None, None)],
)
def test_all_masks_zero_is_clean_and_one_is_corrupt(factorized, separate_qkv, seq_len):
    model = make_tl_model()
    clean_out, corrupt_out = model(CLEAN), model(CORRUPT)
    pm = patchable_model(model, factorized, seq_len=seq_len, separate_qkv=separate_qkv)
    with patch_mode(pm, src_ablations(pm, CORRUPT)):
        assert t.equal(pm(CLEAN), clean_out)
        set_all_masks(pm, 1.0)
        t.testing.assert_close(pm(CLEAN), corrupt_out, atol=1e-5, rtol=1e-4)
    assert t.equal(pm(CLEAN), clean_out), "outside patch mode the model is unchanged"


@pytest.mark.parametrize("node", ["A0.2", "A1.0", "MLP 0", "MLP 1"])
def test_factorized_outgoing_edges_equal_unfactorized_node_patch(node):
    edge_pm = patchable_model(make_tl_model(), True, separate_qkv=True)
    outgoing = [e for e in edge_pm.edges if e.src.name == node]
    with patch_mode(edge_pm, src_ablations(edge_pm, CORRUPT), edges=outgoing):
        by_edges = edge_pm(CLEAN)
    node_pm = patchable_model(make_tl_model(), False)
    (node_edge,) = [e for e in node_pm.edges if e.src.name == node]
    with patch_mode(node_pm, src_ablations(node_pm, CORRUPT), edges=[node_edge]):
        by_node = node_pm(CLEAN)
    assert (by_node - make_tl_model()(CLEAN)).abs().max() > 1e-4
    t.testing.assert_close(by_edges, by_node, atol=1e-5, rtol=1e-4)


def test_zero_ablation_of_a_head_matches_zeroing_its_output():
    model_kwargs: dict = {}
    pm = patchable_model(make_tl_model(), True, separate_qkv=True)
    outgoing = [e for e in pm.edges if e.src.name == "A1.2"]
    with patch_mode(pm, src_ablations(pm, CLEAN, AblationType.ZERO), edges=outgoing):
        got = pm(CLEAN)
    oracle = make_tl_model(**model_kwargs)

    def zero_head(z: t.Tensor, hook) -> t.Tensor:
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    expected = oracle.run_with_hooks(CLEAN, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    t.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_mask_gradient_matches_finite_difference():
    pm = patchable_model(make_tl_model(), True, separate_qkv=True)
    mask = pm.patch_masks["blocks.2.hook_k_input"]
    idx = pm.edge("A0.1->A2.3.K").patch_idx
    patch = src_ablations(pm, CORRUPT)

    def metric() -> t.Tensor:
        return pm(CLEAN)[:, -1, 7].sum()

    with patch_mode(pm, patch):
        mask.requires_grad_(True)
        metric().backward()
        mask.requires_grad_(False)
        assert mask.grad is not None
        grad = mask.grad[idx].item()
        mask.grad = None
        eps = 1e-2
        mask.data[idx] = eps
        up = metric().item()
        mask.data[idx] = -eps
        down = metric().item()
    assert abs(grad) > 1e-4
    assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-2, abs=1e-4)


def test_patching_behind_a_shared_prefix_kv_cache(tmp_path):
    """With the shared prompt prefix in a frozen KV cache, patching the tail equals
    patching the full prompt restricted to the tail positions."""
    import json

    from tokenizers_for_tests import make_word_tokenizer

    from auto_circuit.data.loaders import load_datasets_from_json

    words = ["When", "Mary", "and", "John", "went", "to", "the", "store", ",", "gave", "a"]
    words += ["drink", "Bob", "Dan", "Carol", "Alice"]
    tokenizer = make_word_tokenizer(words)
    prompts = [
        {
            "clean": f"When Mary and John went to the store, {b} gave a drink to",
            "corrupt": f"When Mary and John went to the store, {c} gave a drink to",
            "answers": [" Mary"],
            "wrong_answers": [" John"],
        }
        for b, c in [("John", "Bob"), ("Mary", "Dan"), ("John", "Carol"), ("Mary", "Alice")]
    ]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": prompts}))

    def model_with_tokenizer():
        model = make_tl_model(d_vocab=len(tokenizer))
        model.set_tokenizer(tokenizer)
        return model

    model = model_with_tokenizer()
    train, _ = load_datasets_from_json(
        model, path, "cpu", batch_size=2, train_test_size=(2, 2), return_seq_length=True,
        tail_divergence=True,
    )  # fmt: skip
    batch = next(iter(train))
    prefix_len = train.diverge_idx
    prefix = model.to_tokens("When Mary and John went to the store,")[:, :prefix_len]
    full_clean = t.cat([prefix.expand(2, -1), batch.clean], dim=1)
    full_corrupt = t.cat([prefix.expand(2, -1), batch.corrupt], dim=1)

    cached = patchable_model(
        model, True, seq_len=train.seq_len, separate_qkv=True, kv_caches=(train.kv_cache,)
    )
    full = patchable_model(model_with_tokenizer(), True, separate_qkv=True)
    edge = "A0.1->A2.3.K"
    with patch_mode(cached, src_ablations(cached, batch.corrupt), edges=[cached.edge(edge, 1)]):
        tail_out = cached(batch.clean)
    # Oracle: the full prompt, with the edge carrying its corrupt value at that one
    # position (patch values equal to the clean ones everywhere else).
    position = prefix_len + 1
    full_patch, clean_src = src_ablations(full, full_corrupt), src_ablations(full, full_clean)
    at_position = (t.arange(full_clean.shape[1]) == position).view(1, 1, -1, 1)
    with patch_mode(full, t.where(at_position, full_patch, clean_src), edges=[edge]):
        expected = full(full_clean)[:, prefix_len:]
    full_out_all = full(full_clean)
    assert (expected - full_out_all[:, prefix_len:]).abs().max() > 1e-5
    t.testing.assert_close(tail_out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.fast_paths
def test_replaced_qkv_projections_are_not_computed(monkeypatch):
    """A q/k/v that the per-head rebuild replaces is not first projected by the block."""
    import transformer_lens.components.abstract_attention as tl_attention

    import auto_circuit.families.transformer_lens as tl_family

    calls = []

    def counting(original):
        def linear(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        return linear

    for module in (tl_attention, tl_family):
        monkeypatch.setattr(module, "simple_attn_linear", counting(module.simple_attn_linear))
    model = make_tl_model(n_layers=3)
    pm = patchable_model(model, True, slice_output="last_seq", separate_qkv=True)
    x, corrupt = t.randint(0, 50, (2, 5)), t.randint(0, 50, (2, 5))
    patch = src_ablations(pm, corrupt)
    calls.clear()
    with t.no_grad(), patch_mode(pm, patch):
        pm(x)  # every mask 0: nothing replaced
        assert len(calls) == 3 * 3
        calls.clear()
        pm.patch_masks["blocks.1.hook_q_input"][0, 0] = 1.0  # one edge into A1.0.Q
        pm(x)
        assert len(calls) == 3 * 3 - 1
        calls.clear()
        set_all_masks(pm, 0.5)
        pm(x)
        assert calls == []
    pm(x)  # outside patch mode: the block's own projections
    assert len(calls) == 3 * 3


def test_forwards_without_gradients_reuse_no_memory_a_backward_needs():
    """No-grad forwards reuse their table and delta buffers; a forward with gradients
    keeps its own, so a no-grad forward between it and its backward changes nothing."""
    from auto_circuit.engine.graph_utils import train_mask_mode

    pm = patchable_model(make_tl_model(), True, separate_qkv=True)
    patch = src_ablations(pm, CORRUPT)
    other = tokens(3)

    def grads(interleave: bool) -> dict[str, t.Tensor]:
        with train_mask_mode(pm) as masks, patch_mode(pm, patch):
            set_all_masks(pm, 0.3)
            with t.no_grad():
                pm(other)  # leaves a spare table and delta buffer of this shape
            out = pm(CLEAN)[:, -1].logsumexp(-1).sum()
            if interleave:
                with t.no_grad():
                    pm(other)
                    pm(other)
            out.backward()
            return {name: m.grad.clone() for name, m in masks.items() if m.grad is not None}

    plain, interleaved = grads(False), grads(True)
    assert plain.keys() == interleaved.keys() and len(plain) > 0
    for name in plain:
        assert plain[name].abs().max() > 0
        t.testing.assert_close(interleaved[name], plain[name], rtol=0, atol=0)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [t.float64, t.bfloat16])
def test_other_dtypes_patch(dtype, grad):
    """float64 and bfloat16 models patch too (the per-head rebuild normalises in float):
    all masks 1 with resample ablation reproduce the corrupt run."""
    model = make_tl_model().to(dtype)
    pm = patchable_model(model, True, separate_qkv=True)
    patch = src_ablations(pm, CORRUPT)
    with t.set_grad_enabled(grad), patch_mode(pm, patch):
        set_all_masks(pm, 1.0)
        patched = pm(CLEAN)
    corrupt = model(CORRUPT)
    assert (corrupt.float() - model(CLEAN).float()).abs().max() > 0.1
    tol = 1e-9 if dtype == t.float64 else 0.1  # bfloat16: 8 bits of mantissa
    t.testing.assert_close(patched.float(), corrupt.float(), atol=tol, rtol=tol)


def edge_mask_values(pm) -> list[tuple[str, str, int | None, float]]:
    """(source, destination, position, mask value) of every edge, for the oracle."""
    return [
        (e.src.name, e.dest.name, e.seq_idx, float(e.patch_mask(pm)[e.patch_idx])) for e in pm.edges
    ]


def oracle_masked_patch(
    model_kwargs: dict,
    edge_values: list[tuple[str, str, int | None, float]],
    separate_qkv: bool,
    oracle=None,
) -> t.Tensor:
    """Clean run in which each destination's input gets ``sum value * (corrupt - current
    source)`` over its edges, the current sources recorded by plain hooks as the patched
    run reaches them: every edge patched at once, with fractional masks. ``oracle``: a
    flagged model to use instead of a new one from ``model_kwargs``."""
    if oracle is None:
        oracle = flagged_oracle(model_kwargs, separate_qkv)
    _, corrupt_cache = oracle.run_with_cache(CORRUPT)
    current: dict[str, t.Tensor] = {}

    def record(x: t.Tensor, hook) -> None:
        current[hook.name] = x

    by_hook: dict[str, list] = {}
    for src, dest, seq_idx, mask in edge_values:
        hook_name, head = dest_hook(oracle, dest)
        by_hook.setdefault(hook_name, []).append((src, head, seq_idx, mask))

    def patch(x: t.Tensor, hook) -> t.Tensor:
        x = x.clone()
        for src, head, seq_idx, mask in by_hook[hook.name]:
            diff = mask * (source_value(corrupt_cache, src) - source_value(current, src))
            add_at(x, head, at_position(diff, seq_idx))
        return x

    sources = {source_hook(src)[0] for src, _, _, _ in edge_values}
    recorders = [(name, record) for name in sources]
    patches = [(name, patch) for name in by_hook]
    return oracle.run_with_hooks(CLEAN, fwd_hooks=recorders + patches)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("seq_len", [None, SEQ])
@pytest.mark.parametrize("separate_qkv", [True, False])
@pytest.mark.parametrize(
    "model_kwargs", [{}, {"parallel_attn_mlp": True}, {"attn_only": True}], ids=str
)
def test_fractional_masks_on_many_edges_match_a_hook_oracle(
    model_kwargs, separate_qkv, seq_len, grad
):
    """Every edge at once with random fractional masks, with and without gradients. The
    masks leave block 1's attention inputs off for the first sources and block 2's off
    entirely, so the MLPs' and the final residual's sums are formed in every way the
    engine has (alone, or partly inside a block's fused Q/K/V product)."""
    pm = patchable_model(
        make_tl_model(**model_kwargs), True, seq_len=seq_len, separate_qkv=separate_qkv
    )
    gen = t.Generator().manual_seed(5)
    with t.no_grad():
        for name, mask in pm.patch_masks.items():
            mask.copy_(t.rand(mask.shape, generator=gen))
            if ".1.hook_q" in name or ".1.hook_k" in name or ".1.hook_v" in name:
                mask[..., :3] = 0.0
            if ".1.hook_attn_in" in name:
                mask[..., :3] = 0.0
            if name.startswith("blocks.2.hook_") and not name.endswith(("mlp_in", "resid_post")):
                mask.zero_()
    edge_values = edge_mask_values(pm)
    edge_values = [ev for ev in edge_values if ev[3] != 0.0]
    assert len(edge_values) > 20
    expected = oracle_masked_patch(model_kwargs, edge_values, separate_qkv)
    with t.set_grad_enabled(grad), patch_mode(pm, src_ablations(pm, CORRUPT)):
        got = pm(CLEAN)
        again = pm(CLEAN)  # the buffers a forward without gradients reuses
    assert (expected - make_tl_model(**model_kwargs)(CLEAN)).abs().max() > 1e-2
    t.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    t.testing.assert_close(again, got, atol=0, rtol=0)


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("seq_len", [None, SEQ])
def test_gradients_at_fractional_masks_match_finite_differences(seq_len, per_example):
    """Every mask trained at once at random fractional values (so gradients also flow
    through upstream sources' current outputs, ``d delta / d C = -mask``): the gradients
    of edges of every kind equal central differences of the float64 model."""
    from auto_circuit.engine.graph_utils import set_mask_batch_size, train_mask_mode

    model = make_tl_model().to(t.float64)
    pm = patchable_model(model, True, seq_len=seq_len, separate_qkv=True)
    patch = src_ablations(pm, CORRUPT)
    batch = CLEAN.shape[0] if per_example else None
    edges = ["A0.1->A2.3.K", "MLP 0->A1.2.Q", "Resid Start->A1.0.V", "A1.3->MLP 2"]
    edges += ["MLP 1->Resid End", "A2.2->Resid End", "A0.0->MLP 0"]
    gen = t.Generator().manual_seed(7)

    def metric() -> t.Tensor:
        return pm(CLEAN)[:, -1, 7].sum()

    with set_mask_batch_size(pm, batch), train_mask_mode(pm) as masks:
        with t.no_grad():
            for mask in masks.values():
                mask.copy_(t.rand(mask.shape, generator=gen, dtype=t.float64))
        with patch_mode(pm, patch):
            metric().backward()
            for name in edges:
                edge = pm.edge(name, None if seq_len is None else SEQ - 1)
                mask = masks[edge.dest.module_name]
                idx = ((1,) if per_example else ()) + edge.patch_idx
                assert mask.grad is not None
                grad = mask.grad[idx].item()
                saved, eps = mask.data[idx].item(), 1e-5
                with t.no_grad():
                    mask.data[idx] = saved + eps
                    up = metric().item()
                    mask.data[idx] = saved - eps
                    down = metric().item()
                    mask.data[idx] = saved
                assert abs(grad) > 1e-6, name
                assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9), name


def test_weights_changed_between_forwards_are_used():
    """The no-grad rebuild keeps the norm's weight and bias folded into W_Q/K/V between
    forwards; changing a weight in place, or replacing it, must still take effect (the
    forward with gradients, which folds nothing, is the reference)."""
    model = make_tl_model()
    pm = patchable_model(model, True, separate_qkv=True)
    patch = src_ablations(pm, CORRUPT)
    set_all_masks(pm, 0.6)
    with patch_mode(pm, patch):
        with t.no_grad():
            before = pm(CLEAN)
            model.blocks[1].ln1.w.mul_(1.5)
            model.blocks[2].ln1.b.add_(0.2)
            changed = pm(CLEAN)
            model.blocks[1].attn.W_K = t.nn.Parameter(model.blocks[1].attn.W_K * 0.5)
            replaced = pm(CLEAN)
        reference = pm(CLEAN)  # gradients on: the checkpointed rebuild
    set_all_masks(pm, 0.0)
    assert (changed - before).abs().max() > 1e-3 and (replaced - changed).abs().max() > 1e-3
    t.testing.assert_close(replaced, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("separate_qkv", [True, False])
def test_residual_with_a_large_mean_keeps_its_precision(separate_qkv):
    """Without gradients the Q/K/V rebuild takes the norm's variance as
    ``mean(x^2) - mean(x)^2``, which loses float32 precision when the residual's mean is
    large against its spread. A constant offset on every embedding (which the norms
    remove, so it changes nothing else) makes it so: the engine must then centre first,
    and agree with the hook oracle as closely as without the offset."""
    offset = 300.0

    def offset_model():
        model = make_tl_model()
        with t.no_grad():
            model.embed.W_E.add_(offset)
        return model

    pm = patchable_model(offset_model(), True, separate_qkv=separate_qkv)
    gen = t.Generator().manual_seed(11)
    with t.no_grad():
        for mask in pm.patch_masks.values():
            mask.copy_(t.rand(mask.shape, generator=gen))
    edge_values = edge_mask_values(pm)
    oracle = flagged_oracle({}, separate_qkv)
    with t.no_grad():
        oracle.embed.W_E.add_(offset)
    expected = oracle_masked_patch({}, edge_values, separate_qkv, oracle)
    with t.no_grad(), patch_mode(pm, src_ablations(pm, CORRUPT)):
        got = pm(CLEAN)
    assert (expected - offset_model()(CLEAN)).abs().max() > 1e-2
    t.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
