"""Context parallelism: neighbourhood attention over a token grid sharded along one axis.

Every rank of a process group holds one contiguous slab of the global grid along spatial
axis ``shard_dim`` (slabs in rank order, sizes free to differ). ``na1d/na2d/na3d`` here return
this rank's slab of the single-device result on the concatenated tensors: windows, stride
groups, dilation groups and causal masks are those of the global grid.

Why one ordinary call on an extended slab is exact
--------------------------------------------------
The rank owning global rows ``[lo, hi)`` runs the ordinary ``natten.na*d`` on the rows
``[a, b)`` (its own plus halo rows from other ranks) and keeps rows ``[lo, hi)``. Only the
shard axis is cut; the mask is the AND of per-axis conditions, so the other axes are exact as
they are. On the shard axis, a query's window in the slab must be its global window, shifted
by ``a``:

- ``a`` is a multiple of ``dilation * stride``, so ``x - a`` keeps the residue of ``x`` (the
  same dilation group) and its group coordinate moves by a multiple of ``stride`` (the same
  stride group and leader).
- What remains can differ only through the clamps at the slab's ends (border shifting, the
  leader clamp at the group end). ``[a, b)`` is grown until ``natten._C.axis_window``, the one
  definition of the window, gives every owned query the same window in the slab as in the
  global grid. Growing ends at ``[0, L)`` at the latest, which is the global problem itself.

Only the owned rows as queries
------------------------------
Where the backend that the ordinary call would run on can compute a range of the queries
(``Backend.query_range_unsupported``; cpu, cutlass-fna and hopper-fna can), the rank runs the
private query-range op (``natten.functional._query_range_na``): keys and values are the slab
``[a, b)``, the queries only the owned rows, placed at offset ``lo - a`` of it. Each query
keeps the window of its slab coordinate, so the result is the ordinary call's, sliced, and no
halo query is computed. Otherwise (other GPU backends) the rank runs the ordinary call on
the slab with zeros as the halo's queries and throws those rows away (they add nothing to any
gradient, since their output gradient is zero); that costs ``(b - a) / (hi - lo)`` of the
local work.

Overlap: the exchange and the rows that need no halo
----------------------------------------------------
Most of a rank's rows see no halo: where the ordinary call on the own rows alone already gives
a query its global window (``_interior``: the longest run of such rows, shrunk to whole query
boxes of the tiled kernels), that query's result needs nothing from other ranks. So the rank
starts the halo messages, computes those rows by a query-range call on its own keys while the
messages travel, and then the rows at its edges on the slab with the halo; the pieces are
joined in row order.

Communication: halo K/V rows come from their owners by point-to-point messages (several
owners when slabs are thinner than the halo), one batch per call started before any
attention and waited for only by the call that needs the halo. In the backward, the halo
rows' dK/dV go back to their owners and are summed there, and the gradients of the
replicated additional keys/values are summed over the group; both happen in one autograd node
(``_HaloSend``'s backward), after every gradient of the call has reached it, so every rank
issues its messages in the same order. Every rank must run the backward of its output (the
backward exchanges messages).
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from natten import backends
from natten._checks import check_fused
from natten.backends.base import manifest_rows
from natten.functional import _query_range_na, na1d as _na1d, na2d as _na2d, na3d as _na3d

__all__ = ["na1d", "na2d", "na3d", "module_forward"]

_OPS = {1: _na1d, 2: _na2d, 3: _na3d}

# Compute the rows that need no halo while the halo travels (benchmarks/cp_bench.py times the
# call with it off too, as "halo, serial").
_OVERLAP = True


# ----------------------------------------------------------------------------------------
# Slabs: which global rows each rank computes on
# ----------------------------------------------------------------------------------------


def _windows(extent: int, kernel: int, stride: int, dilation: int, causal: bool,
                   xs: Sequence[int], offset: int = 0) -> List[Tuple[int, int]]:
    """(first, last) visible key of every coordinate in xs, as coordinates of the axis plus
    ``offset``."""
    from natten import _C

    window = _C.axis_window
    out = []
    for x in xs:
        _, first, last = window(extent, kernel, stride, dilation, causal, x)
        r = x % dilation
        out.append((first * dilation + r + offset, last * dilation + r + offset))
    return out


@functools.lru_cache(maxsize=64)
def _slabs(extents: Tuple[int, ...], kernel: int, stride: int, dilation: int,
           causal: bool) -> Tuple[Tuple[int, int], ...]:
    """Per rank, the global rows [a, b) of the slab whose ordinary call gives every query of
    the rank its global window (see the module docstring)."""
    total = sum(extents)
    span = kernel * dilation
    period = dilation * stride
    if span > total or min(extents) < 1:
        raise ValueError(f"slabs {list(extents)} cannot hold a window of kernel_size {kernel} * "
                         f"dilation {dilation}: every slab needs a row and the grid {span} rows")
    global_windows = _windows(total, kernel, stride, dilation, causal, range(total))
    slabs = []
    lo = 0
    for n in extents:
        hi = lo + n
        need = global_windows[lo:hi]
        # First guess: the rows the windows reach, a rounded down to keep residues and stride
        # leaders; the check below is what makes the slab exact.
        a = min(w[0] for w in need)
        a -= a % period
        b = max(w[1] for w in need) + 1
        while True:
            if b - a < span:  # the ordinary call needs kernel * dilation rows
                b = min(total, a + span)
                if b - a < span:
                    a = max(0, b - span)
                    a -= a % period
                continue
            got = _windows(b - a, kernel, stride, dilation, causal,
                                 range(lo - a, hi - a), offset=a)
            bad = next((i for i, (g, w) in enumerate(zip(got, need)) if g != w), None)
            if bad is None:
                break
            # A window pushed right by the slab's left end needs rows on the left; one pulled
            # left (border shift or leader clamp at the slab's right end) needs rows on the right.
            if (got[bad] > need[bad] and a > 0) or b == total:
                a = max(0, a - period)
            else:
                b += 1
        slabs.append((a, b))
        lo = hi
    return tuple(slabs)


@functools.lru_cache(maxsize=64)
def _interior(extents: Tuple[int, ...], me: int, kernel: int, stride: int, dilation: int,
              causal: bool) -> Tuple[int, int]:
    """Rows [i0, i1) of rank ``me``'s own rows (local indices) whose window in the grid of the
    own rows alone is their global window: the rows computable before any halo arrives (the
    longest such run; (0, 0) where there is none)."""
    lo, n = sum(extents[:me]), extents[me]
    if n < kernel * dilation:  # the call on the own rows needs kernel * dilation of them
        return (0, 0)
    need = _windows(sum(extents), kernel, stride, dilation, causal, range(lo, lo + n))
    got = _windows(n, kernel, stride, dilation, causal, range(n), offset=lo)
    best, start = (0, 0), None
    for i, same in enumerate([g == w for g, w in zip(got, need)] + [False]):
        if same and start is None:
            start = i
        elif not same and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def _aligned(run: Tuple[int, int], align: int) -> Tuple[int, int]:
    """The run shrunk to start at a multiple of ``align`` rows and span a multiple of them, so
    that splitting the own rows there adds no partial query box to the one the whole rows
    have; (0, 0) where nothing is left."""
    i0 = -(-run[0] // align) * align
    i1 = i0 + (run[1] - i0) // align * align
    return (i0, i1) if i1 > i0 else (0, 0)


@functools.lru_cache(maxsize=None)
def _query_box_rows(rank: int, axis: int) -> int:
    """The least common multiple of the built tiled kernels' query boxes along ``axis``."""
    return math.lcm(1, *{row.q_tile[axis] for row in manifest_rows() or ()
                         if row.rank == rank and row.q_tile})


