"""Compile the tracr ``reverse`` and ``xproportion`` programs and convert them to
TransformerLens weights shipped in ``auto_circuit/models/tracr/``.

Run with the separate tracr environment (jax, dm-haiku, tracr; never imported by
auto_circuit), see ``tools/tracr/README.md``::

    /work/tracr-venv/bin/python tools/tracr/compile_tracr.py

Tracr (Lindner et al. 2023, `arXiv:2301.05062 <https://arxiv.org/abs/2301.05062>`_)
compiles a RASP program into a residual transformer with no layer norm, one-hot token
and position embeddings, zero biases and non-causal attention. The compiled model is
already a transformer in the TransformerLens sense, so the conversion only renames and
reshapes its weights:

=================================  ======================================  ===========
tracr (haiku) parameter            TransformerLens parameter               reshape
=================================  ======================================  ===========
``token_embed/embeddings``         ``embed.W_E``                           --
``pos_embed/embeddings``           ``pos_embed.W_pos``                     --
``layer_l/attn/{query,key,value}`` ``blocks.l.attn.W_{Q,K,V}``, ``b_*``    split heads
``layer_l/attn/linear``            ``blocks.l.attn.W_O``, ``b_O``          split heads
``layer_l/mlp/linear_{1,2}``       ``blocks.l.mlp.W_{in,out}``, ``b_*``    --
projection onto the output space   ``unembed.W_U`` (``b_U`` = 0)           --
=================================  ======================================  ===========

Tracr divides attention logits by ``sqrt(key_size)`` and bakes its softmax coldness into
the query weights; TransformerLens divides by ``sqrt(d_head)`` with ``d_head =
key_size``, so the logits are the same.

For each model the script writes ``<name>.safetensors`` (the TransformerLens state dict,
float32), ``<name>.json`` (config, vocabulary, output decoding, residual labels) and
``<name>_tracr_outputs.safetensors`` (the compiled tracr model's own raw outputs on every
input of the shipped dataset, for the conversion test). It checks that the tracr model
decodes to the RASP program's outputs (``rasp.evaluate``) and to the dataset's answers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import haiku as hk
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tracr.compiler import compiling, lib
from tracr.rasp import rasp

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "auto_circuit" / "models" / "tracr"
DATASET_DIR = REPO / "auto_circuit" / "datasets" / "tracr"
MAX_SEQ_LEN = 5
BOS = "BOS"
PAD = "compiler_pad"
MLP_EXACTNESS = 100
NUMERIC_ATOL = 1e-4


@dataclass(frozen=True)
class ProgramSpec:
    """A RASP program to compile and the dataset whose inputs it is checked on."""

    name: str
    description: str
    build: Callable[[], rasp.SOp]
    vocab: frozenset[Any]
    dataset: str


def _reverse() -> rasp.SOp:
    return lib.make_reverse(rasp.tokens)


def _xproportion() -> rasp.SOp:
    is_x = rasp.numerical(rasp.Map(lambda tok: tok == "x", rasp.tokens))
    return lib.make_frac_prevs(is_x)


PROGRAMS = (
    ProgramSpec(
        name="reverse",
        description="tracr lib.make_reverse(tokens): the input sequence reversed",
        build=_reverse,
        vocab=frozenset({1, 2, 3}),
        dataset="tracr_reverse_len_5_prompts.json",
    ),
    ProgramSpec(
        name="xproportion",
        description=(
            'tracr lib.make_frac_prevs(numerical(Map(tok == "x", tokens))): the fraction '
            'of the tokens so far that are "x"'
        ),
        build=_xproportion,
        vocab=frozenset({"w", "x", "y", "z"}),
        dataset="tracr_xproportion_len_5_prompts.json",
    ),
)


def output_directions(program: rasp.SOp, assembled: Any) -> tuple[list[str], list[Any] | None]:
    """Residual labels of the output space, and the categorical output values (None when
    the output is numerical), ordered by output id."""
    if rasp.is_categorical(program):
        values = sorted(
            assembled.output_encoder.encoding_map, key=assembled.output_encoder.encoding_map.get
        )
        return [f"{program.label}:{v}" for v in values], values
    return [program.label], None


def tl_weights(assembled: Any, out_labels: list[str]) -> dict[str, np.ndarray]:
    """The compiled model's parameters as a TransformerLens ``HookedTransformer`` state dict."""
    params = {
        k: {p: np.asarray(v, dtype=np.float32) for p, v in d.items()}
        for k, d in assembled.params.items()
    }
    cfg = assembled.model_config
    n_heads, d_head = cfg.num_heads, cfg.key_size
    labels = assembled.residual_labels
    weights = {
        "embed.W_E": params["token_embed"]["embeddings"],
        "pos_embed.W_pos": params["pos_embed"]["embeddings"],
    }
    for layer in range(cfg.num_layers):
        attn, mlp = f"transformer/layer_{layer}/attn", f"transformer/layer_{layer}/mlp"
        for tracr_name, tl in (("query", "Q"), ("key", "K"), ("value", "V")):
            w, b = params[f"{attn}/{tracr_name}"]["w"], params[f"{attn}/{tracr_name}"]["b"]
            # [d_model, (head d_head)] -> [head, d_model, d_head]
            weights[f"blocks.{layer}.attn.W_{tl}"] = w.reshape(
                len(labels), n_heads, d_head
            ).transpose(1, 0, 2)
            weights[f"blocks.{layer}.attn.b_{tl}"] = b.reshape(n_heads, d_head)
        w_o = params[f"{attn}/linear"]["w"]
        weights[f"blocks.{layer}.attn.W_O"] = w_o.reshape(n_heads, d_head, len(labels))
        weights[f"blocks.{layer}.attn.b_O"] = params[f"{attn}/linear"]["b"]
        weights[f"blocks.{layer}.mlp.W_in"] = params[f"{mlp}/linear_1"]["w"]
        weights[f"blocks.{layer}.mlp.b_in"] = params[f"{mlp}/linear_1"]["b"]
        weights[f"blocks.{layer}.mlp.W_out"] = params[f"{mlp}/linear_2"]["w"]
        weights[f"blocks.{layer}.mlp.b_out"] = params[f"{mlp}/linear_2"]["b"]
    w_u = np.zeros((len(labels), len(out_labels)), dtype=np.float32)
    for i, label in enumerate(out_labels):
        w_u[labels.index(label), i] = 1.0
    weights["unembed.W_U"] = w_u
    weights["unembed.b_U"] = np.zeros(len(out_labels), dtype=np.float32)
    return {k: np.ascontiguousarray(v) for k, v in weights.items()}


