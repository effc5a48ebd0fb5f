"""The one switch between the reference engine and the fast one.

``AUTO_CIRCUIT_FAST_PATHS=0`` in the environment (read when a model is wrapped) or
``patchable_model(..., fast_paths=False)`` patches with the reference engine
(``auto_circuit.engine.reference``): the definition, without any fast path. The default
is the fast engine (``auto_circuit.engine.fast``), with the family's fast paths where it
has them. Both give the same results; the test suite runs on each.
"""

from __future__ import annotations

import os

from auto_circuit.vocabulary.errors import CircuitError

ENV_VAR = "AUTO_CIRCUIT_FAST_PATHS"


def fast_paths_default() -> bool:
    """Whether fast paths are on when ``patchable_model`` is not told (the environment)."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise CircuitError(f"{ENV_VAR} must be 1 or 0 (on or off), got {value!r}.")
