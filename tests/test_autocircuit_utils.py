"""AutoCircuit's utility names (tensor_ops, misc, custom_tqdm, ablation hooks, visualize,
experiment_utils, parameter integrated gradients, PatchWrapper) against independent
oracles: hand computations, the MicroModel and plain hooks on a small TransformerLens
model."""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch as t
from conftest import make_tl_model
from tokenizers_for_tests import make_word_tokenizer

from auto_circuit.data.loaders import PromptDataLoader, PromptDataset
from auto_circuit.engine.ablation_activations import src_ablations
from auto_circuit.engine.graph_utils import patchable_model
from auto_circuit.families.micro import MicroModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType

CLEAN = t.tensor([[[1.0, 1.0]]])


def batch_of(answers, wrong_answers):
    return SimpleNamespace(answers=answers, wrong_answers=wrong_answers)


# ---- tensor_ops ----------------------------------------------------------------------


def test_indices_vals_and_vocab_avg_val():
    from auto_circuit.utils.tensor_ops import indices_vals, vocab_avg_val

    vals = t.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    idx = t.tensor([[2, 0], [1, 1]])
    assert indices_vals(vals, idx).tolist() == [[3.0, 1.0], [5.0, 5.0]]
    assert vocab_avg_val(vals, idx).item() == pytest.approx((3 + 1 + 5 + 5) / 4)
    with pytest.raises(CircuitError, match="same number of axes"):
        indices_vals(vals, t.tensor([0, 1]))


def test_batch_avg_answer_val_wrong_answer_and_diff_percents():
    from auto_circuit.utils.tensor_ops import batch_answer_diff_percents, batch_avg_answer_val

    vals = t.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    batch = batch_of(t.tensor([[2], [0]]), t.tensor([[0], [1]]))
    assert batch_avg_answer_val(vals, batch).item() == pytest.approx((3 + 4) / 2)
    assert batch_avg_answer_val(vals, batch, wrong_answer=True).item() == pytest.approx(3.0)
    # Diffs: target [3-1, 4-5] = [2, -1]; pred [6-4, 1-2] for pred rows [4,.,6], [1,2,.].
    pred = t.tensor([[4.0, 0.0, 6.0], [1.0, 2.0, 0.0]])
    assert batch_answer_diff_percents(pred, vals, batch).tolist() == [100.0, 100.0]
    half = t.tensor([[0.0, 0.0, 1.0], [0.0, 0.5, 0.0]])  # diffs [1, -0.5]
    assert batch_answer_diff_percents(half, vals, batch).tolist() == [50.0, 50.0]


def test_correct_answer_proportions_by_hand():
    from auto_circuit.utils.tensor_ops import (
        correct_answer_greater_than_incorrect_proportion,
        correct_answer_proportion,
    )

    logits = t.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    batch = batch_of(t.tensor([[1], [2], [0]]), t.tensor([[0, 2], [1, 0], [1, 2]]))
    # argmax: 1 (right), 0 (wrong), 0 (tie, first index: right).
    assert correct_answer_proportion(logits, batch).item() == pytest.approx(2 / 3)
    # Correct vs wrong: 5 > 0,1 yes; 2 vs 1,3 no; 1 vs 1,0 tie counts as correct.
    value = correct_answer_greater_than_incorrect_proportion(logits, batch).item()
    assert value == pytest.approx(2 / 3)
    as_lists = batch_of([t.tensor([1]), t.tensor([2]), t.tensor([0])], [t.tensor([0, 2])] * 3)
    assert correct_answer_proportion(logits, as_lists).item() == pytest.approx(2 / 3)
    # Wrong answers [0, 2] for every prompt: 5 > 0,1; 2 vs 3,2 no; 1 vs 1,0 tie -> yes.
    value = correct_answer_greater_than_incorrect_proportion(logits, as_lists).item()
    assert value == pytest.approx(2 / 3)
    with pytest.raises(CircuitError, match="exactly one correct answer"):
        correct_answer_proportion(logits, batch_of(t.tensor([[1, 2]] * 3), None))