def tracr_raw_outputs(assembled: Any, tokens: np.ndarray) -> np.ndarray:
    """The compiled model's output-space values ``[batch, pos, d_vocab_out]`` (before the
    argmax that tracr takes for categorical outputs), computed by tracr itself."""

    @hk.without_apply_rng
    @hk.transform
    def raw(toks):
        compiled = assembled.get_compiled_model()
        out = compiled(toks, use_dropout=False)
        return compiled.unembed(out.transformer_output.output, use_unembed_argmax=False)

    out = np.asarray(raw.apply(assembled.params, jnp.asarray(tokens)), dtype=np.float32)
    return out[..., None] if out.ndim == 2 else out


def tl_config(spec: ProgramSpec, assembled: Any, n_out: int) -> dict[str, Any]:
    cfg = assembled.model_config
    return {
        "model_name": f"tracr-{spec.name}",
        "n_layers": cfg.num_layers,
        "d_model": len(assembled.residual_labels),
        "d_head": cfg.key_size,
        "n_heads": cfg.num_heads,
        "d_mlp": cfg.mlp_hidden_size,
        "n_ctx": MAX_SEQ_LEN + 1,
        "d_vocab": len(assembled.input_encoder.encoding_map),
        "d_vocab_out": n_out,
        "act_fn": "relu",
        "normalization_type": None,
        "attention_dir": "causal" if cfg.causal else "bidirectional",
        "attn_only": False,
        "positional_embedding_type": "standard",
        "default_prepend_bos": False,
        "original_architecture": "tracr",
    }


