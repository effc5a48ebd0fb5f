"""Pre-tokenised prompts for the tracr-compiled ``reverse`` and ``frac_prevs("x")`` programs.

Every input of length 5 is one clean prompt (BOS + 5 tokens); its corrupt prompt is
another input drawn at random. Answers are given per position after BOS (``[5, 1]``):
the token id the program outputs there; ``wrong_answers`` are the corrupt prompt's
outputs (the values that resample ablation pushes towards).

Token ids follow the tracr compiler's input encoding, which sorts the vocabulary together
with its BOS and padding tokens (``"BOS"`` < ``"compiler_pad"`` < lower-case letters;
numbers before strings):

- reverse, vocabulary {1, 2, 3}: ids 1 -> 0, 2 -> 1, 3 -> 2, BOS 3 (pad 4). The output
  is a categorical over the same vocabulary, ids 0-2.
- xproportion, vocabulary {w, x, y, z}: BOS 0 (pad 1), w 2, x 3, y 4, z 5. The output is
  numerical: the fraction of the tokens so far (this one included) that are "x".
"""

from __future__ import annotations

import random
from itertools import product

from auto_circuit.data.generate.common import JsonValue, Prompt, make_dataset, make_prompt

SEQ_LEN = 5
REVERSE_VOCAB = (1, 2, 3)
REVERSE_IDS = {1: 0, 2: 1, 3: 2}
REVERSE_BOS = 3
XPROPORTION_VOCAB = ("w", "x", "y", "z")
XPROPORTION_IDS = {"w": 2, "x": 3, "y": 4, "z": 5}
XPROPORTION_BOS = 0
SEQ_LABELS = ["BOS", *(f"tok {i}" for i in range(1, SEQ_LEN + 1))]


def _corrupt_of(n_inputs: int, rng: random.Random) -> list[int]:
    """For each input, the index of another input (never itself)."""
    return [(i + rng.randrange(1, n_inputs)) % n_inputs for i in range(n_inputs)]


def reverse_prompt(clean: tuple[int, ...], corrupt: tuple[int, ...]) -> Prompt:
    def encode(seq: tuple[int, ...]) -> list[int]:
        return [REVERSE_BOS, *(REVERSE_IDS[x] for x in seq)]

    def outputs(seq: tuple[int, ...]) -> list[list[int]]:
        return [[REVERSE_IDS[x]] for x in reversed(seq)]

    return make_prompt(encode(clean), encode(corrupt), outputs(clean), outputs(corrupt))


def tracr_reverse_dataset(seed: int = 0) -> dict[str, JsonValue]:
    """All 3^5 = 243 inputs of ``reverse``, in lexicographic order."""
    inputs = list(product(REVERSE_VOCAB, repeat=SEQ_LEN))
    partner = _corrupt_of(len(inputs), random.Random(seed))
    prompts = [reverse_prompt(seq, inputs[j]) for seq, j in zip(inputs, partner, strict=True)]
    return make_dataset(prompts, SEQ_LABELS)


def x_fractions(seq: tuple[str, ...]) -> list[list[float]]:
    """At each position, the fraction of the tokens up to it that are "x"."""
    return [[seq[: i + 1].count("x") / (i + 1)] for i in range(len(seq))]


def xproportion_prompt(clean: tuple[str, ...], corrupt: tuple[str, ...]) -> Prompt:
    def encode(seq: tuple[str, ...]) -> list[int]:
        return [XPROPORTION_BOS, *(XPROPORTION_IDS[x] for x in seq)]

    return make_prompt(encode(clean), encode(corrupt), x_fractions(clean), x_fractions(corrupt))


def tracr_xproportion_dataset(seed: int = 0) -> dict[str, JsonValue]:
    """All 4^5 = 1024 inputs of ``frac_prevs("x")``, in lexicographic order."""
    inputs = list(product(XPROPORTION_VOCAB, repeat=SEQ_LEN))
    partner = _corrupt_of(len(inputs), random.Random(seed))
    prompts = [xproportion_prompt(seq, inputs[j]) for seq, j in zip(inputs, partner, strict=True)]
    return make_dataset(prompts, SEQ_LABELS)
