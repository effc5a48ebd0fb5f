"""Block forward: an optional family capability for running a model block by block.

Patching needs nothing of the kind (``auto_circuit.families.contract``). Some algorithms
want to run a model from the middle, or to move its input along a path:

- ACDC starts each forward at the first block that holds a patched destination, from
  the clean residual stream cached at that block's input, and applies the final norm and
  unembedding only at the task's output positions;
- EAP-IG (``method="inputs"``) and edge attribution patching with input interpolation
  move the input residual (the embedding output) between the corrupt and clean prompts.

A family offers this by returning a ``BlockForward`` from its graph
(``FamilyGraph.block_forward``); algorithms reach it through
``PatchableModel.block_forward(need)``, which raises an error naming the need and the
family when the family has none. Algorithms that can do without it (ACDC runs the full
forward) ask ``PatchableModel.has_block_forward`` first.

Axis names: ``batch`` prompts, ``seq`` positions, ``d_model`` the residual stream,
``vocab`` the output logits.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class BlockInput:
    """What one block received in a recorded forward: its input residual stream and the
    attention mask passed with it (None where the model passed none)."""

    resid: Float[Tensor, "batch seq d_model"]
    attention_mask: Tensor | None


class BlockForward(Protocol):
    """Running one model of a family from block ``l`` (its blocks ``0 .. n_blocks-1``
    run in this order, each reading and writing the residual stream ``[batch, seq,
    d_model]``)."""

    @property
    def n_blocks(self) -> int:
        """The number of blocks."""
        ...

    @property
    def input_hook(self) -> str:
        """The module whose output is the input residual stream (the embedding output,
        the input of block 0): a hook point for a path over the inputs."""
        ...

    @property
    def unembeds_per_position(self) -> bool:
        """Whether ``unembed`` maps each position's final residual to its logits on its
        own, exactly as the full forward does (False where the logits are post-processed
        across the vocabulary, e.g. soft-capped)."""
        ...

    def block_of(self, module_name: str) -> int | None:
        """The block holding module ``module_name`` (None: outside every block, such as
        the embedding or the final norm)."""
        ...

    def recording_block_inputs(self) -> AbstractContextManager[dict[int, BlockInput]]:
        """A context in which each forward of the model records, per block index, the
        block's input (detached); the dict is filled during the forward."""
        ...

    def run_from_block(
        self,
        resid: Float[Tensor, "batch seq d_model"],
        block: int,
        attention_mask: Tensor | None = None,
        stop_before_unembed: bool = False,
    ) -> Tensor:
        """Run blocks ``block .. n_blocks-1`` on ``resid`` (the input of ``block``) and
        then the final norm and unembedding: logits ``[batch, seq, vocab]``. With
        ``stop_before_unembed`` the last block's output residual ``[batch, seq,
        d_model]`` instead (apply ``unembed`` to the positions needed)."""
        ...

    def unembed(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """The final norm and unembedding applied to final residuals, per position (only
        where ``unembeds_per_position``)."""
        ...

    def embed(self, inputs: Tensor, **forward_kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
        """The input residual stream for ``inputs`` and the keyword arguments with which
        the model's forward runs from it (``model(resid, **kwargs)`` equals
        ``model(inputs, **forward_kwargs)``). ``forward_kwargs``: what the forward would
        also be given (a KV cache)."""
        ...