def compile_program(spec: ProgramSpec, out_dir: Path) -> None:
    program = spec.build()
    assembled = compiling.compile_rasp_to_model(
        program,
        vocab=set(spec.vocab),
        max_seq_len=MAX_SEQ_LEN,
        compiler_bos=BOS,
        compiler_pad=PAD,
        mlp_exactness=MLP_EXACTNESS,
    )
    encoding = assembled.input_encoder.encoding_map
    input_tokens = sorted(encoding, key=encoding.get)
    out_labels, out_values = output_directions(program, assembled)
    weights = tl_weights(assembled, out_labels)

    prompts = json.loads((DATASET_DIR / spec.dataset).read_text())["prompts"]
    tokens = np.array([p["clean"] for p in prompts], dtype=np.int64)
    raw = tracr_raw_outputs(assembled, tokens)
    check_outputs(spec, program, prompts, tokens, raw, out_values, input_tokens)

    config = tl_config(spec, assembled, len(out_labels))
    meta = {
        "name": spec.name,
        "program": spec.description,
        "compiler": {
            "vocab": sorted(spec.vocab),
            "max_seq_len": MAX_SEQ_LEN,
            "compiler_bos": BOS,
            "compiler_pad": PAD,
            "mlp_exactness": MLP_EXACTNESS,
            "causal": bool(assembled.model_config.causal),
        },
        "config": config,
        "input_tokens": input_tokens,
        "output": (
            {"kind": "categorical", "tokens": out_values}
            if out_values is not None
            else {"kind": "numerical", "label": program.label}
        ),
        "residual_labels": list(assembled.residual_labels),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / f"{spec.name}.safetensors"))
    (out_dir / f"{spec.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file(
        {"tokens": tokens.astype(np.int32), "outputs": raw},
        str(out_dir / f"{spec.name}_tracr_outputs.safetensors"),
    )
    for path in out_dir.glob(f"{spec.name}*"):
        path.chmod(0o644)
    shapes = {
        k: v.shape
        for k, v in weights.items()
        if k.startswith(("embed", "pos", "unembed", "blocks.0."))
    }
    print(f"{spec.name}: {json.dumps(config)}\n  {shapes}")


def check_outputs(
    spec: ProgramSpec,
    program: rasp.SOp,
    prompts: list[dict[str, Any]],
    tokens: np.ndarray,
    raw: np.ndarray,
    out_values: list[Any] | None,
    input_tokens: list[Any],
) -> None:
    """The tracr model decodes to ``rasp.evaluate``'s outputs and to the dataset's answers."""
    max_err = 0.0
    for i, prompt in enumerate(prompts):
        seq = [input_tokens[tok] for tok in tokens[i, 1:]]
        if input_tokens[tokens[i, 0]] != BOS:
            raise ValueError(f"{spec.dataset} prompt {i} does not start with BOS")
        expected = rasp.evaluate(program, seq)
        answers = [a[0] for a in prompt["answers"]]
        if out_values is not None:
            decoded = [out_values[j] for j in raw[i, 1:].argmax(-1)]
            if decoded != expected or [out_values[a] for a in answers] != expected:
                raise ValueError(f"{spec.name} input {seq}: tracr {decoded}, RASP {expected}")
        else:
            err = max(
                np.abs(raw[i, 1:, 0] - np.array(expected)).max(),
                np.abs(np.array(answers) - np.array(expected)).max(),
            )
            max_err = max(max_err, float(err))
            if err > NUMERIC_ATOL:
                raise ValueError(f"{spec.name} input {seq}: tracr {raw[i, 1:, 0]}, RASP {expected}")
    print(f"{spec.name}: {len(prompts)} inputs match RASP (max numeric error {max_err:.2e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for spec in PROGRAMS:
        compile_program(spec, args.out_dir)


if __name__ == "__main__":
    main()