def _owned(extents: Sequence[int]) -> List[Tuple[int, int]]:
    out, lo = [], 0
    for n in extents:
        out.append((lo, lo + n))
        lo += n
    return out


def _overlap(x: Tuple[int, int], y: Tuple[int, int]) -> Tuple[int, int]:
    lo, hi = max(x[0], y[0]), min(x[1], y[1])
    return (lo, hi) if lo < hi else (lo, lo)


@functools.lru_cache(maxsize=64)
def _routes(extents: Tuple[int, ...], slabs: Tuple[Tuple[int, int], ...]):
    """routes[i][j]: the global rows [start, stop) that rank i takes from rank j's slab
    (empty for i == j: a rank's own rows are not sent)."""
    owned = _owned(extents)
    routes = []
    for i, (a, b) in enumerate(slabs):
        lo, hi = owned[i]
        row = []
        for j, mine in enumerate(owned):
            if j < i:
                row.append(_overlap((a, lo), mine))
            elif j > i:
                row.append(_overlap((hi, b), mine))
            else:
                row.append((lo, lo))
        routes.append(tuple(row))
    return tuple(routes)


# ----------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------


class _Comm:
    """This rank's view of one call: its rows, its slab, and who sends what to whom."""

    def __init__(self, group, extents: Tuple[int, ...], slabs, axis: int):
        self.group = group
        self.me = dist.get_rank(group)
        self.axis = axis  # tensor dimension of the shard axis
        self.owned = _owned(extents)
        self.slab = slabs[self.me]
        self.routes = _routes(extents, slabs)

    def peer(self, j: int) -> int:
        return j if self.group is None else dist.get_global_rank(self.group, j)

    def rows(self, t: Tensor, start: int, stop: int) -> Tensor:
        """Rows [start, stop) (global) of this rank's own slab of t."""
        return t.narrow(self.axis, start - self.owned[self.me][0], stop - start)

    def start(self, sends: dict, recvs: dict) -> "_Pending":
        """Starts sending the tensors sends[j] to rank j and receiving, from rank j, into the
        (contiguous) tensors recvs[j]; one message per tensor, in list order on both sides, all
        in one batch (NCCL matches a rank's sends and receives only within a batch)."""
        ops, keep = [], []
        for j, tensors in recvs.items():
            ops += [dist.P2POp(dist.irecv, t, self.peer(j), self.group) for t in tensors]
        for j, tensors in sends.items():
            tensors = [t.contiguous() for t in tensors]
            keep += tensors
            ops += [dist.P2POp(dist.isend, t, self.peer(j), self.group) for t in tensors]
        return _Pending(dist.batch_isend_irecv(ops) if ops else [], keep)

    def halo_shape(self, t, n: int) -> torch.Size:
        """t's shape (a tensor's or a torch.Size) with n rows along the shard axis."""
        shape = list(t if isinstance(t, torch.Size) else t.shape)
        shape[self.axis] = n
        return torch.Size(shape)


