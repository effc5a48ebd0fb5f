"""Scripts written against AutoCircuit 1.0.1 run unchanged: its whole public surface
(``data/autocircuit-1.0.1-api.json``: every module, public name and parameter name of
AutoCircuit, names only), its ``Task``, and the seed tutorial as written."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch as t
from tokenizers_for_tests import make_word_tokenizer

from auto_circuit.app.tasks import Task, load_task, micro_model_def
from auto_circuit.engine.patchable_model import PatchableModel
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import repo_path_to_abs_path

MANIFEST = Path(__file__).parent / "data" / "autocircuit-1.0.1-api.json"
EXCEPTIONS_FILE = Path(__file__).parent / "autocircuit_exceptions.json"


def _manifest() -> dict:
    return json.loads(MANIFEST.read_text())["modules"]


def _exceptions() -> dict[str, str]:
    """``module.name`` or ``module.name(param)`` -> why it is not provided."""
    return json.loads(EXCEPTIONS_FILE.read_text())


def test_exceptions_each_give_a_reason():
    for item, reason in _exceptions().items():
        assert re.fullmatch(r"auto_circuit(\.\w+)+(\(\w+\))?", item), item
        assert len(reason) > 30, f"{item}: say why"


def test_every_module_name_and_parameter_of_autocircuit_exists():
    exceptions = _exceptions()
    missing = []
    for module_name, names in _manifest().items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing.append(f"{module_name} ({err})")
            continue
        for name, info in names.items():
            if f"{module_name}.{name}" in exceptions:
                continue
            obj = getattr(module, name, None)
            if obj is None:
                missing.append(f"{module_name}.{name}")
                continue
            expected = info["kind"]
            if expected == "class" and not inspect.isclass(obj):
                missing.append(f"{module_name}.{name} (not a class)")
            params = inspect.signature(obj).parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
            for param in info["params"]:
                item = f"{module_name}.{name}({param})"
                if param not in params and not takes_any and item not in exceptions:
                    missing.append(item)
    assert missing == []


def test_task_with_autocircuit_fields_loads_lazily():
    task = Task(
        key="Micro AC",
        name="Micro AC",
        batch_size=4,
        batch_count=2,
        token_circuit=False,
        _model_def=micro_model_def,
        _dataset_name="micro_model_inputs",
        separate_qkv=None,
        _true_edge_func=None,
        dtype=t.float32,
        __init_complete__=False,
    )
    assert task.model_def is micro_model_def and task.dataset_name == "micro_model_inputs"
    model = task.model
    assert isinstance(model, PatchableModel)
    assert task.model is model, "loaded once per Task"
    assert len(task.train_loader) == 2 and task.train_loader.batch_size == 4
    assert task.true_edges is None and task.true_edge_count is None
    x = t.ones(1, 1, 2)
    assert t.equal(model(x), t.tensor([[[25.0, 49.0]]]))  # the MicroModel, by hand
    assert load_task(task).model is not model, "load_task builds afresh"


def test_task_field_spellings_and_autoencoder_fields():
    with pytest.raises(CircuitError, match="give _model_def or model_def, not both"):
        Task("k", "n", 1, 1, False, _model_def="gpt2", model_def="gpt2", dataset_name="x")
    with pytest.raises(CircuitError, match="_dataset_name \\(or dataset_name\\) is required"):
        Task("k", "n", 1, 1, False, _model_def="gpt2")
    task = Task(
        "sae",
        "SAE task",
        1,
        2,
        False,
        _model_def=micro_model_def,
        _dataset_name="micro_model_inputs",
        autoencoder_input="resid_delta_mlp",
        autoencoder_max_latents=200,
    )
    with pytest.raises(CircuitError, match="sparse-autoencoder tasks are not supported yet"):
        _ = task.model


# ---- the seed tutorial, as written ---------------------------------------------------

TUTORIAL = """
import torch as t

from auto_circuit.data import load_datasets_from_json
from auto_circuit.experiment_utils import load_tl_model
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
from auto_circuit.types import PruneScores
from auto_circuit.utils.graph_utils import patchable_model
from auto_circuit.utils.misc import repo_path_to_abs_path
from auto_circuit.visualize import draw_seq_graph

device = t.device("cuda" if t.cuda.is_available() else "cpu")
model = load_tl_model("gpt2", device)

path = repo_path_to_abs_path("datasets/ioi/ioi_vanilla_template_prompts.json")
train_loader, test_loader = load_datasets_from_json(
    model=model,
    path=path,
    device=device,
    prepend_bos=True,
    batch_size=16,
    train_test_size=(128, 128),
)

model = patchable_model(
    model,
    factorized=True,
    slice_output="last_seq",
    separate_qkv=True,
    device=device,
)

attribution_scores: PruneScores = mask_gradient_prune_scores(
    model=model,
    dataloader=train_loader,
    official_edges=None,
    grad_function="logit",
    answer_function="avg_diff",
    mask_val=0.0,
)

fig = draw_seq_graph(
    model, attribution_scores, 3.5, layer_spacing=True, orientation="v"
)

train_loader, test_loader = load_datasets_from_json(
    model=model,
    path=path,
    device=device,
    prepend_bos=True,
    batch_size=16,
    train_test_size=(128, 128),
    return_seq_length=True,
)

model = patchable_model(
    model,
    factorized=True,
    slice_output="last_seq",
    seq_len=test_loader.seq_len,
    separate_qkv=True,
    device=device,
)

attribution_scores: PruneScores = mask_gradient_prune_scores(
    model=model,
    dataloader=train_loader,
    official_edges=None,
    grad_function="logit",
    answer_function="avg_diff",
    mask_val=0.0,
)

fig = draw_seq_graph(model, attribution_scores, 3.5, seq_labels=train_loader.seq_labels)
"""


def _gpt2_shaped_model():
    """GPT-2 small's architecture (12 layers of 12 heads, LayerNorm, GELU MLPs) at a
    small width, random weights, with a word tokenizer over the IOI dataset's words."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    path = repo_path_to_abs_path("datasets/ioi/ioi_vanilla_template_prompts.json")
    prompts = json.loads(path.read_text())["prompts"]
    text = " ".join(
        " ".join([p["clean"], p["corrupt"], *p["answers"], *p["wrong_answers"]]) for p in prompts
    )
    words = sorted(set(re.findall(r"\w+|[^\s\w]+", text)))
    tokenizer = make_word_tokenizer(words)
    cfg = HookedTransformerConfig(
        n_layers=12,
        n_heads=12,
        d_model=48,
        d_head=4,
        d_mlp=192,
        n_ctx=64,
        d_vocab=len(tokenizer),
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    model.requires_grad_(False)
    return model


def test_the_seed_tutorial_runs_as_written(monkeypatch):
    from auto_circuit.app import experiment_utils

    def load_tl_model(name: str, device):
        assert name == "gpt2"
        return _gpt2_shaped_model().to(device)

    monkeypatch.setattr(experiment_utils, "load_tl_model", load_tl_model)
    namespace: dict = {}
    exec(compile(TUTORIAL, "seed_tutorial", "exec"), namespace)  # noqa: S102

    model, scores = namespace["model"], namespace["attribution_scores"]
    assert isinstance(model, PatchableModel)
    assert model.seq_len == namespace["test_loader"].seq_len == 15  # BOS + 14 words
    assert set(scores) == set(model.patch_masks)
    assert all(s.shape == model.patch_masks[k].shape for k, s in scores.items())
    assert sum(float(s.abs().sum()) for s in scores.values()) > 0
    assert namespace["fig"] is not None
    assert namespace["train_loader"].seq_labels[0] == "<|BOS|>"