def test_multibatch_kl_div_by_hand():
    from auto_circuit.utils.tensor_ops import multibatch_kl_div

    p = t.tensor([[[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.8], [0.3, 0.7]]])
    q = t.tensor([[[0.25, 0.75], [0.5, 0.5]], [[0.2, 0.8], [0.6, 0.4]]])
    expected = (
        sum(
            pi * math.log(pi / qi)
            for prow, qrow in zip(p.reshape(-1, 2).tolist(), q.reshape(-1, 2).tolist(), strict=True)
            for pi, qi in zip(prow, qrow, strict=True)
        )
        / 4
    )
    assert multibatch_kl_div(q.log(), p.log()).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(CircuitError, match="equal shapes"):
        multibatch_kl_div(q.log(), p[0].log())


def test_sample_hard_concrete_mask_expanded():
    from auto_circuit.utils.tensor_ops import sample_hard_concrete

    mask = t.tensor([[100.0, -100.0, 100.0]] * 4)  # already [batch=4, 3]
    sample = sample_hard_concrete(mask, 4, mask_expanded=True)
    assert sample.shape == (4, 3)
    assert sample.tolist() == [[1.0, 0.0, 1.0]] * 4  # saturated logits clamp to 0 / 1
    assert sample_hard_concrete(mask[0], 4).shape == (4, 3)
    assert sample_hard_concrete(mask[0], batch_size=None).shape == (3,)
    with pytest.raises(CircuitError, match="leading batch axis of size 5"):
        sample_hard_concrete(mask, 5, mask_expanded=True)


# ---- misc ----------------------------------------------------------------------------


def nested_results():
    return {
        "EAP": {"blocks.0.hook_q_input": t.arange(6.0).reshape(2, 3), "n": 3},
        7: [(1, 0.5), (2, float("inf"))],
        (1, "x"): {"ints": t.tensor([1, 2], dtype=t.int64), "none": None, "flag": True},
    }


