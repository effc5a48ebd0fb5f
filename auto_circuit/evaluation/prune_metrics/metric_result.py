"""Per-prompt metric values and their summary at one circuit size.

Every prune metric comes in two forms. ``*_results(model, dataloader, circuit_outs, ...)``
returns one :class:`MetricResult` per circuit size, holding the value of every prompt
(so the spread and the worst prompts can be reported); ``measure_*`` returns only the
aggregate values as ``Measurements`` ``[(circuit size, value)]`` for curves and AUCs.

Axis names are those of :mod:`auto_circuit.vocabulary.axes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch as t
from jaxtyping import Float
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.types import Measurements


@dataclass(frozen=True, eq=False)
class MetricResult:
    """A metric at one circuit size.

    Attributes:
        size: The circuit size (the key of ``CircuitOutputs``).
        value: The aggregate the metric reports (see each metric; usually the mean of
            ``per_prompt``).
        per_prompt: The value of each prompt, in loader order, on the CPU. For metrics
            averaged over token positions each prompt's value is its own mean over them.
    """

    size: int
    value: float
    per_prompt: Float[Tensor, " prompt"]

    def __post_init__(self) -> None:
        if self.per_prompt.ndim != 1:
            raise CircuitError(
                f"MetricResult.per_prompt must be 1-D (one value per prompt), got shape "
                f"{list(self.per_prompt.shape)}."
            )

    @property
    def n_prompts(self) -> int:
        return self.per_prompt.numel()

    @property
    def std(self) -> float:
        """Sample standard deviation over prompts (0 for a single prompt)."""
        if self.n_prompts < 2:
            return 0.0
        return float(self.per_prompt.std(correction=1))

    @property
    def min(self) -> float:
        return float(self.per_prompt.min())

    @property
    def max(self) -> float:
        return float(self.per_prompt.max())

    def worst(self, lower_better: bool, n: int = 1) -> Tensor:
        """Indices (in loader order) of the ``n`` worst prompts, worst first."""
        n = min(n, self.n_prompts)
        return self.per_prompt.topk(n, largest=lower_better).indices


def to_measurements(results: Sequence[MetricResult]) -> Measurements:
    """``[(size, value)]`` of ``results``, by increasing size."""
    return [(r.size, r.value) for r in sorted(results, key=lambda r: r.size)]


def result_from_prompts(size: int, per_prompt: Sequence[Tensor]) -> MetricResult:
    """A result whose value is the mean of the concatenated per-prompt values."""
    values = t.cat([v.flatten() for v in per_prompt]).cpu()
    return MetricResult(size=size, value=float(values.mean()), per_prompt=values)
