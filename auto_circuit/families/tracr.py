"""The tracr-compiled ``reverse`` and ``xproportion`` programs as TransformerLens models.

Tracr (Lindner et al. 2023, `arXiv:2301.05062 <https://arxiv.org/abs/2301.05062>`_)
compiles a RASP program into transformer weights, so the circuit of the model is known by
construction. ACDC (Conmy et al. 2023) and Miller et al. (2024) use two of them as
ground truth for circuit discovery:

- ``reverse``: tracr's ``make_reverse(tokens)`` over the vocabulary {1, 2, 3}. 4 layers of
  one head and one MLP each (d_model 41, d_head 12, d_mlp 30). Attention 0 + MLP 0
  compute the length, MLPs 1-2 the opposite index, attention 3 moves each token there.
  Attention 1-2 and MLP 3 are all zeros. Categorical output over {1, 2, 3} (ids 0-2).
- ``xproportion``: tracr's ``make_frac_prevs(numerical(Map(tok == "x", tokens)))`` over
  {w, x, y, z}. 2 layers (d_model 14, d_head 7, d_mlp 1): MLP 0 computes ``is_x``,
  attention 1 averages it over the positions so far. Attention 0 and MLP 1 are all zeros.
  Numerical output: one output dimension holding the fraction.

Both are compiled with ``max_seq_len=5`` and BOS (``n_ctx=6``), non-causal attention
(``attention_dir="bidirectional"``), no layer norm and ReLU MLPs. Token ids are tracr's
(the vocabulary sorted together with ``"BOS"`` and ``"compiler_pad"``), the ids of the
shipped datasets ``datasets/tracr/*.json``. Padding is not masked: feed full-length
prompts.

The weights ship as package data in ``auto_circuit/models/tracr/`` (compiled and
converted by ``tools/tracr/compile_tracr.py``); loading needs neither jax nor tracr.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch as t
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.misc import did_you_mean

TracrModelName = Literal["reverse", "xproportion"]
TRACR_MODELS: tuple[str, ...] = ("reverse", "xproportion")
"""The shipped tracr models."""

Token = int | str
"""A tracr input or output token (``reverse`` uses ints, ``xproportion`` strings)."""


@dataclass(frozen=True)
class TracrVocab:
    """How a tracr model encodes its inputs and how its outputs are read.

    Attributes:
        input_tokens: The input token of each id (``input_tokens[id]``), BOS and pad
            included.
        bos: The BOS token, at position 0 of every prompt.
        pad: The padding token (tracr masks it; this TransformerLens model does not).
        output_kind: ``"categorical"``: output id ``i`` is ``output_tokens[i]``, decode the
            argmax over ``d_vocab_out``; ``"numerical"``: one output dimension holds the
            value.
        output_tokens: The output token of each output id (empty when numerical).
        max_seq_len: The most tokens after BOS.
    """

    input_tokens: tuple[Token, ...]
    bos: str
    pad: str
    output_kind: Literal["categorical", "numerical"]
    output_tokens: tuple[Token, ...]
    max_seq_len: int

    @property
    def input_ids(self) -> dict[Token, int]:
        """Token -> id."""
        return {tok: i for i, tok in enumerate(self.input_tokens)}

    @property
    def bos_id(self) -> int:
        return self.input_tokens.index(self.bos)

    def encode(self, seq: Sequence[Token]) -> Int[Tensor, " seq"]:
        """Token ids of ``[BOS, *seq]``."""
        ids = self.input_ids
        unknown = [tok for tok in seq if tok not in ids or tok in (self.bos, self.pad)]
        if unknown:
            vocab = [tok for tok in self.input_tokens if tok not in (self.bos, self.pad)]
            raise CircuitError(f"Tokens {unknown} are not in the vocabulary {vocab}.")
        if len(seq) > self.max_seq_len:
            raise CircuitError(
                f"The model was compiled for at most {self.max_seq_len} tokens after BOS; "
                f"got {len(seq)}."
            )
        return t.tensor([self.bos_id, *(ids[tok] for tok in seq)])

    def decode(self, logits: Float[Tensor, "seq d_vocab_out"]) -> list[Token | float]:
        """The output at each position: the argmax token (categorical) or the value."""
        if logits.ndim != 2:
            raise CircuitError(f"decode takes [pos, d_vocab_out] logits, got {logits.shape}.")
        if self.output_kind == "numerical":
            return [float(v) for v in logits[:, 0]]
        return [self.output_tokens[int(i)] for i in logits.argmax(-1)]


def _model_dir() -> Path:
    return Path(str(resources.files("auto_circuit"))) / "models" / "tracr"


def _check_name(name: str) -> None:
    if name not in TRACR_MODELS:
        raise CircuitError(
            f"No shipped tracr model {name!r}.{did_you_mean(name, TRACR_MODELS)} "
            f"The shipped models are {list(TRACR_MODELS)}."
        )


def _vocab(meta: Mapping) -> TracrVocab:
    output = meta["output"]
    return TracrVocab(
        input_tokens=tuple(meta["input_tokens"]),
        bos=meta["compiler"]["compiler_bos"],
        pad=meta["compiler"]["compiler_pad"],
        output_kind=output["kind"],
        output_tokens=tuple(output.get("tokens", ())),
        max_seq_len=meta["compiler"]["max_seq_len"],
    )


def get_tracr_model(
    name: TracrModelName | None = None,
    device: t.device | str = "cpu",
    *,
    tracr_task_key: TracrModelName | None = None,
) -> tuple[HookedTransformer, TracrVocab]:
    """Load a shipped tracr model as a TransformerLens ``HookedTransformer``.

    Args:
        name: ``"reverse"`` or ``"xproportion"``.
        device: Where the model lives.
        tracr_task_key: AutoCircuit's name for ``name``; give one of the two.

    Returns:
        The model (eval mode, float32, ``requires_grad=False`` parameters, no tokenizer)
        and its vocabulary. ``cfg.model_name`` is ``"tracr-<name>"``.
    """
    if (name is None) == (tracr_task_key is None):
        raise CircuitError(
            "get_tracr_model: give the model's name once, as name or as AutoCircuit's "
            f"tracr_task_key (got name={name!r}, tracr_task_key={tracr_task_key!r})."
        )
    name = name if name is not None else tracr_task_key
    assert name is not None
    _check_name(name)
    folder = _model_dir()
    meta = json.loads((folder / f"{name}.json").read_text())
    cfg = HookedTransformerConfig(**meta["config"], device=str(device), dtype=t.float32)
    model = HookedTransformer(cfg, move_to_device=True)
    state = load_file(folder / f"{name}.safetensors", device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise RuntimeError(
            f"The shipped weights of tracr {name!r} do not fit its config (missing "
            f"{sorted(params & set(missing))}, unexpected {sorted(unexpected)}); regenerate "
            "them with tools/tracr/compile_tracr.py."
        )
    model.eval()
    model.requires_grad_(False)
    return model, _vocab(meta)


def tracr_reference_outputs(
    name: TracrModelName,
) -> tuple[Int[Tensor, "n_inputs seq"], Float[Tensor, "n_inputs seq d_vocab_out"]]:
    """The compiled tracr model's own outputs (computed with tracr, before any argmax) on
    every input of the model's shipped dataset, to check the conversion without jax.

    Returns:
        ``(tokens, outputs)``: the prompts (BOS included) and the output-space values.
    """
    _check_name(name)
    data = load_file(_model_dir() / f"{name}_tracr_outputs.safetensors")
    return data["tokens"].long(), data["outputs"]
