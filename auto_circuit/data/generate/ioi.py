"""Indirect Object Identification prompts (Wang et al. 2022, arXiv:2211.00593).

Clean: "When Mary and John went to the store, John gave a drink to" -> " Mary" (the
indirect object, IO), wrong answer " John" (the subject S, named twice: S1 and S2).
Corrupt: the ABC distribution of the paper: the same sentence with three new names in
the IO, S1 and S2 slots ("When Alice and Bob went to the store, Carol gave a drink to"),
so no name is repeated and the circuit's information is gone.

Templates: the vanilla template and the 15 templates of the IOI paper, in ABBA order (IO
named first) and BABA order (S named first). Each template gives prompts of one token
length, so one file per template has ``word_idxs``: IO, S1, S2 and their neighbours
(``IO-1``, ``IO+1``, ``S1-1``, ``S1+1``), ``end`` (the last token), ``starts`` (0) and
``punct`` (the last punctuation before S2).
"""

from __future__ import annotations

import random
from typing import Literal

from auto_circuit.data.generate.common import JsonValue, Prompt, make_dataset, make_prompt
from auto_circuit.data.generate.common import word_pieces as pieces_of
from auto_circuit.data.generate.words import NAMES, OBJECTS, PLACES

Order = Literal["ABBA", "BABA"]

VANILLA_TEMPLATE = "When {IO} and {S1} went to the {PLACE}, {S2} gave a {OBJECT} to"

ABBA_TEMPLATES: tuple[str, ...] = (
    "Then, {IO} and {S1} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {IO} and {S1} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {IO} and {S1} were working at the {PLACE}. {S2} decided to give a {OBJECT} to",
    "Then, {IO} and {S1} were thinking about going to the {PLACE}. {S2} wanted to give a "
    "{OBJECT} to",
    "Then, {IO} and {S1} had a long argument, and afterwards {S2} said to",
    "After {IO} and {S1} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "When {IO} and {S1} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "When {IO} and {S1} got a {OBJECT} at the {PLACE}, {S2} decided to give the {OBJECT} to",
    "While {IO} and {S1} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "While {IO} and {S1} were commuting to the {PLACE}, {S2} gave a {OBJECT} to",
    "After the lunch, {IO} and {S1} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Afterwards, {IO} and {S1} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {IO} and {S1} had a long argument. Afterwards {S2} said to",
    "The {PLACE} {IO} and {S1} went to had a {OBJECT}. {S2} gave it to",
    "Friends {IO} and {S1} found a {OBJECT} at the {PLACE}. {S2} gave it to",
)
"""The 15 IOI-paper templates with the indirect object named first (ABBA)."""

_MARKERS = ("IO", "S1", "S2", "PLACE", "OBJECT")

GPT2_SPLIT_WORDS: dict[str, tuple[str, ...]] = {"Afterwards": ("After", "wards")}
"""Template words that GPT-2 splits into several tokens (checked once against GPT-2's
vocabulary; every other template word is one token). Only "Afterwards" opening a
sentence (template 11) is; " Afterwards" with a space (template 12) is one token."""


def template(order: Order, idx: int) -> str:
    """IOI-paper template ``idx`` (0-14) in ``order`` (BABA: the subject named first)."""
    if order not in ("ABBA", "BABA"):
        raise ValueError(f"order must be 'ABBA' or 'BABA', got {order!r}")
    abba = ABBA_TEMPLATES[idx]
    if order == "ABBA":
        return abba
    return abba.replace("{IO}", "{TMP}", 1).replace("{S1}", "{IO}", 1).replace("{TMP}", "{S1}", 1)


def template_positions(tmpl: str) -> tuple[list[str], dict[str, int]]:
    """The token labels of ``tmpl`` and its ``word_idxs`` (no BOS), for GPT-2: the word
    split, with the words of ``GPT2_SPLIT_WORDS`` split into their GPT-2 tokens."""
    # Each slot holds one word, so it is one piece; a placeholder word marks it.
    placeholder = {m: f"Slot{m}" for m in _MARKERS}
    marker_of = {word: m for m, word in placeholder.items()}
    filled = tmpl.format(**placeholder)
    labels = [
        label
        for piece in pieces_of(filled)
        for label in GPT2_SPLIT_WORDS.get(piece, (marker_of.get(piece.strip(), piece.strip()),))
    ]
    first = {m: labels.index(m) for m in ("IO", "S1", "S2")}
    punct = max(i for i, lab in enumerate(labels[: first["S2"]]) if not lab[0].isalnum())
    word_idxs = {
        "IO": first["IO"],
        "IO-1": first["IO"] - 1,
        "IO+1": first["IO"] + 1,
        "S1": first["S1"],
        "S1-1": first["S1"] - 1,
        "S1+1": first["S1"] + 1,
        "S2": first["S2"],
        "end": len(labels) - 1,
        "starts": 0,
        "punct": punct,
    }
    labels = [lab.lower() if lab in ("PLACE", "OBJECT") else lab for lab in labels]
    return labels, word_idxs


def ioi_prompt(tmpl: str, rng: random.Random) -> Prompt:
    """One clean/ABC-corrupt prompt pair from ``tmpl``: five distinct names, one place and
    one object drawn from ``rng``."""
    io, s, c_io, c_s1, c_s2 = rng.sample(NAMES, 5)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    clean = tmpl.format(IO=io, S1=s, S2=s, PLACE=place, OBJECT=obj)
    corrupt = tmpl.format(IO=c_io, S1=c_s1, S2=c_s2, PLACE=place, OBJECT=obj)
    return make_prompt(clean, corrupt, [f" {io}"], [f" {s}"])


def ioi_dataset(tmpl: str, n_prompts: int, seed: int) -> dict[str, JsonValue]:
    """``n_prompts`` distinct prompt pairs from one template, with its labels and indices."""
    rng = random.Random(seed)
    prompts: dict[str, Prompt] = {}
    for _ in range(100 * n_prompts):
        if len(prompts) == n_prompts:
            break
        prompt = ioi_prompt(tmpl, rng)
        prompts.setdefault(prompt["clean"], prompt)
    if len(prompts) < n_prompts:
        raise ValueError(f"template {tmpl!r} gives fewer than {n_prompts} distinct prompts")
    labels, word_idxs = template_positions(tmpl)
    return make_dataset(list(prompts.values()), labels, word_idxs)


def ioi_vanilla_dataset(n_prompts: int = 400, seed: int = 0) -> dict[str, JsonValue]:
    """Prompts of the vanilla template "When {IO} and {S1} went to the {PLACE}, {S2} gave a
    {OBJECT} to" (14 tokens)."""
    return ioi_dataset(VANILLA_TEMPLATE, n_prompts, seed)


def ioi_template_dataset(
    order: Order, idx: int, n_prompts: int = 24, seed: int = 0
) -> dict[str, JsonValue]:
    """Prompts of IOI-paper template ``idx`` in ``order``; the seed is offset per template
    so that templates do not share their name draws."""
    offset = idx + (0 if order == "ABBA" else 100)
    return ioi_dataset(template(order, idx), n_prompts, seed * 1000 + offset)
