"""Docstring prompts (Heimersheim & Janiak 2023, "A circuit for Python docstrings in a
4-layer attention-only transformer").

Clean: a method whose docstring documents its parameters in order; the model should
complete the third ``:param`` line with the parameter after B in the ``def`` line::

    def <name>(self, <P1>, <P2>, <A>, <B>, <C>, <P3>):
        \"\"\"<three description words>

        :param <A>: <two words>
        :param <B>: <two words>
        :param                    -> " <C>"

Two extra parameters before A and one after C keep "the third parameter" from being a
shortcut. Wrong answers: the other five ``def`` parameters and eight names that are not in
the prompt. Corrupt: every parameter name replaced by a new one, with the docstring's
names different again from the new ``def`` names, so the corrupt prompt says nothing about
which name comes next (the "random def, random doc" corruption of the post and ACDC).

``word_idxs`` (no BOS) name the tokens of the circuit: ``A_def``, ``B_def``, ``,_B`` (the
comma after B), ``C_def``, ``A_doc``, ``param_2`` (the ``param`` before B_doc), ``B_doc``,
``param_3`` (the last token) and ``end``. Positions assume the indentation tokens of a
code tokenizer with space-run tokens (see :func:`~auto_circuit.data.generate.common.word_pieces`);
the attn-only-4l tokenizer was not available to check them.
"""

from __future__ import annotations

import random

from auto_circuit.data.generate.common import (
    JsonValue,
    Prompt,
    make_dataset,
    make_prompt,
    word_pieces,
)
from auto_circuit.data.generate.words import DESCRIPTION_WORDS, VARIABLE_NAMES

N_DEF_ARGS = 6
"""P1, P2, A, B, C, P3."""
N_WRONG_EXTRA = 8


def docstring_text(
    method: str,
    def_args: list[str],
    doc_args: list[str],
    method_desc: list[str],
    arg_descs: list[list[str]],
) -> str:
    """The prompt text: a ``def`` line, a description and one ``:param`` line per doc arg,
    ending with an open ``:param``."""
    lines = [f"def {method}(self, {', '.join(def_args)}):", f'    """{" ".join(method_desc)}', ""]
    lines += [
        f"    :param {arg}: {' '.join(desc)}" for arg, desc in zip(doc_args, arg_descs, strict=True)
    ]
    lines.append("    :param")
    return "\n".join(lines)


def docstring_prompt(rng: random.Random) -> Prompt:
    """One clean/corrupt prompt pair with names and words drawn from ``rng``."""
    names = rng.sample(VARIABLE_NAMES, 2 * N_DEF_ARGS + 2 + N_WRONG_EXTRA)
    def_args, rest = names[:N_DEF_ARGS], names[N_DEF_ARGS:]
    corrupt_def, corrupt_doc = rest[:N_DEF_ARGS], rest[N_DEF_ARGS : N_DEF_ARGS + 2]
    extra_wrong = rest[N_DEF_ARGS + 2 :]
    a, b, c = def_args[2:5]
    words = rng.sample(DESCRIPTION_WORDS, 8)
    method, method_desc, arg_descs = words[0], words[1:4], [words[4:6], words[6:8]]
    clean = docstring_text(method, def_args, [a, b], method_desc, arg_descs)
    corrupt = docstring_text(method, corrupt_def, corrupt_doc, method_desc, arg_descs)
    wrong = [arg for arg in def_args if arg != c] + extra_wrong
    return make_prompt(clean, corrupt, [f" {c}"], [f" {w}" for w in wrong])


def _label(piece: str) -> str:
    if piece.isspace():
        return "indent" if piece.strip(" ") == "" else piece.replace("\n", "\\n")
    return piece.strip()


def docstring_positions() -> tuple[list[str], dict[str, int]]:
    """Token labels and ``word_idxs`` (no BOS) of the docstring prompts."""
    slots = ["P1", "P2", "A", "B", "C", "P3"]
    text = docstring_text(
        "name", [f"{s}_def" for s in slots], ["A_doc", "B_doc"], ["desc"] * 3, [["desc"] * 2] * 2
    )
    labels = [_label(p) for p in word_pieces(text)]
    params = [i for i, label in enumerate(labels) if label == "param"]
    word_idxs = {
        "A_def": labels.index("A_def"),
        "B_def": labels.index("B_def"),
        ",_B": labels.index("B_def") + 1,
        "C_def": labels.index("C_def"),
        "A_doc": labels.index("A_doc"),
        "param_2": params[1],
        "B_doc": labels.index("B_doc"),
        "param_3": params[2],
        "end": len(labels) - 1,
    }
    return labels, word_idxs


def docstring_dataset(n_prompts: int = 200, seed: int = 0) -> dict[str, JsonValue]:
    """``n_prompts`` distinct docstring prompt pairs drawn from ``seed``."""
    rng = random.Random(seed)
    prompts: dict[str, Prompt] = {}
    while len(prompts) < n_prompts:
        prompt = docstring_prompt(rng)
        prompts.setdefault(prompt["clean"], prompt)
    labels, word_idxs = docstring_positions()
    return make_dataset(list(prompts.values()), labels, word_idxs)
