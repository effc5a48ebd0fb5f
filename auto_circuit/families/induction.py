"""The shipped induction model: a small trained transformer whose circuit is known.

A 2-layer attention-only ``HookedTransformer`` (4 heads of size 16 per layer,
``d_model=64``, no layer norm, learned positional embeddings, 24 positions) trained by
``tools/train_induction.py`` to predict the next token of a repeated segment of random
tokens: in ``BOS ... A B ... A`` it predicts ``B``. It does so with an induction circuit
(Elhage et al. 2021; Olsson et al. 2022): a previous-token head in layer 0 writes "the
token before me was A" at B's position; an induction head in layer 1 uses that as its
key, attends from the second A to B and copies B (its value) to the output. The official
edges are ``auto_circuit.evaluation.official_circuits.circuits.induction_official``.

The weights (safetensors), the config and a prompt dataset ship inside the package, so
nothing is downloaded. There is no tokenizer: the model takes token ids. Ordinary tokens
are ``0 .. N_TOKENS - 1`` and ``BOS_TOKEN_ID = N_TOKENS``; prompts start with BOS.

The dataset (``induction_dataset_path()``) is in auto_circuit's JSON format with
pre-tokenised prompts (BOS included): load it with
``load_datasets_from_json(None, induction_dataset_path(), ...)``. Its ``word_idxs``
(``first_occurrence``, ``answer_source``, ``end``) index the prompts with BOS at 0.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch as t
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.vocabulary.errors import CircuitError

N_TOKENS = 50
"""Ordinary token ids are ``0 .. N_TOKENS - 1``."""
BOS_TOKEN_ID = N_TOKENS
"""The beginning-of-sequence token id (the last id of the vocabulary)."""

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DATASET_FILE = "induction_prompts.json"


def induction_model_dir() -> Path:
    """The package directory holding the weights, config and dataset."""
    return Path(str(resources.files("auto_circuit"))) / "models" / "induction"


def induction_dataset_path() -> Path:
    """The shipped prompt dataset (pre-tokenised; load it with ``model=None``)."""
    return induction_model_dir() / DATASET_FILE


def get_induction_model(device: t.device | str = "cpu") -> HookedTransformer:
    """Load the shipped induction model.

    Args:
        device: Where the model lives.

    Returns:
        The trained ``HookedTransformer`` in eval mode with frozen parameters and no
        tokenizer (it takes token ids; ``BOS_TOKEN_ID`` starts a prompt).
    """
    return load_induction_model(induction_model_dir(), device)


def load_induction_model(
    directory: Path | str, device: t.device | str = "cpu"
) -> HookedTransformer:
    """Load an induction model written by ``tools/train_induction.py`` to ``directory``."""
    directory = Path(directory)
    config = _read_config(directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CircuitError(
            f"No weights file {weights_path}. Reinstall auto_circuit, or write the files "
            "with `python tools/train_induction.py --out DIR`."
        )
    try:
        weights = load_file(str(weights_path), device=str(device))
    except (OSError, SafetensorError) as err:
        raise CircuitError(f"Cannot read the weights in {weights_path}: {err}") from err
    try:
        # init_weights=False: no random initialisation, which would draw from (and so
        # change) the global torch random state.
        cfg = HookedTransformerConfig(**config["model"], init_weights=False, device=str(device))
    except (TypeError, ValueError) as err:
        raise CircuitError(f"{directory / CONFIG_FILE}: bad model config ({err}).") from err
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        model = HookedTransformer(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    absent = [name for name in missing if name not in buffers]
    if absent or unexpected:
        raise CircuitError(
            f"{weights_path} does not match the config in {directory / CONFIG_FILE}: "
            f"missing parameters {absent}, unexpected {list(unexpected)}."
        )
    model.eval()
    model.requires_grad_(False)
    return model


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CircuitError(
            f"No model config {path}. Reinstall auto_circuit, or write the files with "
            "`python tools/train_induction.py --out DIR`."
        ) from err
    except (OSError, json.JSONDecodeError) as err:
        raise CircuitError(f"Cannot read the model config {path}: {err}") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CircuitError(f"{path}: expected an object with a 'model' config object.")
    return config
