"""Loading models for experiments.

Models are loaded exactly as trained: no layer-norm folding, no weight centering (the
TransformerLens ``from_pretrained`` defaults change the model, and faithfulness numbers
depend on the exact model). Parameters are frozen and the model is in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch as t
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean

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
