"""ACDC's options, checked once: ``ACDCConfig``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import AblationType

FaithfulnessTarget = Literal["kl_div", "mse", "logit_diff"]
TARGETS: tuple[FaithfulnessTarget, ...] = ("kl_div", "mse", "logit_diff")


@dataclass(frozen=True)
class ACDCConfig:
    """Every option of one ACDC run (see ``run_acdc`` for their meaning).

    ``taus``: the distinct thresholds, ascending (``taus_from``). ``candidates_per_forward``
    None: chosen from memory (``evaluator.default_candidates``). ``test_mode``,
    ``run_circuits_ref``, ``show_graphs`` and ``draw_seq_graph_ref``: checks and
    pictures of every step (``run_acdc``); they never change the result.
    """

    taus: tuple[float, ...]
    faithfulness_target: FaithfulnessTarget = "kl_div"
    ablation_type: AblationType = AblationType.RESAMPLE
    candidates_per_forward: int | None = None
    resume_from: str | Path | None = None
    state_path: str | Path | None = None
    show_progress: bool = True
    save_every: int = 20
    test_mode: bool = False
    run_circuits_ref: Callable[..., Any] | None = None
    show_graphs: bool = False
    draw_seq_graph_ref: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not self.taus:
            raise CircuitError("ACDC needs at least one tau.")
        bad = [tau for tau in self.taus if not (math.isfinite(tau) and tau > 0)]
        if bad:
            raise CircuitError(
                f"Every tau = base * 10**exp must be finite and positive, got {bad}; use "
                "positive tao_bases (e.g. tao_bases=(1, 5))."
            )
        if list(self.taus) != sorted(set(self.taus)):
            raise CircuitError(f"taus must be distinct and ascending, got {list(self.taus)}.")
        if self.faithfulness_target not in TARGETS:
            raise CircuitError(
                f"faithfulness_target must be one of {TARGETS}, got {self.faithfulness_target!r}."
            )
        k = self.candidates_per_forward
        if k is not None and (not isinstance(k, int) or k < 1):
            raise CircuitError(f"candidates_per_forward must be a positive int or None, got {k!r}.")
        if not isinstance(self.save_every, int) or self.save_every < 1:
            raise CircuitError(f"save_every must be a positive int, got {self.save_every!r}.")


def taus_from(
    tao_exps: Iterable[int | float], tao_bases: Iterable[int | float]
) -> tuple[float, ...]:
    """The sorted distinct thresholds ``base * 10**exp``."""
    exps, bases = list(tao_exps), list(tao_bases)
    if not exps or not bases:
        raise CircuitError("tao_exps and tao_bases must each hold at least one value.")
    return tuple(sorted({float(b) * 10.0 ** float(e) for b in bases for e in exps}))
