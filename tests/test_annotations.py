"""The shape annotations: one axis vocabulary, and checked at run time in the suite."""

from __future__ import annotations

import re
from pathlib import Path

import jaxtyping
import pytest
import shape_checks
import torch as t

import auto_circuit
from auto_circuit.vocabulary.axes import AXES

PACKAGE = Path(auto_circuit.__file__).parent
ANNOTATION = re.compile(
    r'\b(?:Float|Int|Bool|Num|Shaped|Integer|Real|UInt|Inexact)\[\s*[\w.]+\s*,\s*"([^"]*)"\s*\]'
)


def test_every_axis_name_is_in_the_vocabulary() -> None:
    undocumented: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for shape in ANNOTATION.findall(path.read_text()):
            for axis in shape.split():
                name = axis.lstrip("*#_")
                if name in ("", "...") or name.isdigit() or name in AXES:
                    continue
                undocumented.setdefault(name, set()).add(str(path.relative_to(PACKAGE)))
    assert undocumented == {}, "document these axes in auto_circuit/vocabulary/axes.py"


def test_every_axis_in_the_vocabulary_is_in_its_docstring() -> None:
    from auto_circuit.vocabulary import axes

    assert axes.__doc__ is not None
    assert {name for name in AXES if f"``{name}``" not in axes.__doc__} == set()


def test_shape_annotations_are_checked_at_run_time(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--no-shape-checks"):
        pytest.skip("shape checks are off (--no-shape-checks)")
    assert shape_checks.installed()
    from auto_circuit.evaluation.prune_metrics.kl_div import kl_div

    logits = t.zeros(3, 5)
    with pytest.raises(jaxtyping.TypeCheckError, match="logits"):
        kl_div(logits, t.zeros(3, 6))  # vocab 5 then 6
    with shape_checks.off():
        with pytest.raises(RuntimeError):
            kl_div(logits, t.zeros(3, 6))
