"""Fast paths: an optional capability a family may offer the engine's fast layer.

None of this changes what patching computes (``auto_circuit.families.contract``); it lets
the fast engine (``auto_circuit.engine.fast``) compute the same thing with less memory
traffic. A family without it is patched exactly, by the same engine, through its plain
``DestHook.add`` functions; with fast paths switched off (``AUTO_CIRCUIT_FAST_PATHS=0`` or
``patchable_model(..., fast_paths=False)``) every family runs on the reference engine.

What a family may offer, keyed by the plain sites' ``module_name``:

- ``HeadProjection`` per source site whose sources are per-head products: the engine
  writes ``patch - z_h W_h`` into its table directly (no contributions tensor);
- ``FastDest`` per destination site: a ``fuse_key`` (sites with one key and the same
  sources have their deltas computed by one product), a ``base_probe`` (a probe the
  family adds to every head's delta; the engine may fold it into that product), and a
  ``FastAdd`` per hook that takes the lazy ``Delta`` instead of a tensor;
- interceptors: family code installed on the model that asks the engine for this
  forward's deltas (to skip computing what a destination hook will replace).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch as t
from torch import Tensor


@dataclass(frozen=True)
class HeadProjection:
    """Sources that are per-head products ``z_h @ W_h`` (attention heads' outputs):
    ``operands(output)`` gives ``z`` ``[batch, seq, head, d_head]`` and ``W``
    ``[head, d_head, d_model]`` from the hooked output, so that without gradients the
    engine writes ``patch - z_h W_h`` into its table in one product instead of forming
    the heads' outputs as a tensor and subtracting them (half the memory traffic)."""

    operands: Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Delta:
    """A destination's delta ``[batch, seq, (head,) d_model]``, computed on call.

    A function rather than a tensor so that a family can recompute it inside an
    activation checkpoint instead of keeping per-head copies for the backward pass.
    ``is_zero``: every mask of the destination is 0 in this forward (mask-gradient
    attribution), so the value is 0 and only its gradient matters; a family may then
    keep the hooked tensor and give the delta its gradient directly. ``owned``: the
    caller is the tensor's only reader in this forward (no gradients), so it may
    overwrite it. ``includes_base``: the value already holds the site's ``base_probe``
    output (broadcast over heads) added to the delta; the family must not add it again.
    """

    compute: Callable[[], Tensor]
    is_zero: bool = False
    owned: bool = False
    includes_base: bool = False

    def __call__(self) -> Tensor:
        return self.compute()


FastAdd = Callable[[Tensor, Delta, Mapping[str, Tensor]], Tensor]
"""(hooked tensor, the destination's ``Delta``, probe outputs of this forward) ->
patched tensor: the same result as the plain ``DestHook.add`` of that hook."""


@dataclass(frozen=True)
class FastDest:
    """A destination site's fast paths; ``adds`` has one entry per hook of the plain
    site, in the same order (None: use the plain ``add``)."""

    fuse_key: str | None = None
    base_probe: str | None = None
    adds: tuple[FastAdd | None, ...] = ()


GetDelta = Callable[[str], "Delta | None"]
"""During a forward pass: the ``Delta`` of the destination site with this module name,
or None when it is unchanged in this forward (or patch mode is off)."""

Interceptor = Callable[[t.nn.Module, GetDelta], Callable[[], None]]
"""Installs family code on the model that may ask the engine for deltas; returns an
uninstaller."""


@dataclass(frozen=True)
class FastPaths:
    """A family's fast paths for one graph (see the module docstring)."""

    head_projections: Mapping[str, HeadProjection] = field(default_factory=dict)
    dests: Mapping[str, FastDest] = field(default_factory=dict)
    interceptors: tuple[Interceptor, ...] = ()
