"""ACDC's progress, saved and loaded so that an interrupted run can resume exactly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch as t
from torch import Tensor

from auto_circuit.vocabulary.errors import CircuitError

STATE_VERSION = 1


@dataclass
class State:
    """Progress of a run; what ``state_path`` saves and ``resume_from`` loads.

    ``decisions[i, p]`` / ``values[i, p]``: at ``taus[i]``, whether the edge at order
    position ``p`` was removed and the metric of the circuit that decided it (the
    circuit before it, plus it removed); set for the finished taus and, in the current
    one, for positions before ``pos``.
    """

    fingerprint: dict[str, Any]
    decisions: Tensor
    values: Tensor
    estimates: Tensor  # per position, its last measured increase (NaN: never measured)
    tau_idx: int = 0
    pos: int = 0
    base_value: float | None = None
    n_edges_tested: int = 0
    n_reused: int = 0
    n_skipped: int = 0
    n_evaluations: int = 0
    n_forwards: int = 0
    n_rows: int = 0
    forward_equivalents: float = 0.0

    @classmethod
    def fresh(cls, fingerprint: dict[str, Any], n_taus: int, n_edges: int) -> State:
        return cls(
            fingerprint,
            decisions=t.zeros(n_taus, n_edges, dtype=t.bool),
            values=t.full((n_taus, n_edges), float("nan"), dtype=t.float64),
            estimates=t.full((n_edges,), float("nan"), dtype=t.float64),
        )

    def current_value(self) -> float:
        """The metric of the current circuit (the last accepted removal's)."""
        accepted = self.decisions[self.tau_idx, : self.pos].nonzero()
        if len(accepted) == 0:
            assert self.base_value is not None
            return self.base_value
        return float(self.values[self.tau_idx, int(accepted[-1])])

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
        }


def save_state(path: str | Path, state: State) -> None:
    """Write the state to a temporary file, then atomically replace ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        t.save(state.to_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: str | Path, fingerprint: dict[str, Any]) -> State:
    """The state saved at ``path`` by a run with this ``fingerprint`` (else an error)."""
    path = Path(path)
    if not path.exists():
        raise CircuitError(
            f"resume_from={str(path)!r} does not exist. Pass a state file written by an "
            "earlier run's state_path, or resume_from=None to start afresh."
        )
    data = t.load(path, weights_only=True)
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise CircuitError(f"{str(path)!r} is not an ACDC state file of this version.")
    saved = data["fingerprint"]
    differs = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if differs:
        raise CircuitError(
            f"The ACDC state in {str(path)!r} was made by a different run: it differs in "
            f"{differs}. Resume with the same model, graph, dataloader, taus, "
            "faithfulness_target and ablation_type, or start afresh (resume_from=None)."
        )
    data.pop("version")
    data.pop("last_decision", None)  # written by earlier versions, no longer used
    return State(**data)
