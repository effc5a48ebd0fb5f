"""Loading models for experiments, and AutoCircuit's IOI-paper reproduction helper.

Models are loaded exactly as trained: no layer-norm folding, no weight centering (the
TransformerLens ``from_pretrained`` defaults change the model, and faithfulness numbers
depend on the exact model). Parameters are frozen and the model is in eval mode.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

import torch as t
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean, repo_path_to_abs_path
from auto_circuit.vocabulary.types import AblationType, PatchType, PruneScores

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
)


def load_tl_model(
    name: str, device: t.device | str, *, dtype: t.dtype = t.float32
) -> HookedTransformer:
    """Load a pretrained model into TransformerLens, unmodified and frozen.

    Args:
        name: A TransformerLens model name (e.g. ``"gpt2"``, downloaded once and then read
            from the Hugging Face cache), or a local directory holding a Hugging Face
            checkpoint (``config.json``, weights and, optionally, tokenizer files, as written
            by ``save_pretrained``).
        device: Where the model lives.
        dtype: The parameters' dtype.

    Returns:
        The model in eval mode with ``requires_grad=False`` parameters. No TransformerLens
        hook flags (``use_attn_result``, ``use_split_qkv_input``...) are turned on.
    """
    device = str(device)
    local = Path(name).expanduser()
    if local.is_dir():
        model = _load_local_checkpoint(local, device, dtype)
    else:
        try:
            tl_loading.get_official_model_name(name)
        except ValueError as err:
            known = tl_loading.make_model_alias_map()
            raise CircuitError(
                f"{name!r} is neither a local directory nor a model TransformerLens knows."
                f"{did_you_mean(name.lower(), known)} Pass a TransformerLens model name or "
                "the directory of a Hugging Face checkpoint."
            ) from err
        try:
            model = HookedTransformer.from_pretrained_no_processing(
                name, device=device, dtype=dtype
            )
        except OSError as err:
            raise CircuitError(
                f"Could not load {name!r}: its weights are not available offline ({err}). "
                "Download them once with internet access (they are then read from the "
                "Hugging Face cache), or pass the directory of a local checkpoint saved with "
                "save_pretrained."
            ) from err
    model.eval()
    model.requires_grad_(False)
    return model


def _load_local_checkpoint(path: Path, device: str, dtype: t.dtype) -> HookedTransformer:
    """Convert the Hugging Face checkpoint in ``path`` to TransformerLens, offline.

    ``HookedTransformer.from_pretrained(name, hf_model=...)`` still fetches the config of
    ``name`` from the hub, so this runs the same steps on the local directory instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise CircuitError(
            f"{path} is not a Hugging Face checkpoint: it has no config.json. Save the model "
            "there with save_pretrained, or pass a TransformerLens model name."
        )
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = None
        if any((path / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CircuitError(f"Could not load the Hugging Face checkpoint in {path}: {err}") from err
    try:
        cfg = tl_loading.get_pretrained_model_config(
            str(path),
            hf_cfg=hf_model.config.to_dict(),
            fold_ln=False,
            device=device,
            dtype=dtype,
        )
        state_dict = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
    except (AttributeError, KeyError, NotImplementedError, ValueError) as err:
        raise CircuitError(
            f"TransformerLens cannot convert the checkpoint in {path} "
            f"({type(err).__name__}: {err}). For GPT-2 configs, config.json needs 'n_ctx' "
            "(equal to 'n_positions')."
        ) from err
    del hf_model
    if tokenizer is None:
        # Without this TransformerLens would look for a tokenizer at cfg.tokenizer_name.
        cfg.tokenizer_name = None
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    return model


class IOI_CIRCUIT_TYPE(Enum):  # noqa: N801 (AutoCircuit's name)
    """Which form of the IOI circuit (Wang et al. 2022) to test."""

    NODES = 1
    """The circuit's heads: every edge out of a head of the circuit is kept."""
    EDGES = 2
    """The edges of the paper's circuit, MLPs on the paths between heads included."""
    EDGES_MLP_0_ONLY = 3
    """The paper's edges with only the first MLP layer (keeps most of the performance)."""

    def __str__(self) -> str:
        return self.name.title()


def ioi_circuit_single_template_logit_diff_percent(
    gpt2: HookedTransformer,
    dataset_size: int,
    prepend_bos: bool,
    template: Literal["ABBA", "BABA"],
    template_idx: int,
    factorized: bool = False,
    circuit: IOI_CIRCUIT_TYPE = IOI_CIRCUIT_TYPE.NODES,
    ablation_type: AblationType = AblationType.TOKENWISE_MEAN_CORRUPT,
    tok_pos: bool = True,
    patch_type: PatchType = PatchType.TREE_PATCH,
    learned: bool = False,
    learned_faithfulness_target: str = "logit_diff_percent",
    diff_of_mean_logit_diff: bool = False,
    batch_size: int | None = None,
) -> tuple[int, float, float, t.Tensor, PruneScores]:
    """The logit difference the IOI circuit recovers on one prompt template, in percent
    of the full model's (the faithfulness numbers of Wang et al. 2022).

    Args:
        gpt2: GPT-2 small (or a model of its shape) in TransformerLens. It is wrapped
            for the run and unwrapped afterwards, also on an error.
        dataset_size: Test prompts (taken in file order after the training prompts).
        prepend_bos: Whether prompts start with BOS.
        template: ``"ABBA"`` or ``"BABA"`` (the order of the names).
        template_idx: Which of the 15 templates (``0`` to ``14``).
        factorized: Edge-level graph (needed for the EDGES circuits) or node-level.
        circuit: Which form of the circuit (``IOI_CIRCUIT_TYPE``).
        ablation_type: How ablated edges are replaced (default: mean over the corrupt
            prompts at each position, the paper's "ABC mean").
        tok_pos: Separate edges per token position.
        patch_type: TREE_PATCH ablates everything outside the circuit; EDGE_PATCH
            patches the circuit's edges into the corrupt run.
        learned: Learn a circuit of the same size by circuit probing (on
            ``8 * dataset_size`` training prompts) instead of the paper's.
        learned_faithfulness_target: Circuit probing's ``faithfulness_target``.
        diff_of_mean_logit_diff: ``100 * mean(circuit) / mean(model)`` as the paper (True)
            or ``100 * mean(circuit / model)`` (False).
        batch_size: Prompts per batch (default: all in one).

    Returns:
        ``(circuit size, mean percent, its standard deviation over prompts, the percent
        of every prompt, the circuit's prune scores)``.

    Unlike AutoCircuit this works from an installed package (the template files ship
    inside it), does not copy the model, and accepts any GPT-2-small-shaped model.
    """
    from auto_circuit.algorithms.circuit_probing import circuit_probing_prune_scores
    from auto_circuit.algorithms.prune import run_circuits
    from auto_circuit.data.loaders import load_datasets_from_json
    from auto_circuit.engine.graph_utils import patchable_model
    from auto_circuit.evaluation.official_circuits.circuits.ioi_official import (
        ioi_head_based_official_edges,
        ioi_true_edges,
        ioi_true_edges_mlp_0_only,
    )
    from auto_circuit.evaluation.prune_metrics.answer_diff_percent import answer_diff_percent

    if template not in ("ABBA", "BABA"):
        raise CircuitError(f'template must be "ABBA" or "BABA", got {template!r}.')
    if not 0 <= template_idx <= 14:
        raise CircuitError(f"template_idx must be in 0..14, got {template_idx}.")
    circuit = IOI_CIRCUIT_TYPE(circuit)
    if circuit != IOI_CIRCUIT_TYPE.NODES and not factorized:
        raise CircuitError(f"The {circuit} IOI circuit is edge-level: pass factorized=True.")
    device = str(gpt2.cfg.device)
    test_batch = dataset_size if batch_size is None else batch_size
    # The loader needs a non-empty train split; without ``learned`` it is one unused
    # prompt (AutoCircuit asked for 0).
    n_train = 8 * dataset_size if learned else 1
    train_batch = min(test_batch, n_train)
    path = repo_path_to_abs_path(
        f"datasets/ioi/ioi_{template}_template_{template_idx}_prompts.json"
    )
    train_loader, test_loader = load_datasets_from_json(
        model=gpt2,
        path=path,
        device=device,
        prepend_bos=prepend_bos,
        batch_size=(train_batch, test_batch),
        train_test_size=(n_train, dataset_size),
        shuffle=False,
        return_seq_length=tok_pos,
        tail_divergence=False,
    )
    model = patchable_model(
        gpt2,
        factorized=factorized,
        slice_output="last_seq",
        seq_len=test_loader.seq_len if tok_pos else None,
        separate_qkv=True,
        device=device,
    )
    try:
        official = {
            IOI_CIRCUIT_TYPE.NODES: ioi_head_based_official_edges,
            IOI_CIRCUIT_TYPE.EDGES: ioi_true_edges,
            IOI_CIRCUIT_TYPE.EDGES_MLP_0_ONLY: ioi_true_edges_mlp_0_only,
        }[circuit]
        edges = official(
            model,
            word_idxs=test_loader.word_idxs,
            token_positions=tok_pos,
            seq_start_idx=test_loader.diverge_idx,
        )
        if learned:
            circuit_ps = circuit_probing_prune_scores(
                model=model,
                dataloader=train_loader,
                official_edges=edges,
                epochs=200,
                learning_rate=0.1,
                regularize_lambda=0.1,
                mask_fn="hard_concrete",
                tree_optimisation=True,
                circuit_sizes=["true_size"],
                faithfulness_target=learned_faithfulness_target,  # type: ignore[arg-type]
            )
        else:
            circuit_ps = model.circuit_prune_scores(edges)
        outs = run_circuits(
            model,
            test_loader,
            test_edge_counts=[len(edges)],
            prune_scores=circuit_ps,
            patch_type=patch_type,
            ablation_type=ablation_type,
        )
        (result,) = answer_diff_percent(
            model, test_loader, outs, prob_func="logits", diff_of_means=diff_of_mean_logit_diff
        )
    finally:
        model.remove()
    return result.size, result.value, result.std, result.per_prompt, circuit_ps
