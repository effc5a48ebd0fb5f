"""The fast engine: the reference engine's result (``auto_circuit.engine.reference``) with
less memory traffic and time. Same hooks and state; what it changes is how each delta
is computed:

- every source's ``P - C`` is written once per forward into one token-major table
  ``[batch*seq, n_src, d_model]``, and each destination's delta is one matmul batched
  over tokens on its rows (native kernel where available, ``engine.kernels``);
- destinations whose masks are all 0 (and need no gradient) are skipped, and so are
  sources none of whose masks are non-zero;
- with gradients, one autograd function gives the mask and source gradients in closed
  form without saving copies (``_TableMaskedSum``);
- where a family offers fast paths (``auto_circuit.families.fast_paths``): heads'
  differences written by one product (``HeadProjection``), a block's Q/K/V deltas from
  one product (``fuse_key``) with its residual folded in (``base_probe``), the family's
  own ``FastAdd``s (lazy ``Delta``s) and interceptors.

Families without fast paths get the table and the skipping, and their plain ``add``s.
The same oracle tests run on this engine and on the reference one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch as t
from torch import Tensor

from auto_circuit.engine.kernels.table_ops import head_differences, masked_sum
from auto_circuit.engine.patch_wrapper import PatchState
from auto_circuit.engine.reference import ReferenceEngine
from auto_circuit.families.contract import AddDelta, DestSite, FamilyGraph
from auto_circuit.families.fast_paths import Delta, FastAdd, FastDest, FastPaths, HeadProjection
from auto_circuit.vocabulary.errors import CircuitError


@dataclass
class _FastState(PatchState):
    """``PatchState`` plus the fast engine's per-forward scratch."""

    dest_deltas: dict[str, Tensor | None] = field(default_factory=dict)
    # Partial deltas computed early (see FastEngine.riders): the sources they cover.
    partials: dict[str, tuple[range, Tensor]] = field(default_factory=dict)
    active: dict[str, range] = field(default_factory=dict)  # see FastEngine._active_range
    with_base: set[str] = field(default_factory=set)  # deltas holding their base_probe
    table: Tensor | None = None  # [batch*seq, n_src, d_model]: P - C of every source
    table_shape: tuple[int, int, int] = (0, 0, 0)  # batch, seq, d_model of the table
    # The table of the last forward without gradients, reused by the next one of the same
    # shape (a fresh 100+ MiB tensor per forward is page-faulted and zeroed each time).
    # Never one that a backward pass may still read. Dropped when patch_mode exits.
    spare_table: Tensor | None = None
    spare_deltas: Tensor | None = None  # likewise for a block's fused Q/K/V deltas

    def clear_forward(self) -> None:
        super().clear_forward()
        self.dest_deltas.clear()
        self.partials.clear()
        self.active.clear()
        self.with_base.clear()
        self.table = None


