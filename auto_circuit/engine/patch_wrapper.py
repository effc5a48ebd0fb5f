"""The patching engine: exact edge patching with hooks, independent of any model library.

In patch mode every source site records its output during the forward pass, and
every destination adds to its input

    delta = sum over incoming edges (src -> dest) of mask[edge] * (P[src] - C[src])

where ``P`` are the patch values of the sources (``patch_src_outs``: corrupt, zero or
mean activations) and ``C`` their outputs in this very forward. Because destinations
read the residual stream before any normalisation and the residual stream is the sum
of source outputs, this replaces exactly the edge's contribution and nothing else; a
patched edge always carries ``P[src]`` whatever upstream patches did to ``C[src]``.

Work is only done where it matters: a destination whose mask is all zero (and needs no
gradient) is skipped, as are sources none of whose masks are non-zero; per-head source
outputs and per-head destination inputs are built only for such destinations.

All state lives in ``PatchState`` and is changed only by the context managers of
``auto_circuit.engine.graph_utils``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch as t
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from auto_circuit.engine.kernels.table_ops import masked_sum
from auto_circuit.families.registry import ApplyDelta, Delta, DestSite, FamilyGraph, SrcSite
from auto_circuit.vocabulary.errors import CircuitError
from auto_circuit.vocabulary.tensor_ops import sample_hard_concrete
from auto_circuit.vocabulary.types import MaskFn


@dataclass
class PatchState:
    """Mutable patching state shared by all hooks of one ``PatchableModel``."""

    patch_mode: bool = False
    patch_src_outs: Tensor | None = None
    curr_src_outs: Tensor | None = None
    patch_is_delta: bool = False  # patch_src_outs holds P - C itself (fixed differences)
    mask_fn: MaskFn = None
    dropout_p: float = 0.0
    training: bool = False
    # Per forward pass (cleared before and after each one):
    outputs: dict[int, Tensor] = field(default_factory=dict)
    currents: dict[int, Tensor | None] = field(default_factory=dict)  # None: not kept
    dest_deltas: dict[str, Tensor | None] = field(default_factory=dict)
    # Partial deltas computed early (see PatchEngine.riders): the sources they cover.
    partials: dict[str, tuple[range, Tensor]] = field(default_factory=dict)
    active: dict[str, range] = field(default_factory=dict)  # see PatchEngine._active_range
    with_base: set[str] = field(default_factory=set)  # deltas holding their base_probe
    row_stats: dict[str, Tensor] = field(default_factory=dict)  # see Delta.row_stats
    mask_samples: dict[str, Tensor] = field(default_factory=dict)
    probes: dict[str, Tensor] = field(default_factory=dict)
    table: Tensor | None = None  # [batch*seq, n_src, d_model]: P - C of every source
    table_shape: tuple[int, int, int] = (0, 0, 0)  # batch, seq, d_model of the table
    # The table of the last forward without gradients, reused by the next one of the same
    # shape (a fresh 100+ MiB tensor per forward is page-faulted and zeroed each time).
    # Never one that a backward pass may still read. Dropped when patch_mode exits.
    spare_table: Tensor | None = None
    spare_deltas: Tensor | None = None  # likewise for a block's fused Q/K/V deltas

    def clear_forward(self) -> None:
        self.outputs.clear()
        self.currents.clear()
        self.dest_deltas.clear()
        self.partials.clear()
        self.active.clear()
        self.with_base.clear()
        self.row_stats.clear()
        self.mask_samples.clear()
        self.probes.clear()
        self.table = None


class PatchWrapperImpl:
    """One site of the graph in the wrapped model: a block of sources, or a destination
    module with its mask. Holds the hook handles; does no work outside patch mode."""

    def __init__(
        self,
        module_name: str,
        is_src: bool,
        is_dest: bool,
        src_idxs: range | None = None,
        in_srcs: range | None = None,
        n_heads: int | None = None,
        masks: dict[str, t.nn.Parameter] | None = None,
    ):
        self.module_name = module_name
        self.is_src = is_src
        self.is_dest = is_dest
        self.src_idxs = src_idxs
        self.in_srcs = in_srcs
        self.n_heads = n_heads
        self.head_dim = 2 if n_heads is not None else None
        self._masks = masks
        self.handles: list[RemovableHandle] = []

    @property
    def patch_mask(self) -> t.nn.Parameter:
        if self._masks is None:
            raise CircuitError(f"{self.module_name} is a source site; it has no mask.")
        return self._masks[self.module_name]

    def __repr__(self) -> str:
        kind = "+".join(k for k, on in (("src", self.is_src), ("dest", self.is_dest)) if on)
        return f"PatchWrapperImpl({self.module_name!r}, {kind})"


class PatchEngine:
    """Installs the hooks of a ``FamilyGraph`` on a model and computes patch deltas."""

    def __init__(
        self,
        model: t.nn.Module,
        graph: FamilyGraph,
        seq_len: int | None,
        device: t.device,
        dtype: t.dtype,
    ):
        self.model = model
        self.graph = graph
        self.seq_len = seq_len
        self.state = PatchState()
        self.src_sites: list[SrcSite] = sorted(graph.src_sites, key=lambda s: s.src_idxs.start)
        self.dest_sites: dict[str, DestSite] = {d.module_name: d for d in graph.dest_sites}
        self.fuse_partners: dict[str, list[DestSite]] = {
            d.module_name: [
                p
                for p in graph.dest_sites
                if p is not d
                and d.fuse_key
                and p.fuse_key == d.fuse_key
                and p.in_srcs == d.in_srcs
                and p.n_heads is not None
                and d.n_heads is not None
            ]
            for d in graph.dest_sites
        }
        self.riders: dict[str, list[DestSite]] = _riders(graph.dest_sites)
        self.masks: dict[str, t.nn.Parameter] = {
            d.module_name: t.nn.Parameter(
                t.zeros(self.mask_shape(d), device=device, dtype=dtype), requires_grad=False
            )
            for d in graph.dest_sites
        }
        self.src_wrappers = [
            PatchWrapperImpl(s.module_name, True, False, src_idxs=s.src_idxs)
            for s in self.src_sites
        ]
        self.dest_wrappers = [
            PatchWrapperImpl(
                d.module_name, False, True, in_srcs=d.in_srcs, n_heads=d.n_heads, masks=self.masks
            )
            for d in graph.dest_sites
        ]
        self._handles: list[RemovableHandle] = []
        self._install()

    def mask_shape(self, site: DestSite) -> tuple[int, ...]:
        seq = (self.seq_len,) if self.seq_len is not None else ()
        heads = (site.n_heads,) if site.n_heads is not None else ()
        return seq + heads + (len(site.in_srcs),)

    # ---- hooks -------------------------------------------------------------------

    def _install(self) -> None:
        state = self.state
        model = self.model

        def reset(*_: Any) -> None:
            state.clear_forward()

        self._handles.append(model.register_forward_pre_hook(reset))
        self._handles.append(model.register_forward_hook(reset))
        # Destinations first: where a module is both, the source records patched output.
        for wrapper, site in zip(self.dest_wrappers, self.graph.dest_sites, strict=True):
            for hook in site.hooks:
                module = model.get_submodule(hook.hook_module)
                if hook.where == "output":
                    handle = module.register_forward_hook(self._dest_output_hook(site, hook.apply))
                else:
                    handle = module.register_forward_pre_hook(
                        self._dest_input_hook(site, hook.apply)
                    )
                wrapper.handles.append(handle)
        for i, (wrapper, site) in enumerate(zip(self.src_wrappers, self.src_sites, strict=True)):
            module = model.get_submodule(site.hook_module)
            wrapper.handles.append(module.register_forward_hook(self._src_hook(i)))
        for name in self.graph.probes:
            self._handles.append(
                model.get_submodule(name).register_forward_hook(self._probe_hook(name))
            )
        self._uninstallers = [
            install(model, self._get_delta) for install in self.graph.interceptors
        ]

    def _get_delta(self, module_name: str) -> Delta | None:
        if not self.state.patch_mode:
            return None
        return self.delta_fn(self.dest_sites[module_name])

    def remove(self) -> None:
        """Remove every hook from the wrapped model."""
        for uninstall in self._uninstallers:
            uninstall()
        self._uninstallers.clear()
        for handle in self._handles:
            handle.remove()
        for wrapper in self.src_wrappers + self.dest_wrappers:
            for handle in wrapper.handles:
                handle.remove()
            wrapper.handles.clear()
        self._handles.clear()

    def _src_hook(self, i: int) -> Callable[..., None]:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> None:
            if state.patch_mode:
                state.outputs[i] = output

        return hook

    def _probe_hook(self, name: str) -> Callable[..., None]:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> None:
            if state.patch_mode:
                state.probes[name] = output

        return hook

    def _dest_output_hook(self, site: DestSite, apply: ApplyDelta | None) -> Callable:
        state = self.state

        def hook(module: t.nn.Module, args: Any, output: Tensor) -> Tensor | None:
            if not state.patch_mode:
                return None
            delta = self.delta_fn(site)
            if delta is None:
                return None
            return apply(output, delta, state.probes) if apply else output + delta()

        return hook

    def _dest_input_hook(self, site: DestSite, apply: ApplyDelta | None) -> Callable:
        state = self.state

        def hook(module: t.nn.Module, args: tuple) -> tuple | None:
            if not state.patch_mode:
                return None
            delta = self.delta_fn(site)
            if delta is None:
                return None
            patched = apply(args[0], delta, state.probes) if apply else args[0] + delta()
            return (patched, *args[1:])

        return hook

    # ---- deltas ------------------------------------------------------------------

    def mask_values(self, site: DestSite, batch_size: int) -> Tensor:
        """The mask as used in this forward (sampled once per forward and site)."""
        state = self.state
        if site.module_name in state.mask_samples:
            return state.mask_samples[site.module_name]
        mask: Tensor = self.masks[site.module_name]
        if state.mask_fn == "hard_concrete":
            batch_masks = mask.ndim > len(self.mask_shape(site))
            mask = sample_hard_concrete(mask, None if batch_masks else batch_size)
        elif state.mask_fn == "sigmoid":
            mask = t.sigmoid(mask)
        if state.dropout_p > 0 and state.training:
            mask = t.nn.functional.dropout(mask, p=state.dropout_p, training=True)
        state.mask_samples[site.module_name] = mask
        return mask

    def _active_range(self, site: DestSite) -> range:
        """Source indices whose mask column is non-zero somewhere (all of them when the
        mask is transformed or trained); found once per forward and site."""
        state = self.state
        if site.module_name in state.active:
            return state.active[site.module_name]
        mask = self.masks[site.module_name]
        if state.mask_fn is not None or mask.requires_grad:
            span = site.in_srcs
        else:
            nonzero = (mask != 0).reshape(-1, mask.shape[-1]).any(0)
            active = t.nonzero(nonzero).flatten().tolist()
            start = site.in_srcs.start
            span = range(start + active[0], start + active[-1] + 1) if active else range(0)
        state.active[site.module_name] = span
        return span

    def delta_fn(self, site: DestSite) -> Delta | None:
        """``sum_j mask[..., j] (P[j] - C[j])`` for a destination, computed on call, or
        None when the destination is unchanged in this forward."""
        state = self.state
        if state.patch_src_outs is None:
            raise CircuitError("patch mode is on but no patch_src_outs were given.")
        if site.module_name in state.dest_deltas:
            return self._cached_delta(site)
        if site.module_name in state.partials:
            return self._finish_partial(site)
        span = self._active_range(site)
        if not span:
            state.dest_deltas[site.module_name] = None
            return None
        groups = self._fill_table(span)
        mask = self.mask_values(site, state.table_shape[0])
        cols = self._cols(site, span)
        rows = self._rows(span)
        batch_masks = mask.ndim > len(self.mask_shape(site))
        if batch_masks and mask.shape[0] != state.table_shape[0]:
            raise CircuitError(
                f"Per-example masks (set_mask_batch_size) have batch size {mask.shape[0]} but "
                f"the input has {state.table_shape[0]} prompts; use the same batch size."
            )
        compute = self._masked_sum_fn(site, batch_masks, len(span))
        currents = [c for _, c in groups if c is not None and c.requires_grad]
        if not t.is_grad_enabled() or not (cols.requires_grad or currents):
            partners = [
                p
                for p in self.fuse_partners[site.module_name]
                if p.module_name not in state.dest_deltas
                and self.masks[p.module_name].ndim == len(self.mask_shape(p))
            ]
            if partners and not batch_masks:
                self._fused_deltas(site, partners)
            else:
                folded = self._fold_base([site], span, cols, None)
                if folded is not None:
                    cols, rows = folded
                    compute = self._masked_sum_fn(site, batch_masks, cols.shape[-1])
                with t.no_grad():
                    state.dest_deltas[site.module_name] = compute(cols, rows)
            return self._cached_delta(site)
        slots = [
            (g.start - span.start, g.stop - span.start)
            for g, c in groups
            if c is not None and c.requires_grad
        ]
        layout = _Layout(state.table_shape, self.seq_len is not None, batch_masks)
        # All masks 0 (mask-gradient attribution): the delta is 0 and is not computed.
        zero_shape = None
        if not bool(cols.detach().any()):
            batch, seq, d_model = state.table_shape
            heads = (site.n_heads,) if site.n_heads is not None else ()
            zero_shape = (batch, seq, *heads, d_model)
        args = (cols, compute, rows, layout, slots, zero_shape, *currents)
        return Delta(lambda: _TableMaskedSum.apply(*args), is_zero=zero_shape is not None)

    def _fused_deltas(self, site: DestSite, partners: list[DestSite]) -> None:
        """Deltas of sites sharing their sources (a block's Q, K, V) from one matmul over
        the union of their active sources: the table rows are read once, not per site.
        Without gradients, the same matmul also gives the sites that ride on this group
        (``riders``: the block's MLP, the final residual) their sum over these sources;
        they add the rest when their own hook asks (``_finish_partial``)."""
        state = self.state
        sites = [site]
        for partner in partners:
            if self._active_range(partner):
                sites.append(partner)
            else:
                state.dest_deltas[partner.module_name] = None
        spans = [self._active_range(s) for s in sites]
        span = range(min(r.start for r in spans), max(r.stop for r in spans))
        riders = []
        if not t.is_grad_enabled() and site.fuse_key is not None:
            riders = [
                r
                for r in self.riders.get(site.fuse_key, [])
                if r.module_name not in state.dest_deltas
                and r.module_name not in state.partials
                and self.masks[r.module_name].ndim == len(self.mask_shape(r))
                and r.in_srcs.start <= span.start
                and span.stop <= r.in_srcs.stop
                and self._active_range(r)
            ]
        self._fill_table(span)
        table = state.table
        assert table is not None
        cols = t.cat(
            [self._cols(s, span) for s in sites]
            + [self._cols(r, span).unsqueeze(-2) for r in riders],  # one row each
            dim=-2,
        )
        rows = self._rows(span)
        heads = [s.n_heads or 1 for s in sites] + [1] * len(riders)
        folded = self._fold_base(sites, span, cols, sum(heads[: len(sites)]))
        if folded is not None:  # the riders' rows get 0 in the base's column
            cols, rows = folded
        fused = DestSite("fused", (), sum(heads), site.in_srcs)
        with t.no_grad():
            out = None
            if not t.is_grad_enabled():
                # One buffer for every block's deltas: a block's hooks have read them
                # before the next block's are computed. A partial delta not used yet
                # (never, in the families shipped) is moved out first.
                for name, (covered, partial) in state.partials.items():
                    state.partials[name] = (covered, partial.clone())
                numel = sum(heads) * rows.shape[0] * rows.shape[-1]
                spare = state.spare_deltas
                if spare is None or spare.numel() < numel or spare.dtype != table.dtype:
                    state.spare_deltas = None
                    spare = state.spare_deltas = t.empty(
                        numel, dtype=table.dtype, device=table.device
                    )
                out = spare[:numel]
            # With the base folded in, each value row is a norm's whole input: its sum
            # and sum of squares come with the product (the kernel has the rows in
            # registers) instead of two more passes over it in the family's rebuild.
            stats = None
            if folded is not None:
                batch, seq, _ = state.table_shape
                stats = t.empty((batch, seq, sum(heads), 2), dtype=table.dtype)
            value = self._masked_sum_fn(fused, False, cols.shape[-1])(cols, rows, out, stats)
        parts = value.split(heads, dim=2)
        for s, part in zip(sites, parts, strict=False):
            state.dest_deltas[s.module_name] = part
        if stats is not None:
            for s, part in zip(sites, stats.split(heads, dim=2), strict=False):
                state.row_stats[s.module_name] = part
        for r, part in zip(riders, parts[len(sites) :], strict=True):
            state.partials[r.module_name] = (span, part.squeeze(2))

    def _cached_delta(self, site: DestSite) -> Delta | None:
        """The delta computed earlier in this forward (None: unchanged)."""
        state = self.state
        value = state.dest_deltas[site.module_name]
        if value is None:
            return None
        return Delta(
            lambda: value,
            owned=_sole_reader(site),
            includes_base=site.module_name in state.with_base,
            row_stats=state.row_stats.get(site.module_name),  # only for folded sites
        )

    def _fold_base(
        self, sites: list[DestSite], span: range, cols: Tensor, n_base_rows: int | None
    ) -> tuple[Tensor, Tensor] | None:
        """Without gradients, write the sites' common ``base_probe`` tensor into the table
        slot just after ``span`` so that their masked sum adds it (one more row of the
        matmul instead of a pass over the per-head result). The slot must belong to a
        source not yet written in this forward (a block's own heads, for its Q/K/V); its
        real value overwrites the base when that source is written. Returns the mask
        columns with one more (1 for the first ``n_base_rows`` rows, or all if None; 0
        for the rest) and the table rows with the slot, or None where it cannot; the
        sites' deltas are then marked ``includes_base``."""
        state = self.state
        table = state.table
        names = {s.base_probe for s in sites}
        if (
            t.is_grad_enabled()
            or table is None
            or len(names) != 1
            or any(s.n_heads is None for s in sites)
        ):
            return None
        (name,) = names
        base = state.probes.get(name) if name is not None else None
        slot = span.stop
        if base is None or slot >= table.shape[1] or tuple(base.shape) != state.table_shape:
            return None
        owner = next(i for i, s in enumerate(self.src_sites) if slot in s.src_idxs)
        if owner in state.currents:  # already holds this forward's differences
            return None
        table[:, slot].copy_(base.reshape(-1, base.shape[-1]))
        state.with_base.update(s.module_name for s in sites)
        col = cols.new_zeros((*cols.shape[:-1], 1))
        col[..., :n_base_rows, :] = 1
        return t.cat([cols, col], dim=-1), self._rows(range(span.start, slot + 1))

    def _finish_partial(self, site: DestSite) -> Delta:
        """A rider's delta: its partial sum plus the sources the partial did not cover."""
        state = self.state
        covered, value = state.partials.pop(site.module_name)
        active = self._active_range(site)
        before = range(active.start, min(covered.start, active.stop))
        after = range(max(covered.stop, active.start), active.stop)
        for part in (p for p in (before, after) if p):
            self._fill_table(part)
            compute = self._masked_sum_fn(site, False, len(part))
            with t.no_grad():
                value.add_(compute(self._cols(site, part), self._rows(part)))
        state.dest_deltas[site.module_name] = value
        return Delta(lambda: value, owned=_sole_reader(site))

    def _cols(self, site: DestSite, span: range) -> Tensor:
        """The columns of the site's mask (as used in this forward) for the sources
        ``span``."""
        mask = self.mask_values(site, self.state.table_shape[0])
        first = span.start - site.in_srcs.start
        return mask[..., first : first + len(span)]

    def _rows(self, span: range) -> Tensor:
        """The table rows of the sources ``span`` (filled by ``_fill_table``)."""
        table = self.state.table
        assert table is not None
        return table[:, span.start : span.stop]

    def _masked_sum_fn(self, site: DestSite, batch_masks: bool, n: int) -> Callable[..., Tensor]:
        """``(mask columns, table rows, out=None, stats=None) -> delta [batch, seq, (head,)
        d_model]``; ``out``: contiguous memory for the product; ``stats``: ``[batch, seq,
        head, 2]``, filled with each delta row's sum and sum of squares."""
        heads = site.n_heads is not None
        layout = _Layout(self.state.table_shape, self.seq_len is not None, batch_masks)

        def compute(
            cols: Tensor, rows: Tensor, out: Tensor | None = None, stats: Tensor | None = None
        ) -> Tensor:
            m = layout.masks(cols, site.n_heads or 1, n)
            if out is not None:
                out = out.view(*layout.table_shape[:2], site.n_heads or 1, -1)
            table_rows = layout.rows(rows)
            native = masked_sum(m, table_rows, out, stats)
            if native is not None:
                out = native
            else:
                out = t.matmul(m, table_rows, out=out)
                if stats is not None:
                    stats[..., 0] = out.sum(dim=-1)
                    stats[..., 1] = t.linalg.vector_norm(out, dim=-1).square_()
            return out if heads else out.squeeze(2)

        return compute

    def _fill_table(self, span: range) -> list[tuple[range, Tensor | None]]:
        """Write ``P - C`` of every source group overlapping ``span`` into this forward's
        table (once per group); returns (source range, current output) of those groups.
        The current output is None where it was written straight into the table by the
        family's ``DiffWriter`` (no gradients: nothing else reads it)."""
        state = self.state
        groups = []
        for i, site in enumerate(self.src_sites):
            src = site.src_idxs
            if src.stop <= span.start or src.start >= span.stop:
                continue
            if i not in state.currents:
                patch = state.patch_src_outs
                assert patch is not None
                patch = patch[src.start : src.stop]
                direct = i in state.outputs and not state.patch_is_delta and not t.is_grad_enabled()
                writer = site.diff_writer if direct else None
                if writer is not None:
                    output = state.outputs[i]
                    shape, dtype, device = writer.shape(output), output.dtype, output.device
                else:
                    current = self._current(i)
                    shape, dtype, device = tuple(current.shape), current.dtype, current.device
                self._check_shapes(site, patch.shape, shape)
                table = self._table(shape[1:], dtype, device)
                with t.no_grad():
                    patch = patch.to(dtype)
                    # [n, batch, seq, d] view of the rows
                    view = table[:, src.start : src.stop].view(*shape[1:3], len(src), -1)
                    view = view.permute(2, 0, 1, 3)
                    if writer is not None:
                        writer.write(output, patch, view)
                    elif state.patch_is_delta:
                        view.copy_(patch.expand_as(current))
                    else:
                        t.sub(patch, current.detach(), out=view)  # no temporary
                state.currents[i] = None if writer is not None else current
            groups.append((src, state.currents[i]))
        return groups

    def _current(self, i: int) -> Tensor:
        """The i-th source site's outputs in this forward, ``[n, batch, seq, d_model]``."""
        state = self.state
        site = self.src_sites[i]
        if state.patch_is_delta and i not in state.outputs:
            patch = state.patch_src_outs
            assert patch is not None
            return t.zeros_like(patch[site.src_idxs.start : site.src_idxs.stop])
        if i in state.outputs:
            return site.read(state.outputs[i])
        if state.curr_src_outs is not None:
            return state.curr_src_outs[site.src_idxs.start : site.src_idxs.stop]
        raise CircuitError(
            f"Source {site.module_name} did not run in this forward pass (e.g. the model "
            "started at a later layer) and no curr_src_outs were given to patch_mode."
        )

    def _check_shapes(self, site: SrcSite, patch: t.Size, current: tuple[int, ...]) -> None:
        """The patch values fit the source's output in this forward, and the input has
        the graph's number of token positions."""
        if not _broadcastable(patch[1:], t.Size(current[1:])):
            raise CircuitError(
                f"patch_src_outs has [batch, seq, d_model] = {list(patch[1:])} "
                f"but source {site.module_name} produced {list(current[1:])} in "
                "this forward. Compute the ablations on a batch of the same shape as "
                "the input (batch and seq of size 1 broadcast)."
            )
        if self.seq_len is not None and current[2] != self.seq_len:
            raise CircuitError(
                f"The model was made patchable with seq_len={self.seq_len}, but this input "
                f"has {current[2]} token positions. Use prompts of exactly "
                f"{self.seq_len} tokens (after any KV-cache prefix), or seq_len=None."
            )

    def _table(self, shape: tuple[int, ...], dtype: t.dtype, device: t.device) -> Tensor:
        """This forward's table of source differences, allocated on first use for
        sources of ``shape`` ``[batch, seq, d_model]``.

        Layout ``[batch*seq, n_src, d_model]``: token-major, so that each destination's
        delta is one matmul batched over tokens, written in the delta's own
        ``[batch, seq, head, d_model]`` layout (measured ~20% faster here than one
        ``[head, n] @ [n, batch*seq*d_model]`` product, whose small inner dimension makes
        the BLAS repack the whole table).
        """
        state = self.state
        if state.table is None:
            batch, seq, d_model = shape
            n_src = self.src_sites[-1].src_idxs.stop
            size = (batch * seq, n_src, d_model)
            spare = state.spare_table
            if t.is_grad_enabled():
                state.table = t.empty(size, device=device, dtype=dtype)
            elif (
                spare is not None
                and spare.shape == size
                and spare.dtype == dtype
                and spare.device == device
            ):
                state.table = spare
            else:
                state.table = state.spare_table = None  # free the old one first
                state.table = t.empty(size, dtype=dtype, device=device)
                state.spare_table = state.table
            state.table_shape = (batch, seq, d_model)
        return state.table


class _TableMaskedSum(t.autograd.Function):
    """``delta = compute(mask columns, table rows)`` with gradients for the mask and for
    the sources' current outputs (``d delta / d C = -mask``), without saving copies: the
    table rows are never rewritten during the forward pass they belong to. With
    ``zero_shape`` (every mask 0) the value is a broadcast 0 of that shape, not computed.
    """

    @staticmethod
    def forward(ctx, cols, compute, rows, layout, slots, zero_shape, *currents):  # type: ignore[override]
        ctx.rows, ctx.layout, ctx.slots = rows, layout, slots
        ctx.save_for_backward(cols)
        if zero_shape is not None:
            return rows.new_zeros(()).expand(zero_shape)
        with t.no_grad():
            return compute(cols, rows)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (cols,) = ctx.saved_tensors
        layout: _Layout = ctx.layout
        need_mask = ctx.needs_input_grad[0]
        need_currents = any(ctx.needs_input_grad[6:]) and bool(cols.detach().any())
        batch, seq, d_model = layout.table_shape
        g = grad.reshape(batch, seq, -1, d_model)  # [batch, seq, head, d]
        n = cols.shape[-1]
        m = layout.masks(cols, g.shape[2], n)  # [batch|1, seq|1, head, n]
        rows = layout.rows(ctx.rows)  # [batch, seq, n, d]
        grad_cols = neg_grad_rows = None
        if need_mask:  # summed over the tokens that share a mask
            per_token = t.matmul(g, rows.transpose(-1, -2))  # [batch, seq, head, n]
            shared = [dim for dim in (0, 1) if m.shape[dim] == 1]
            if shared:  # (an empty list would sum over every dimension)
                per_token = per_token.sum(shared, keepdim=True)
            grad_cols = per_token.reshape(cols.shape)
        if need_currents:  # d delta / d C = -mask; the sign folded into the small mask
            neg_grad_rows = t.matmul((-m).transpose(-1, -2), g)  # [batch, seq, n, d]
        grad_currents = []
        for (lo, hi), needs in zip(ctx.slots, ctx.needs_input_grad[6:], strict=True):
            if neg_grad_rows is None or not needs:
                grad_currents.append(None)
            else:
                grad_currents.append(neg_grad_rows[:, :, lo:hi].permute(2, 0, 1, 3))
        return (grad_cols, None, None, None, None, None, *grad_currents)


@dataclass(frozen=True)
class _Layout:
    """How masks and table rows are shaped for the masked sum ``delta = m @ rows``,
    batched over tokens: the table holds ``[batch*seq, n_src, d_model]``, and a mask
    column block is shared by every token (``[head, n]``), by the tokens of a position
    (``[seq, head, n]``), or given per example (``[batch, (seq,) head, n]``)."""

    table_shape: tuple[int, int, int]  # batch, seq, d_model
    per_position: bool
    batch_masks: bool

    def masks(self, cols: Tensor, n_heads: int, n: int) -> Tensor:
        batch, seq, _ = self.table_shape
        return cols.reshape(
            batch if self.batch_masks else 1, seq if self.per_position else 1, n_heads, n
        )

    def rows(self, rows: Tensor) -> Tensor:
        batch, seq, d_model = self.table_shape
        return rows.view(batch, seq, rows.shape[1], d_model)


def _riders(sites: list[DestSite]) -> dict[str, list[DestSite]]:
    """For each fuse group (by ``fuse_key``), the sites without one whose sources start
    with the group's and extend it least far among the groups: a block's MLP rides on
    that block's Q/K/V group, the final residual on the last block's. Their sum over
    the group's sources then comes from the group's matmul, which reads those table
    rows anyway, instead of a matrix-vector product reading them all again."""
    groups = {d.fuse_key: d.in_srcs for d in sites if d.fuse_key is not None}
    riders: dict[str, list[DestSite]] = {}
    for d in sites:
        if d.fuse_key is not None or d.n_heads is not None:
            continue
        below = [
            (r.stop, key)
            for key, r in groups.items()
            if r and r.start == d.in_srcs.start and r.stop <= d.in_srcs.stop
        ]
        if below:
            riders.setdefault(max(below)[1], []).append(d)
    return riders


def _sole_reader(site: DestSite) -> bool:
    """Whether the site's one hook may overwrite its cached delta: it is the only
    reader in this forward, and no backward pass will need the tensor."""
    return not t.is_grad_enabled() and len(site.hooks) == 1


def _broadcastable(patch_shape: t.Size, current_shape: t.Size) -> bool:
    """Patch [batch, seq, d] fits the current output (batch and seq may be 1)."""
    return len(patch_shape) == len(current_shape) and all(
        p == c or (p == 1 and i < len(patch_shape) - 1)
        for i, (p, c) in enumerate(zip(patch_shape, current_shape, strict=True))
    )
