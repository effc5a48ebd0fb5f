"""Greater-Than prompts (Hanna et al. 2023, arXiv:2305.00586).

Clean: "The war lasted from the year 1732 to 17": GPT-2 should continue with a two-digit
year greater than 32. Answers: every two-digit year ``"33"`` ... ``"99"``; wrong answers:
``"00"`` ... ``"32"`` (GPT-2 writes the year as the tokens " 17" and "32", so the answers
carry no space). Corrupt: the same sentence with the start year's last two digits set to
"01" ("... from the year 1701 to 17"), as in the paper.

Start years are 1102-1798 with YY in 02-98, leaving out the years that GPT-2 does not
write as " XX" + "YY" (Hanna et al. do the same). No GPT-2 tokenizer is available here,
so that set was computed once from GPT-2's BPE vocabulary and is listed below.
"""

from __future__ import annotations

import random

from auto_circuit.data.generate.common import JsonValue, Prompt, make_dataset, make_prompt
from auto_circuit.data.generate.words import EVENT_NOUNS

TEMPLATE = "The {noun} lasted from the year {century}{yy:02d} to {century}"

CENTURIES = range(11, 18)

GPT2_UNSPLIT_YEARS = frozenset(
    [*range(1102, 1110), 1111, *range(1113, 1119), *range(1120, 1130), *range(1151, 1160)]
    + [*range(1190, 1199), 1280, *range(1302, 1310), 1440, *range(1502, 1510)]
)
"""Years 1102-1798 (YY in 02-98) that GPT-2 does not tokenise as " XX" + "YY"."""


def valid_years() -> list[int]:
    """The start years used: XX in 11-17, YY in 02-98, split by GPT-2 as " XX" + "YY"."""
    return [
        century * 100 + yy
        for century in CENTURIES
        for yy in range(2, 99)
        if century * 100 + yy not in GPT2_UNSPLIT_YEARS
    ]


def two_digits(value: int) -> str:
    return f"{value:02d}"


def greaterthan_prompt(noun: str, year: int) -> Prompt:
    """The prompt pair for ``noun`` and start ``year`` (corrupt: the year XX01)."""
    century, yy = divmod(year, 100)
    clean = TEMPLATE.format(noun=noun, century=century, yy=yy)
    corrupt = TEMPLATE.format(noun=noun, century=century, yy=1)
    answers = [two_digits(y) for y in range(yy + 1, 100)]
    wrong = [two_digits(y) for y in range(yy + 1)]
    return make_prompt(clean, corrupt, answers, wrong)


def greaterthan_dataset(n_prompts: int = 200, seed: int = 0) -> dict[str, JsonValue]:
    """``n_prompts`` distinct prompt pairs with nouns and years drawn from ``seed``."""
    rng = random.Random(seed)
    pairs = [(noun, year) for noun in EVENT_NOUNS for year in valid_years()]
    if n_prompts > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct Greater-Than prompts")
    chosen = rng.sample(pairs, n_prompts)
    return make_dataset([greaterthan_prompt(noun, year) for noun, year in chosen])
