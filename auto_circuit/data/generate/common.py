"""The dataset JSON format, its deterministic serialisation, and the word-level split.

A dataset is ``{"seq_labels": [...], "word_idxs": {...}, "prompts": [...]}`` (see
:func:`auto_circuit.data.load_datasets_from_json`); each prompt is ``{"clean", "corrupt",
"answers", "wrong_answers"}``. ``word_idxs`` index tokens *without* BOS.

Token positions are computed with :func:`word_pieces`, the split a GPT-2-style
pre-tokenizer makes: an optional leading space, then a run of word characters or a run of
punctuation. For prompts made of words that are single GPT-2 tokens (the word lists in
:mod:`auto_circuit.data.generate.words`) and single spaces, these pieces are GPT-2's
tokens. Whitespace other than single spaces (code indentation) is split as BPE
tokenizers with space-run tokens (GPT-NeoX's, used by code models) split it: a run of
newlines, then the indentation minus the space that starts the next piece
(``"\n    :param"`` -> ``"\n"``, ``"   "``, ``" :"``, ``"param"``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

_PIECES = re.compile(r"\n+| +(?= )| ?\w+| ?[^\s\w]+|\s+")

JsonValue = Any
"""A JSON-serialisable value."""


class Prompt(TypedDict):
    """One prompt pair: clean and corrupt inputs and the answers to the clean one."""

    clean: JsonValue
    corrupt: JsonValue
    answers: list[JsonValue]
    wrong_answers: list[JsonValue]


def word_pieces(text: str) -> list[str]:
    """``text`` split into tokens as described above (``" Mary"`` keeps its space)."""
    pieces = _PIECES.findall(text)
    if "".join(pieces) != text:
        raise ValueError(f"word_pieces lost characters of {text!r}")
    return pieces


def make_prompt(
    clean: JsonValue, corrupt: JsonValue, answers: list[JsonValue], wrong: list[JsonValue]
) -> Prompt:
    return Prompt(clean=clean, corrupt=corrupt, answers=answers, wrong_answers=wrong)


def make_dataset(
    prompts: Sequence[Prompt],
    seq_labels: Sequence[str] | None = None,
    word_idxs: Mapping[str, int] | None = None,
) -> dict[str, JsonValue]:
    """A dataset dict in the JSON format (metadata keys only when given)."""
    data: dict[str, JsonValue] = {}
    if seq_labels is not None:
        data["seq_labels"] = list(seq_labels)
    if word_idxs is not None:
        data["word_idxs"] = dict(word_idxs)
    data["prompts"] = list(prompts)
    return data


def dumps(data: Mapping[str, JsonValue]) -> str:
    """Deterministic compact JSON: metadata on the first lines, then one prompt per line."""
    lines = []
    for key, value in data.items():
        if key == "prompts":
            continue
        lines.append(f"{json.dumps(key)}:{_compact(value)}")
    prompts = ",\n".join(_compact(p) for p in data["prompts"])
    lines.append(f'"prompts":[\n{prompts}\n]')
    return "{" + ",\n".join(lines) + "}\n"


def _compact(value: JsonValue) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