class FastEngine(ReferenceEngine):
    """The reference engine's hooks, with deltas computed as the module docstring says."""

    state: _FastState

    def __init__(
        self,
        model: t.nn.Module,
        graph: FamilyGraph,
        seq_len: int | None,
        device: t.device,
        dtype: t.dtype,
    ):
        fast = graph.fast_paths or FastPaths()
        self.fast = fast
        self.fast_dests: dict[str, FastDest] = {
            d.module_name: fast.dests.get(d.module_name, FastDest()) for d in graph.dest_sites
        }
        self.projections: dict[str, HeadProjection] = dict(fast.head_projections)
        self.adds: dict[str, tuple[FastAdd, ...]] = {
            d.module_name: tuple(
                _fast_add(self.fast_dests[d.module_name], k, hook.add)
                for k, hook in enumerate(d.hooks)
            )
            for d in graph.dest_sites
        }
        self.fuse_partners: dict[str, list[DestSite]] = {
            d.module_name: [
                p
                for p in graph.dest_sites
                if p is not d
                and self.fuse_key(d)
                and self.fuse_key(p) == self.fuse_key(d)
                and p.in_srcs == d.in_srcs
                and p.n_heads is not None
                and d.n_heads is not None
            ]
            for d in graph.dest_sites
        }
        self.riders: dict[str, list[DestSite]] = _riders(graph.dest_sites, self.fuse_key)
        self._uninstallers: list[Callable[[], None]] = []
        super().__init__(model, graph, seq_len, device, dtype)
        self._uninstallers = [install(model, self._get_delta) for install in fast.interceptors]

    def _new_state(self) -> _FastState:
        return _FastState()

    def fuse_key(self, site: DestSite) -> str | None:
        return self.fast_dests[site.module_name].fuse_key

    def remove(self) -> None:
        for uninstall in self._uninstallers:
            uninstall()
        self._uninstallers.clear()
        super().remove()

    def release(self) -> None:
        super().release()
        self.state.spare_table = self.state.spare_deltas = None

    def patched(self, site: DestSite, k: int, hooked: Tensor) -> Tensor | None:
        delta = self.delta_fn(site)
        if delta is None:
            return None
        return self.adds[site.module_name][k](hooked, delta, self.state.probes)

    def _get_delta(self, module_name: str) -> Delta | None:
        if not self.state.patch_mode:
            return None
        return self.delta_fn(self.dest_sites[module_name])

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
        key = self.fuse_key(site)
        if not t.is_grad_enabled() and key is not None:
            riders = [
                r
                for r in self.riders.get(key, [])
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
            value = self._masked_sum_fn(fused, False, cols.shape[-1])(cols, rows, out)
        parts = value.split(heads, dim=2)
        for s, part in zip(sites, parts, strict=False):
            state.dest_deltas[s.module_name] = part
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
        names = {self.fast_dests[s.module_name].base_probe for s in sites}
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
        """``(mask columns, table rows, out=None) -> delta [batch, seq, (head,) d_model]``;
        ``out``: contiguous memory for the product."""
        heads = site.n_heads is not None
        layout = _Layout(self.state.table_shape, self.seq_len is not None, batch_masks)

        def compute(cols: Tensor, rows: Tensor, out: Tensor | None = None) -> Tensor:
            m = layout.masks(cols, site.n_heads or 1, n)
            if out is not None:
                out = out.view(*layout.table_shape[:2], site.n_heads or 1, -1)
            table_rows = layout.rows(rows)
            native = masked_sum(m, table_rows, out)
            out = native if native is not None else t.matmul(m, table_rows, out=out)
            return out if heads else out.squeeze(2)

        return compute

    def _fill_table(self, span: range) -> list[tuple[range, Tensor | None]]:
        """Write ``P - C`` of every source group overlapping ``span`` into this forward's
        table (once per group); returns (source range, current output) of those groups.
        The current output is None where it was written straight into the table from the
        family's ``HeadProjection`` (no gradients: nothing else reads it)."""
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
                projection = self.projections.get(site.module_name) if direct else None
                if projection is not None:
                    z, weight = projection.operands(state.outputs[i])
                    batch, seq, n_heads, _ = z.shape
                    shape = (n_heads, batch, seq, weight.shape[-1])
                    dtype, device = z.dtype, z.device
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
                    if projection is not None:
                        _write_head_differences(z, weight, patch, view)
                    elif state.patch_is_delta:
                        view.copy_(patch.expand_as(current))
                    else:
                        t.sub(patch, current.detach(), out=view)  # no temporary
                state.currents[i] = None if projection is not None else current
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


def _write_head_differences(z: Tensor, weight: Tensor, patch: Tensor, out: Tensor) -> None:
    """``out = patch - z_h W_h`` per head (``z [batch, seq, head, d_head]``, ``weight [head,
    d_head, d_model]``, ``out [head, batch, seq, d_model]`` whose batch and seq merge):
    by the native kernel, else one ``baddbmm`` onto the patch."""
    if not (z.dtype == weight.dtype == out.dtype):
        t.sub(patch, t.einsum("bshe,hed->hbsd", z, weight), out=out)
        return
    if head_differences(z, weight, patch, out):
        return
    n_heads, batch, seq, d_model = out.shape
    out.copy_(patch.expand_as(out))
    per_head = z.permute(2, 0, 1, 3).reshape(n_heads, batch * seq, -1)
    out.view(n_heads, batch * seq, d_model).baddbmm_(per_head, weight, alpha=-1)


def _fast_add(fast: FastDest, k: int, add: AddDelta | None) -> FastAdd:
    """The ``k``-th hook's fast add, else its plain ``add`` on the computed delta."""
    if k < len(fast.adds) and fast.adds[k] is not None:
        return fast.adds[k]  # type: ignore[return-value]

    def plain(hooked: Tensor, delta: Delta, probes: Mapping[str, Tensor]) -> Tensor:
        return add(hooked, delta(), probes) if add is not None else hooked + delta()

    return plain


def _riders(
    sites: list[DestSite], fuse_key: Callable[[DestSite], str | None]
) -> dict[str, list[DestSite]]:
    """For each fuse group (by ``fuse_key``), the sites without one whose sources start
    with the group's and extend it least far among the groups: a block's MLP rides on
    that block's Q/K/V group, the final residual on the last block's. Their sum over
    the group's sources then comes from the group's matmul, which reads those table
    rows anyway, instead of a matrix-vector product reading them all again."""
    groups: dict[str, range] = {}
    for d in sites:
        key = fuse_key(d)
        if key is not None:
            groups[key] = d.in_srcs
    riders: dict[str, list[DestSite]] = {}
    for d in sites:
        if fuse_key(d) is not None or d.n_heads is not None:
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