def test_save_and_load_cache_round_trip(tmp_path):
    from auto_circuit.utils.misc import load_cache, save_cache

    data = nested_results()
    path = save_cache(data, tmp_path / "cache", "scores")
    assert re.fullmatch(r"scores-\d\d-\d\d-\d{4}_\d\d-\d\d-\d\d\.safetensors", path.name)
    loaded = load_cache(tmp_path / "cache", path.name)
    assert loaded.keys() == data.keys()
    assert t.equal(loaded["EAP"]["blocks.0.hook_q_input"], data["EAP"]["blocks.0.hook_q_input"])
    assert loaded["EAP"]["n"] == 3 and loaded[7] == [(1, 0.5), (2, float("inf"))]
    inner = loaded[(1, "x")]
    assert inner["ints"].dtype == t.int64 and inner["ints"].tolist() == [1, 2]
    assert inner["none"] is None and inner["flag"] is True
    with pytest.raises(CircuitError, match="AblationType"):
        save_cache({"a": AblationType.ZERO}, tmp_path, "bad")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_cache_refuses_pickles_without_running_them(tmp_path):
    from auto_circuit.utils.misc import load_cache

    marker = tmp_path / "payload_ran"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    t.save({"x": _Payload(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    for name in ("evil.pkl", "evil.pt"):
        with pytest.raises(CircuitError, match="pickle"):
            load_cache(tmp_path, name)
    assert not marker.exists()


def test_load_cache_refuses_truncated_tampered_and_foreign_files(tmp_path):
    from auto_circuit.utils.misc import load_cache, save_cache
    from safetensors.torch import save_file

    path = save_cache({"s": t.arange(8.0)}, tmp_path, "c")
    raw = path.read_bytes()
    (tmp_path / "trunc").write_bytes(raw[: len(raw) - 5])
    with pytest.raises(CircuitError, match="truncated"):
        load_cache(tmp_path, "trunc")
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF  # a tensor byte: the header still parses
    (tmp_path / "tampered").write_bytes(bytes(flipped))
    with pytest.raises(CircuitError, match="modified after it was written"):
        load_cache(tmp_path, "tampered")
    save_file({"s": t.zeros(2)}, str(tmp_path / "foreign"))
    with pytest.raises(CircuitError, match="not one written by auto_circuit"):
        load_cache(tmp_path, "foreign")
    with pytest.raises(CircuitError, match="does not exist"):
        load_cache(tmp_path, "missing")


def test_remove_hooks_removes_hooks_even_on_error():
    from auto_circuit.utils.misc import remove_hooks

    model = MicroModel(2)
    calls = []
    with pytest.raises(RuntimeError), remove_hooks() as handles:
        handles.add(model.output.register_forward_hook(lambda *a: calls.append(1)))
        model(CLEAN)
        raise RuntimeError
    model(CLEAN)
    assert calls == [1]
    assert not model.output._forward_hooks


def test_set_module_by_name_by_hand():
    from auto_circuit.utils.misc import set_module_by_name

    class Double(t.nn.Module):
        def forward(self, x):
            return 2 * x

    model = MicroModel(2)
    set_module_by_name(model, "blocks.1.head_outputs", Double())
    # Block 1 heads [5, 14] and [15, 28] doubled: output [5, 7] + 2 * [20, 42].
    assert model(CLEAN).tolist() == [[[45.0, 91.0]]]
    pm = patchable_model(MicroModel(2), factorized=True)
    set_module_by_name(pm, "output", Double())  # addressed inside the wrapped model
    assert isinstance(pm.wrapped_model.output, Double)
    with pytest.raises(CircuitError, match="no module 'blocks.0.head_outputz'"):
        set_module_by_name(model, "blocks.0.head_outputz", Double())


def test_percent_gpu_mem_used():
    from auto_circuit.utils.misc import percent_gpu_mem_used

    text = percent_gpu_mem_used()
    assert re.fullmatch(r"Memory used \d+\.\d%", text)
    if not t.cuda.is_available():
        assert text == "Memory used 0.0%"


def test_get_most_similar_embeddings_and_run_prompt(capsys):
    from auto_circuit.utils.misc import get_most_similar_embeddings, run_prompt

    words = ["a", "b", "c", "d"]
    tokenizer = make_word_tokenizer(words)  # ids: BOS 0, UNK 1, a 2, " a" 3, b 4, ...
    model = make_tl_model(n_layers=1, d_vocab=len(tokenizer))
    model.set_tokenizer(tokenizer, default_padding_side="right")
    logits = t.zeros(len(tokenizer))
    logits[4], logits[2], logits[6] = 3.0, 2.0, 1.0  # b, a, c
    probs, ids = get_most_similar_embeddings(model, logits, answer="a", top_k=3)
    assert ids.tolist() == [4, 2, 6]
    assert probs.tolist() == pytest.approx(logits.softmax(-1)[[4, 2, 6]].tolist())
    out = capsys.readouterr().out
    assert '"a" token rank: 1 ' in out  # only "b" is above it
    assert out.index('Token: "b"') < out.index('Token: "a"') < out.index('Token: "c"')
    # With apply_unembed the vector is a residual: scores are its unembedding.
    resid = t.randn(model.cfg.d_model)
    _, ids = get_most_similar_embeddings(model, resid, top_k=2, apply_unembed=True)
    expected = model.unembed(resid.reshape(1, 1, -1)).reshape(-1).topk(2).indices
    assert ids.tolist() == expected.tolist()
    _, ids = run_prompt(model, "a b", top_k=2, prepend_bos=True)
    direct = model(model.to_tokens("a b", prepend_bos=True))[0, -1].topk(2).indices
    assert ids.tolist() == direct.tolist()


def test_custom_tqdm():
    from auto_circuit.utils.custom_tqdm import tqdm

    assert tqdm.keywords["dynamic_ncols"] is True and tqdm.keywords["leave"] is None
    assert list(tqdm(range(3), disable=True)) == [0, 1, 2]


# ---- ablation hooks ------------------------------------------------------------------


def record_with_hooks(pm, inputs, ablation_type, hook):
    """Run the plain hooks AutoCircuit installed, one per source module."""
    from auto_circuit.utils.misc import remove_hooks

    by_module = defaultdict(list)
    for src in pm.srcs:
        by_module[src.module_name].append(src)
    src_outs = {}
    with remove_hooks() as handles, t.no_grad():
        for nodes in by_module.values():
            fn = partial(hook, src_nodes=nodes, src_outs=src_outs, ablation_type=ablation_type)
            handles.add(nodes[0].module(pm).register_forward_hook(fn))
        for x in inputs:
            pm(x)
    return src_outs


def stacked(src_outs):
    return t.stack([src_outs[s] for s in sorted(src_outs, key=lambda s: s.src_idx)])


def test_src_out_hook_on_the_micro_model_by_hand():
    from auto_circuit.utils.ablation_activations import src_out_hook

    pm = patchable_model(MicroModel(2), factorized=True)
    x = t.tensor([[[1.0, 1.0]], [[3.0, 3.0]]])
    outs = record_with_hooks(pm, [x], AblationType.RESAMPLE, src_out_hook)
    resample = stacked(outs)
    assert resample[:, 0, 0].tolist() == [[1, 1], [1, 2], [3, 4], [5, 14], [15, 28]]
    assert t.equal(resample[:, 1], 3 * resample[:, 0])  # the model is linear in its input
    for ablation in (
        AblationType.ZERO,
        AblationType.BATCH_TOKENWISE_MEAN,
        AblationType.BATCH_ALL_TOK_MEAN,
    ):
        ours = stacked(record_with_hooks(pm, [x], ablation, src_out_hook))
        t.testing.assert_close(ours, src_ablations(pm, x, ablation))
    mean = stacked(record_with_hooks(pm, [x], AblationType.BATCH_TOKENWISE_MEAN, src_out_hook))
    assert mean[1, 0, 0].tolist() == [2.0, 4.0]  # B0.0: mean of [1, 2] and [3, 6]
    with pytest.raises(CircuitError, match="mean_src_out_hook"):
        record_with_hooks(pm, [x], AblationType.TOKENWISE_MEAN_CLEAN, src_out_hook)


def test_mean_src_out_hook_matches_dataset_means():
    from auto_circuit.utils.ablation_activations import mean_src_out_hook

    pm = patchable_model(MicroModel(2), factorized=True)
    clean = t.tensor([[[1.0, 1.0]], [[3.0, 3.0]], [[0.0, 2.0]], [[2.0, 0.0]]])
    corrupt = -2 * clean
    loader = PromptDataLoader(
        PromptDataset(clean, corrupt, t.zeros(4, 1, dtype=t.long), t.ones(4, 1, dtype=t.long)),
        None,
        0,
        batch_size=2,
    )
    ablation = AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT
    inputs = [x for b in loader for x in (b.clean, b.corrupt)]
    summed = stacked(record_with_hooks(pm, inputs, ablation, mean_src_out_hook))
    ours = summed / len(inputs)
    assert ours.shape == (5, 2, 1, 2)  # repeated to the batch size
    t.testing.assert_close(ours, src_ablations(pm, loader, ablation).expand_as(ours))
    # By hand: the input source's mean over clean and corrupt prompts is -1/2 of the clean
    # mean [1.5, 1.5].
    assert ours[0, 0, 0].tolist() == [-0.75, -0.75]
    uneven = [clean[:2], clean[:3]]
    with pytest.raises(CircuitError, match="equal size"):
        record_with_hooks(pm, uneven, AblationType.TOKENWISE_MEAN_CLEAN, mean_src_out_hook)


def test_src_out_hook_on_a_transformer_lens_model_matches_plain_hooks():
    from auto_circuit.utils.ablation_activations import src_out_hook

    tl = make_tl_model(n_layers=2, n_heads=2)
    tl.cfg.use_attn_result = True  # heads' sources are hook_result, as in AutoCircuit
    pm = patchable_model(tl, factorized=True, separate_qkv=True)
    tokens = t.randint(0, 50, (3, 5), generator=t.Generator().manual_seed(1))
    outs = record_with_hooks(pm, [tokens], AblationType.RESAMPLE, src_out_hook)
    t.testing.assert_close(stacked(outs), src_ablations(pm, tokens))
    # Independent of the engine: TransformerLens's own cache.
    _, cache = tl.run_with_cache(tokens)
    head = next(s for s in pm.srcs if s.name == "A1.1")
    t.testing.assert_close(outs[head], cache["blocks.1.attn.hook_result"][:, :, 1])


# ---- PatchWrapper --------------------------------------------------------------------


def test_patch_wrapper_is_the_base_of_every_wrapper():
    from auto_circuit.types import PatchWrapper

    pm = patchable_model(MicroModel(2), factorized=True)
    assert pm.wrappers and all(isinstance(w, PatchWrapper) for w in pm.wrappers)
    with pytest.raises(TypeError):
        PatchWrapper()  # type: ignore[abstract]


# ---- visualize -----------------------------------------------------------------------


def test_node_name_and_t_fmt():
    from auto_circuit.visualize import node_name, t_fmt

    assert node_name("Resid Start") == "Embed"
    assert node_name("Resid End") == "" and node_name("Resid End", unembed=True) == "Unembed"
    assert node_name("A1.0.Q") == "A1.0" and node_name("MLP 2") == "MLP 2"
    assert node_name("A1.0") == "A1.0" and node_name("HEADQ") == "HEADQ"
    assert t_fmt(3, seq_dim=1, seq_idx=None) == "3"
    x = t.arange(2 * 6 * 3, dtype=t.float).reshape(2, 6, 3) / 4
    # First prompt, position 2: [6, 7, 8] / 4 -> first two values.
    assert t_fmt(x, seq_dim=1, seq_idx=2) == "[1.5, 1.75 ...]"
    two_d = t_fmt(t.ones(1, 2, 2, 2), seq_dim=1, seq_idx=0, line_break="<br>")
    assert "<br>" in two_d and "tensor" not in two_d


def test_net_viz_draws_the_edges_above_the_threshold():
    from auto_circuit.visualize import net_viz

    pm = patchable_model(MicroModel(2), factorized=True)
    scores = pm.new_prune_scores()
    picks = {"B0.1->Resid End": 2.0, "B0.0->B1.0": -0.5, "Resid Start->B1.1": 0.001}
    for name, value in picks.items():
        edge = pm.edge(name)
        scores[edge.dest.module_name][edge.patch_idx] = value
    sankey, n_layers = net_viz(pm, pm.edges, scores, (0.0, 1.0), score_threshold=0.01)
    assert sorted(sankey.link.value) == [0.5, 2.0]
    names = {row[0] for row in sankey.link.customdata}
    assert names == {"B0.1->Resid End", "B0.0->B1.0"}
    assert n_layers == 3  # layers of B0.x, B1.0 and Resid End
    with pytest.raises(CircuitError, match="vert_interval"):
        net_viz(pm, pm.edges, scores, (0.5, 0.2))


# ---- experiment_utils ----------------------------------------------------------------


def test_ioi_circuit_type():
    from auto_circuit.experiment_utils import IOI_CIRCUIT_TYPE

    assert [c.name for c in IOI_CIRCUIT_TYPE] == ["NODES", "EDGES", "EDGES_MLP_0_ONLY"]
    assert str(IOI_CIRCUIT_TYPE.EDGES_MLP_0_ONLY) == "Edges_Mlp_0_Only"


@pytest.mark.slow
def test_ioi_single_template_on_a_gpt2_shaped_model():
    from auto_circuit.experiment_utils import ioi_circuit_single_template_logit_diff_percent
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from auto_circuit.vocabulary.misc import repo_path_to_abs_path

    path = repo_path_to_abs_path("datasets/ioi/ioi_ABBA_template_0_prompts.json")
    prompts = json.loads(path.read_text())["prompts"]
    text = " ".join(
        " ".join([p["clean"], p["corrupt"], *p["answers"], *p["wrong_answers"]]) for p in prompts
    )
    tokenizer = make_word_tokenizer(sorted(set(re.findall(r"\w+|[^\s\w]+", text))))
    cfg = HookedTransformerConfig(
        n_layers=12, n_heads=12, d_model=24, d_head=2, d_mlp=48, n_ctx=64,
        d_vocab=len(tokenizer), act_fn="gelu_new", normalization_type="LN", seed=0,
    )  # fmt: skip
    gpt2 = HookedTransformer(cfg, tokenizer=tokenizer).eval().requires_grad_(False)
    tokens = gpt2.to_tokens(prompts[0]["clean"])
    before = gpt2(tokens)
    size, mean, std, per_prompt, scores = ioi_circuit_single_template_logit_diff_percent(
        gpt2, dataset_size=4, prepend_bos=True, template="ABBA", template_idx=0, tok_pos=False
    )
    assert per_prompt.shape == (4,) and mean == pytest.approx(float(per_prompt.mean()))
    assert std == pytest.approx(float(per_prompt.std()))
    assert size == int(sum(float((s != 0).sum()) for s in scores.values()))
    t.testing.assert_close(gpt2(tokens), before)  # the model is unwrapped afterwards


# ---- parameter integrated gradients --------------------------------------------------


def micro_loader():
    # Answer id 1, wrong id 0: the metric is output[1] - output[0] = 49 - 25 = 24 on the
    # clean input; with all weights zero the blocks add nothing: [1, 1] -> 0.
    dataset = PromptDataset(CLEAN, -CLEAN, t.tensor([[1]]), t.tensor([[0]]))
    return PromptDataLoader(dataset, None, 0, batch_size=1)


def test_parameter_integrated_gradients_completeness_on_the_micro_model():
    from auto_circuit.prune_algos.parameter_integrated_gradients import (
        BaselineWeights,
        parameter_integrated_gradients,
        parameter_integrated_grads_prune_scores,
    )

    pm = patchable_model(MicroModel(2), factorized=True, slice_output="last_seq")
    pm.wrapped_model.requires_grad_(False)
    names = ["blocks.0.weights", "blocks.1.weights"]
    attr = parameter_integrated_gradients(pm, micro_loader(), names, samples=4)
    # The metric is quadratic in the weights, so the midpoint rule is exact: the
    # attributions sum to metric(W) - metric(0) = 24.
    assert sum(float(a.sum()) for a in attr.values()) == pytest.approx(24.0, rel=1e-5)
    # Weights and requires_grad are restored.
    assert pm.wrapped_model.blocks[0].weights.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert pm(CLEAN)[0, -1].tolist() == [25.0, 49.0]
    assert not any(p.requires_grad for p in pm.wrapped_model.parameters())

    scores = parameter_integrated_grads_prune_scores(pm, micro_loader(), samples=4)
    b00 = float(attr["blocks.0.weights"][0].abs().sum())
    b11 = float(attr["blocks.1.weights"][1].abs().sum())

    def score(name):
        edge = pm.edge(name)
        return float(scores[edge.dest.module_name][edge.patch_idx])

    # Destinations have no weight and Resid Start neither: an edge scores its source.
    assert score("B0.0->B1.0") == pytest.approx(b00)
    assert score("B1.1->Resid End") == pytest.approx(b11)
    assert score("Resid Start->B0.0") == 0.0

    mean_base = parameter_integrated_gradients(
        pm, micro_loader(), names, BaselineWeights.MEAN, samples=4
    )
    # Baseline weights all 2.5: the output's two entries are equal, so the metric is 0
    # there and the attributions again sum to 24.
    assert sum(float(a.sum()) for a in mean_base.values()) == pytest.approx(24.0, abs=1e-4)