class _Pending:
    """Messages in flight, and the send buffers they read until finish() has waited for them."""

    def __init__(self, requests, keep):
        self.requests, self.keep = requests, keep

    def finish(self) -> None:
        for req in self.requests:
            req.wait()
        self.requests, self.keep = [], []


def _halo_sends(comm: "_Comm", k: Tensor, v: Tensor) -> dict:
    me, routes = comm.me, comm.routes
    return {i: [comm.rows(t, *routes[i][me]) for t in (k, v)]
            for i in range(len(routes)) if i != me and routes[i][me][1] > routes[i][me][0]}


def _halo_sources(comm: "_Comm") -> List[Tuple[int, int, int]]:
    """(rank, start, stop): the global rows of this rank's halo and their owners, in order."""
    return [(j, start, stop) for j, (start, stop) in enumerate(comm.routes[comm.me])
            if j != comm.me and stop > start]


class _HaloSend(torch.autograd.Function):
    """Starts the halo messages: (k, v) of this rank's rows -> the same (k, v), and the halo
    rows' (k, v) per owner, whose contents arrive by the time _HaloJoin has run. Its backward
    sends the halo rows' gradients to their owners and adds the ones it receives to its own
    rows; then it sums the replicated additional keys' and values' gradients over the group.
    Both exchanges sit in this one node so that every rank issues them in the same order."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, ek, ev, comm: "_Comm", pending: list):
        ctx.comm = comm
        ctx.extra = ek is not None
        ctx.shapes = (k.shape, v.shape)
        ctx.kinds = [(t.dtype, t.device) for t in (k, v)]
        if ctx.extra:
            ctx.extra_kinds = [(t.shape, t.dtype, t.device) for t in (ek, ev)]
        sources = _halo_sources(comm)
        halo = [[torch.empty(comm.halo_shape(t, stop - start), dtype=t.dtype, device=t.device)
                 for t in (k, v)] for _, start, stop in sources]
        pending.append(comm.start(_halo_sends(comm, k, v),
                                  {j: pair for (j, _, _), pair in zip(sources, halo)}))
        extra = (ek.view_as(ek), ev.view_as(ev)) if ctx.extra else (None, None)
        return (k.view_as(k), v.view_as(v), *extra, *(t for pair in halo for t in pair))

    @staticmethod
    def backward(ctx, gk, gv, gek, gev, *ghalo):
        comm = ctx.comm
        me, routes = comm.me, comm.routes
        lo, hi = comm.owned[me]
        own = [_or_zeros(g, comm.halo_shape(t, hi - lo), *kind)
               for g, t, kind in zip((gk, gv), ctx.shapes, ctx.kinds)]
        sends = {}
        for n, (j, start, stop) in enumerate(_halo_sources(comm)):
            sends[j] = [_or_zeros(g, comm.halo_shape(t, stop - start), *kind)
                        for g, t, kind in zip(ghalo[2 * n:2 * n + 2], ctx.shapes, ctx.kinds)]
        recvs = {}
        for i in range(len(routes)):
            start, stop = routes[i][me]
            if i != me and stop > start:
                recvs[i] = [torch.empty(comm.halo_shape(g, stop - start), dtype=g.dtype,
                                        device=g.device) for g in own]
        comm.start(sends, recvs).finish()
        # Received rows are added in place: into a copy, since autograd may share the gradient.
        grads = [g.clone() for g in own] if recvs else own
        for i, parts in recvs.items():
            start, stop = routes[i][me]
            for g, part in zip(grads, parts):
                g.narrow(comm.axis, start - lo, stop - start).add_(part)
        extra = [None, None]
        if ctx.extra:
            extra = [_or_zeros(g, *kind).contiguous().clone()
                     for g, kind in zip((gek, gev), ctx.extra_kinds)]
            for g in extra:
                dist.all_reduce(g, group=comm.group)
        return grads[0], grads[1], extra[0], extra[1], None, None


def _or_zeros(g: Optional[Tensor], shape, dtype, device) -> Tensor:
    """A gradient autograd left out (an output that did not reach the loss) as zeros: the
    messages must still be sent."""
    return torch.zeros(shape, dtype=dtype, device=device) if g is None else g


class _HaloJoin(torch.autograd.Function):
    """Waits for the halo messages and joins own rows and halo rows into the slab's (k, v);
    its backward hands each part its rows of the gradient."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, comm: "_Comm", pending: list, *halo):
        for p in pending:
            p.finish()
        ctx.comm = comm
        ctx.rows = [t.shape[comm.axis] for t in halo[0::2]]
        sources = _halo_sources(comm)
        left = [n for n, (j, _, _) in enumerate(sources) if j < comm.me]
        right = [n for n, (j, _, _) in enumerate(sources) if j > comm.me]
        ctx.order = left + [-1] + right
        outs = []
        for idx, t in enumerate((k, v)):
            pieces = [t if n < 0 else halo[2 * n + idx] for n in ctx.order]
            outs.append(torch.cat(pieces, dim=comm.axis) if len(pieces) > 1 else t.clone())
        return tuple(outs)

    @staticmethod
    def backward(ctx, gkx, gvx):
        axis = ctx.comm.axis
        own = gkx.shape[axis] - sum(ctx.rows)
        grads = {}
        at = 0
        for n in ctx.order:
            rows = own if n < 0 else ctx.rows[n]
            grads[n] = [g.narrow(axis, at, rows) for g in (gkx, gvx)]
            at += rows
        return (*grads[-1], None, None, *(g for n in range(len(ctx.rows)) for g in grads[n]))


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------


