"""Generators of the packaged prompt datasets (``auto_circuit/datasets/**/*.json``).

Every dataset is built by a pure function of its size and seed (a local
``random.Random``), so the shipped files are reproducible: ``python -m
auto_circuit.data.generate`` rewrites all of them, byte for byte. ``DATASETS`` maps each
file (relative to ``auto_circuit/datasets``) to the call that builds it.

Load a shipped file with ``auto_circuit.vocabulary.misc.repo_path_to_abs_path(
"datasets/ioi/ioi_vanilla_template_prompts.json")`` (it resolves inside the installed
package) and ``auto_circuit.data.load_datasets_from_json``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path

from auto_circuit.data.generate.common import JsonValue, dumps
from auto_circuit.data.generate.docstring import docstring_dataset
from auto_circuit.data.generate.greaterthan import greaterthan_dataset
from auto_circuit.data.generate.ioi import ioi_template_dataset, ioi_vanilla_dataset
from auto_circuit.data.generate.micro_model import micro_model_dataset
from auto_circuit.data.generate.tracr import tracr_reverse_dataset, tracr_xproportion_dataset

DatasetBuilder = Callable[[], dict[str, JsonValue]]

DATASETS: dict[str, DatasetBuilder] = {
    "ioi/ioi_vanilla_template_prompts.json": partial(ioi_vanilla_dataset, 400, 0),
    **{
        f"ioi/ioi_{order}_template_{idx}_prompts.json": partial(
            ioi_template_dataset, order, idx, 24, 0
        )
        for order in ("ABBA", "BABA")
        for idx in range(15)
    },
    "greaterthan_gpt2-small_prompts.json": partial(greaterthan_dataset, 200, 0),
    "docstring_prompts.json": partial(docstring_dataset, 200, 0),
    "tracr/tracr_reverse_len_5_prompts.json": partial(tracr_reverse_dataset, 0),
    "tracr/tracr_xproportion_len_5_prompts.json": partial(tracr_xproportion_dataset, 0),
    "micro_model_inputs.json": partial(micro_model_dataset, 16, False),
    "micro_model_inputs_multiple_answers.json": partial(micro_model_dataset, 16, True),
}
"""Each packaged dataset file and the call that builds it."""


def package_datasets_dir() -> Path:
    """``auto_circuit/datasets`` in the source tree or the installed package."""
    return Path(str(resources.files("auto_circuit"))) / "datasets"


def write_datasets(root: Path | None = None) -> list[Path]:
    """Build every dataset of ``DATASETS`` and write it under ``root`` (default: the
    package's ``datasets`` folder). Returns the written paths."""
    root = package_datasets_dir() if root is None else root
    written = []
    for rel_path, build in DATASETS.items():
        path = root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(build()), encoding="utf-8")
        written.append(path)
    return written


__all__ = ["DATASETS", "package_datasets_dir", "write_datasets"]
