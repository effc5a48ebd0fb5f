"""AutoCircuit's ``custom_tqdm``: ``tqdm`` with the package's progress-bar defaults.

``from auto_circuit.utils.custom_tqdm import tqdm`` keeps working. AutoCircuit required
the author's ``vscode-tqdm`` fork; this is the ordinary ``tqdm.auto`` (a notebook widget
in Jupyter, text elsewhere).
"""

from __future__ import annotations

from functools import partial

from tqdm.auto import tqdm as _tqdm

tqdm = partial(_tqdm, dynamic_ncols=True, bar_format="{desc}{bar}{r_bar}", leave=None, delay=0)
"""``tqdm.auto.tqdm`` with AutoCircuit's defaults: width follows the terminal, the bar
disappears when done (``leave=None`` keeps only top-level bars); every default can be
overridden per call."""

__all__ = ["tqdm"]
