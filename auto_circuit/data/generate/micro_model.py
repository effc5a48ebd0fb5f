"""Float inputs for the hand-computable MicroModel (``auto_circuit.families.micro``).

Each prompt is one position ``[[x, x]]`` with ``x`` in 1..n; its corrupt prompt is
``[[-x, -x]]``. A MicroModel with L blocks maps ``[a, b]`` to ``[5^L a, 7^L b]`` (each
block adds ``[4a, 6b]`` to the residual stream), so for positive x output 1 is always the
larger: the answer is index 1 and the wrong answer index 0. With ``[[1, 1]]`` and two
blocks the output is ``[25, 49]``.
"""

from __future__ import annotations

from auto_circuit.data.generate.common import JsonValue, make_dataset, make_prompt


def micro_model_dataset(
    n_prompts: int = 16, multiple_answers: bool = False
) -> dict[str, JsonValue]:
    """Prompts ``[[x, x]]`` for x = 1..n_prompts (answers ``[1]``, or ``[0, 1]`` with
    ``multiple_answers``, when the wrong answers are empty)."""
    prompts = []
    for x in range(1, n_prompts + 1):
        value = float(x)
        answers: list[JsonValue] = [0, 1] if multiple_answers else [1]
        wrong: list[JsonValue] = [] if multiple_answers else [0]
        prompts.append(make_prompt([[value, value]], [[-value, -value]], answers, wrong))
    return make_dataset(prompts)