def _axis_value(value, rank: int, shard_dim: int, name: str, kind):
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} must be one value or {rank} (one per axis), got {value!r}")
        value = value[shard_dim]
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be positive integers, got {value!r}")
    return value


def _local_checks(rank, q, k, v, kernel_size, stride, dilation, is_causal, shard_dim, extra):
    """Shard-axis window of this call and this rank's row count; raises on bad input."""
    for name, t in (("query", q), ("key", k), ("value", v)) + extra:
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if (extra[0][1] is None) != (extra[1][1] is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if isinstance(shard_dim, bool) or not isinstance(shard_dim, int) or not 0 <= shard_dim < rank:
        raise ValueError(f"shard_dim must be an integer in [0, {rank}), got {shard_dim!r}")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != rank + 3:
            raise ValueError(f"{name} must be [batch, *spatial ({rank} dims), heads, dim], "
                             f"got shape {tuple(t.shape)}")
    if not (q.shape[1:1 + rank] == k.shape[1:1 + rank] == v.shape[1:1 + rank]):
        raise ValueError(f"query, key and value must share the spatial shape of this rank's "
                         f"slab, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    rows = q.shape[1 + shard_dim]
    if rows < 1:
        raise ValueError(f"every rank must hold at least one row along shard_dim {shard_dim}, "
                         f"this rank holds {rows}")
    window = (_axis_value(kernel_size, rank, shard_dim, "kernel_size", int),
              _axis_value(stride, rank, shard_dim, "stride", int),
              _axis_value(dilation, rank, shard_dim, "dilation", int),
              _axis_value(is_causal, rank, shard_dim, "is_causal", bool))
    if window[1] > window[0]:
        raise ValueError(f"stride must not exceed kernel_size, got stride {window[1]} > "
                         f"kernel_size {window[0]} along shard_dim {shard_dim}")
    return window, rows


def _signature(rank, tensors, window_args, rest) -> int:
    """A checksum of everything that must agree between ranks (all but the shard extent)."""
    desc = [rank, window_args, rest]
    for t in tensors:
        if t is None:
            desc.append(None)
            continue
        shape = list(t.shape)
        desc.append((shape, str(t.dtype), t.device.type, t.requires_grad))
    return zlib.crc32(repr(desc).encode())


def _agree(group, device, rows: int, signature: int, error: Optional[Exception]):
    """All ranks' row counts; raises on every rank if any rank failed its checks or the
    ranks disagree, so that no rank is left waiting for messages."""
    world = dist.get_world_size(group)
    mine = torch.tensor([rows, 0 if error is None else 1, signature], dtype=torch.int64,
                        device=device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu().tolist()
    if error is not None:
        raise error
    failed = [j for j, row in enumerate(table) if row[1]]
    if failed:
        raise ValueError(f"natten.distributed: ranks {failed} of the group rejected their inputs "
                         f"(each raises its own error)")
    if len({row[2] for row in table}) != 1:
        raise ValueError("natten.distributed: ranks disagree on the batch, heads, head dims, "
                         "other spatial extents, dtypes, devices, requires_grad flags or window "
                         "arguments; only the extent along shard_dim may differ")
    return tuple(row[0] for row in table)


# ----------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------


def _sharded(rank: int, q, k, v, kernel_size, stride, dilation, is_causal, shard_dim, group,
             scale, additional_keys, additional_values, return_lse, backend):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("natten.distributed needs an initialised torch.distributed process group")
    if dist.get_rank(group) < 0:
        raise ValueError("natten.distributed: this process is not a member of `group`")
    extra = (("additional_keys", additional_keys), ("additional_values", additional_values))
    error, window, rows = None, None, 0
    try:
        window, rows = _local_checks(rank, q, k, v, kernel_size, stride, dilation, is_causal,
                                     shard_dim, extra)
    except (ValueError, TypeError) as exc:
        error = exc
    signature = 0
    if error is None:
        axis = 1 + shard_dim
        shapes = [t if t is None else t.narrow(axis, 0, 0) if i < 3 else t
                  for i, t in enumerate((q, k, v, additional_keys, additional_values))]
        signature = _signature(rank, shapes, (kernel_size, stride, dilation, is_causal),
                               (shard_dim, scale, return_lse, backend))
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    extents = _agree(group, device, rows, signature, error)
    total = sum(extents)
    kernel, s, d, causal = window
    if kernel * d > total:
        raise ValueError(f"kernel_size * dilation must not exceed the global extent along "
                         f"shard_dim {shard_dim}: {kernel} * {d} > {total} (slabs {list(extents)})")
    comm = _Comm(group, extents, _slabs(extents, kernel, s, d, causal), 1 + shard_dim)
    a, b = comm.slab
    lo, hi = comm.owned[comm.me]
    pending = []
    k, v, additional_keys, additional_values, *halo = _HaloSend.apply(
        k, v, additional_keys, additional_values, comm, pending)
    call_args = dict(stride=stride, dilation=dilation, is_causal=is_causal, scale=scale,
                     additional_keys=additional_keys, additional_values=additional_values,
                     return_lse=return_lse)

    def ranged(rows: Tuple[int, int], keys: Tensor, values: Tensor, at: int):
        """Own rows [rows) (local) as queries against keys whose grid starts ``at`` rows before
        the own rows; None where the backend cannot compute a range."""
        query = q.narrow(comm.axis, rows[0], rows[1] - rows[0])
        name = _query_range_backend(rank, query, keys, values, kernel_size, stride, dilation,
                                    is_causal, scale, additional_keys, additional_values,
                                    shard_dim, at + rows[0], backend)
        if name is None:
            return None
        return _query_range_na(rank, query, keys, values, kernel_size, axis=shard_dim,
                               offset=at + rows[0], backend=name, **call_args)

    # While the halo travels: the rows whose windows lie in the own rows, on the own rows.
    pieces = []
    inner = (0, 0)
    if _OVERLAP:
        # Split points at whole query boxes of every dilation group.
        inner = _aligned(_interior(extents, comm.me, kernel, s, d, causal),
                         d * _query_box_rows(rank, shard_dim))
    if inner[1] > inner[0]:
        got = ranged(inner, k, v, 0)
        if got is not None:
            pieces.append((inner[0], got))
    kx, vx = _HaloJoin.apply(k, v, comm, pending, *halo)
    rest = [(0, inner[0]), (inner[1], hi - lo)] if pieces else [(0, hi - lo)]
    for rows in rest:
        if rows[1] > rows[0]:
            got = ranged(rows, kx, vx, lo - a)
            if got is None:
                break
            pieces.append((rows[0], got))
    else:
        return _join(sorted(pieces, key=lambda piece: piece[0]), comm.axis, return_lse)

    qx = q
    if (a, b) != (lo, hi):
        pad = [torch.zeros(comm.halo_shape(q, n), dtype=q.dtype, device=q.device)
               for n in (lo - a, b - hi)]
        qx = torch.cat([pad[0], q, pad[1]], dim=comm.axis)
    out = _OPS[rank](qx, kx, vx, kernel_size, backend=backend, **call_args)
    if return_lse:
        return tuple(t.narrow(comm.axis, lo - a, hi - lo) for t in out)
    return out.narrow(comm.axis, lo - a, hi - lo)


def _join(pieces, axis: int, return_lse: bool):
    """The results of consecutive row ranges, in order, as one (output, and lse)."""
    results = [got for _, got in pieces]
    if len(results) == 1:
        return results[0]
    if return_lse:
        return tuple(torch.cat(parts, dim=axis) for parts in zip(*results))
    return torch.cat(results, dim=axis)


def _query_range_backend(rank, q, kx, vx, kernel_size, stride, dilation, is_causal, scale,
                         additional_keys, additional_values, shard_dim, offset, backend):
    """The backend that computes only this rank's queries (rows [offset, offset + n) of the
    slab plus halo kx/vx along shard_dim), or None where the call's backend cannot."""
    problem, _ = check_fused(rank, q, kx, vx, kernel_size, stride, dilation, is_causal, scale,
                             additional_keys, additional_values, (shard_dim, offset))
    impl, reason = backends.query_range_backend(problem, backend)
    return impl.name if reason is None else None


def _make(rank: int):
    def na(query: Tensor, key: Tensor, value: Tensor, kernel_size, stride=1, dilation=1,
           is_causal=False, *, shard_dim: int = 0, group=None, scale: Optional[float] = None,
           additional_keys: Optional[Tensor] = None, additional_values: Optional[Tensor] = None,
           return_lse: bool = False, backend: Optional[str] = None):
        return _sharded(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                        shard_dim, group, scale, additional_keys, additional_values, return_lse,
                        backend)

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = (
        f"Context-parallel ``natten.na{rank}d``: query/key/value are this rank's slab "
        f"[B, *S_local, H, D] of the global grid along spatial axis ``shard_dim`` (slabs "
        f"contiguous, in rank order of ``group``); returns this rank's slab of the global "
        f"result (and of its logsumexp with ``return_lse``). Additional keys/values are "
        f"replicated on every rank; their gradients are summed over the group.")
    return na


na1d = _make(1)
na2d = _make(2)
na3d = _make(3)
_OPS_SHARDED = {1: na1d, 2: na2d, 3: na3d}


def module_forward(module, x: Tensor, *, shard_dim: int = 0, group=None,
                   backend: Optional[str] = None) -> Tensor:
    """Runs a ``natten.NeighborhoodAttention{1,2,3}D`` on this rank's slab ``x``
    [B, *S_local, dim] of a grid sharded along ``shard_dim``; its projections are per token,
    so only the attention exchanges rows. The global grid must be at least
    ``kernel_size * dilation`` along every axis (no padding across ranks); modules with a
    relative positional bias or attention dropout in training are not supported."""
    rank = module.rank
    if module.rpb is not None:
        raise ValueError("module_forward: modules with a relative positional bias (rpb) "
                         "need the unfused path, which is not context-parallel")
    if module.training and module.attn_drop > 0:
        raise ValueError("module_forward: attention dropout in training needs the unfused path, "
                         "which is not context-parallel")
    if x.dim() != rank + 2 or x.shape[-1] != module.dim:
        raise ValueError(f"x must be [batch, *spatial ({rank} dims), {module.dim}], "
                         f"got {tuple(x.shape)}")
    shape = x.shape[:-1]
    q, k, v = module.qkv(x).reshape(*shape, 3, module.num_heads, module.head_dim).unbind(dim=-3)
    out = _OPS_SHARDED[rank](q, k, v, module.kernel_size, module.stride, module.dilation,
                             module.is_causal, shard_dim=shard_dim, group=group,
                             scale=module.scale, backend=backend)
    return module.proj_drop(module.proj(out.reshape(*shape, module.dim)))

