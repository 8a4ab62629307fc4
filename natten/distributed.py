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
messages travel, and then the rows at each edge; the pieces are joined in row order.

Edge keys only: an edge run's queries see the halo on their side and few of the own rows, so
each edge is computed on a key grid of its own (``_edge_grids``): the halo rows on its side and
the fewest own rows next to them that give every query of the run its global window (the same
test as ``_interior``'s, ``_exact_rows``, on that grid). Only those rows are copied into the
edge's keys, not the whole slab.

Communication: halo K/V rows come from their owners by point-to-point messages (several
owners when slabs are thinner than the halo), one batch per call started before any
attention and waited for only by the join that builds the edges' keys. In the backward, the
halo rows' dK/dV go back to their owners and are summed there, and the gradients of the
replicated additional keys/values are summed over the group. The halo gradients start on their
way in the join's backward, as soon as the edges' backward has made them, and travel while the
interior rows' backward runs. A rank without a join (no halo, or none that its grids use) has
only zeros to send but still receives its rows' gradients from the ranks that hold them as halo:
it starts its batch in the first node of the call's backward (``_BackwardStart``, on the call's
outputs), so that its receives are posted while its rows' backward runs, too. ``_HaloSend``'s
backward, which runs after every gradient of the call has reached it, waits for them and then
sums the additional keys' gradients, so every rank issues its messages in the same order (see
``_HaloSend``). Every rank must run the backward of its output (the backward exchanges
messages).
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


def _exact_rows(total: int, kernel: int, stride: int, dilation: int, causal: bool,
                grid: Tuple[int, int], rows: Sequence[int]) -> List[bool]:
    """Per global row x of ``rows`` (rows of ``grid``): whether a call whose key grid is the
    global rows ``grid`` = [g0, g1), taken as the whole extent, gives x (its coordinate there
    x - g0) its global window. A grid of fewer than kernel * dilation rows gives none: the call
    needs that many."""
    g0, g1 = grid
    if g1 - g0 < kernel * dilation:
        return [False] * len(rows)
    need = _windows(total, kernel, stride, dilation, causal, rows)
    got = _windows(g1 - g0, kernel, stride, dilation, causal, [x - g0 for x in rows], offset=g0)
    return [g == w for g, w in zip(got, need)]


@functools.lru_cache(maxsize=64)
def _interior(extents: Tuple[int, ...], me: int, kernel: int, stride: int, dilation: int,
              causal: bool) -> Tuple[int, int]:
    """Rows [i0, i1) of rank ``me``'s own rows (local indices) whose window in the grid of the
    own rows alone is their global window: the rows computable before any halo arrives (the
    longest such run; (0, 0) where there is none)."""
    lo, n = sum(extents[:me]), extents[me]
    exact = _exact_rows(sum(extents), kernel, stride, dilation, causal, (lo, lo + n),
                        range(lo, lo + n))
    best, start = (0, 0), None
    for i, same in enumerate(exact + [False]):
        if same and start is None:
            start = i
        elif not same and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


@functools.lru_cache(maxsize=64)
def _edge_grids(extents: Tuple[int, ...], me: int, kernel: int, stride: int, dilation: int,
                causal: bool, inner: Tuple[int, int]):
    """For each non-empty run of rank ``me``'s own rows beside ``inner`` (local rows), that run
    and the key grid (global rows) it is computed on: the slab's rows on its side of the own
    rows (the halo there) and the fewest own rows next to them with which every query of the run
    gets its global window (``_exact_rows``). Where no grid within the own rows does, the grid
    reaches on into the other side's halo, at most to the whole slab, which is exact for every
    own row (``_slabs``)."""
    total = sum(extents)
    lo, hi = sum(extents[:me]), sum(extents[:me + 1])
    a, b = _slabs(extents, kernel, stride, dilation, causal)[me]
    window = (total, kernel, stride, dilation, causal)
    edges = []
    if inner[0] > 0:
        rows = range(lo, lo + inner[0])
        g1 = next(g1 for g1 in range(lo + inner[0], b + 1)
                  if all(_exact_rows(*window, (a, g1), rows)))
        edges.append(((0, inner[0]), (a, g1)))
    if inner[1] < hi - lo:
        rows = range(lo + inner[1], hi)
        g0 = next(g0 for g0 in range(lo + inner[1], a - 1, -1)
                  if all(_exact_rows(*window, (g0, b), rows)))
        edges.append(((inner[1], hi - lo), (g0, b)))
    return tuple(edges)


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


def _slab_parts(comm: "_Comm") -> List[Tuple[int, int, int]]:
    """The slab's rows in row order as (n, start, stop) (global rows): n is the index of a halo
    source in _halo_sources, -1 for the own rows."""
    lo, hi = comm.owned[comm.me]
    parts = [(n, start, stop) for n, (_, start, stop) in enumerate(_halo_sources(comm))]
    return sorted(parts + [(-1, lo, hi)], key=lambda part: part[1])


class _Link:
    """What the autograd nodes of one call share: the forward's messages until the join has
    waited for them; the backward's (messages, receive buffers) from when they start (in the
    join's backward, or _BackwardStart's) until _HaloSend's backward waits for them; and the
    gradients of the own rows that the join's grids took (per k and v, [(first row, gradient)])
    until _HaloSend's backward adds them."""

    def __init__(self):
        self.forward: Optional[_Pending] = None
        self.backward: Optional[Tuple[_Pending, dict]] = None
        self.own: List[List[Tuple[int, Tensor]]] = [[], []]


def _start_grad_exchange(comm: "_Comm", halo_grads: List[List[Tensor]],
                         like) -> Tuple[_Pending, dict]:
    """Starts sending the halo rows' gradients (per halo source, [dk, dv]) to their owners and
    receiving, from every rank that holds some of this rank's rows as halo, their gradients;
    ``like``: (shape, dtype, device) of k and v. Returns the messages and the receive buffers
    per rank."""
    me, routes = comm.me, comm.routes
    sends = {j: grads for (j, _, _), grads in zip(_halo_sources(comm), halo_grads)}
    recvs = {}
    for i in range(len(routes)):
        start, stop = routes[i][me]
        if i != me and stop > start:
            recvs[i] = [torch.empty(comm.halo_shape(shape, stop - start), dtype=dtype,
                                    device=device) for shape, dtype, device in like]
    return comm.start(sends, recvs), recvs


class _HaloSend(torch.autograd.Function):
    """Starts the halo messages: (k, v) of this rank's rows -> the same (k, v), and the halo
    rows' (k, v) per owner, whose contents arrive by the time _HaloJoin has run. Its backward
    ends the exchange of the halo rows' gradients (started by _HaloJoin's backward where this
    rank has a join, else by _BackwardStart's): it waits for it and makes the own rows'
    gradients in one pass, from autograd's (the rows computed before the join), the join's and
    the received ones; then it sums the replicated additional keys' and values' gradients over
    the group.

    Every rank issues its backward messages in the same order (one batch, then the
    all_reduces, per call) by data dependence alone, whichever node starts the batch. A call's
    graph holds exactly one of the two starters, and its backward runs before this one: the
    join consumes this node's outputs, and _BackwardStart the call's outputs, which are
    computed from them (every key grid is made of k and v). The starter starts the batch
    exactly when this node's backward runs too: the join leads only to this node, so autograd
    runs both or neither; _BackwardStart asks the engine. And the gradient of what k and v were
    computed from is complete only after this node's backward, so the backward of a call whose
    output they depend on (the previous layer), its first node included, starts after it.
    Calls not ordered so (neither's k and v computed from the other's output) are ordered only
    by autograd running the ready node created last first."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, ek, ev, comm: "_Comm", link: _Link):
        ctx.set_materialize_grads(False)
        ctx.comm, ctx.link = comm, link
        ctx.extra = ek is not None
        ctx.like = [(t.shape, t.dtype, t.device) for t in (k, v)]
        if ctx.extra:
            ctx.extra_kinds = [(t.shape, t.dtype, t.device) for t in (ek, ev)]
        sources = _halo_sources(comm)
        halo = [[torch.empty(comm.halo_shape(t, stop - start), dtype=t.dtype, device=t.device)
                 for t in (k, v)] for _, start, stop in sources]
        link.forward = comm.start(_halo_sends(comm, k, v),
                                  {j: pair for (j, _, _), pair in zip(sources, halo)})
        extra = (ek.view_as(ek), ev.view_as(ev)) if ctx.extra else (None, None)
        return (k.view_as(k), v.view_as(v), *extra, *(t for pair in halo for t in pair))

    @staticmethod
    def backward(ctx, gk, gv, gek, gev, *ghalo):
        comm, link = ctx.comm, ctx.link
        me, routes = comm.me, comm.routes
        lo, hi = comm.owned[me]
        pending, recvs = link.backward
        joined, link.backward, link.own = link.own, None, [[], []]
        pending.finish()
        grads = []
        for idx, (g, (shape, _, _)) in enumerate(zip((gk, gv), ctx.like)):
            pieces = ([] if g is None else [(0, g)]) + joined[idx]
            pieces += [(routes[i][me][0] - lo, parts[idx]) for i, parts in recvs.items()]
            grads.append(_rows_sum(pieces, comm.halo_shape(shape, hi - lo), comm.axis))
        extra = [None, None]
        if ctx.extra:
            extra = [_or_zeros(g, *kind).contiguous().clone()
                     for g, kind in zip((gek, gev), ctx.extra_kinds)]
            for g in extra:
                dist.all_reduce(g, group=comm.group)
        return grads[0], grads[1], extra[0], extra[1], None, None


class _BackwardStart(torch.autograd.Function):
    """On a rank without a join: the call's outputs -> the same tensors. Created last in the
    call's forward, it is the first node of the call's backward, and starts there the exchange
    of the halo rows' gradients that _HaloSend's backward ends. What this rank sends is zeros
    (its halo, if any, went unused), but the batch receives the gradients of its rows that other
    ranks hold as halo, and their batches are matched against it: started here, it is posted
    while this rank's rows' backward runs, as a rank with a join posts its own in the join's
    backward, not after it. An output without a gradient passes None on; the batch starts all
    the same."""

    @staticmethod
    def forward(ctx, comm: "_Comm", link: _Link, send, like, *outs):
        ctx.set_materialize_grads(False)
        ctx.comm, ctx.link, ctx.send, ctx.like = comm, link, send, like
        # detach(), not view_as(): a view made in a custom Function may not be modified in
        # place, and the caller may modify the ordinary call's outputs in place.
        return tuple(t.detach() for t in outs)

    @staticmethod
    def backward(ctx, *grads):
        # _HaloSend's backward runs only where the graph task wants a gradient of k, v or the
        # additional keys (not for torch.autograd.grad of the queries alone); where it does not,
        # no rank's join runs either, so no rank may start a batch. (The engine query is the one
        # torch.autograd.graph.register_multi_grad_hook relies on.)
        if torch._C._will_engine_execute_node(ctx.send):
            comm = ctx.comm
            halo = [[torch.zeros(comm.halo_shape(shape, stop - start), dtype=dtype, device=device)
                     for shape, dtype, device in ctx.like]
                    for _, start, stop in _halo_sources(comm)]
            ctx.link.backward = _start_grad_exchange(comm, halo, ctx.like)
        return (None, None, None, None, *grads)


def _or_zeros(g: Optional[Tensor], shape, dtype, device) -> Tensor:
    """A gradient autograd left out (an output that did not reach the loss) as zeros: the
    messages must still be sent."""
    return torch.zeros(shape, dtype=dtype, device=device) if g is None else g


def _rows_sum(pieces: List[Tuple[int, Tensor]], shape: torch.Size, axis: int) -> Optional[Tensor]:
    """The gradient of a run of rows (``shape``) from gradients of runs inside it, each
    (first row, tensor), summed where they overlap; None where there are none. A lone piece of
    the whole run is the result itself; otherwise the sum is made in a new tensor, since autograd
    may share the pieces."""
    if not pieces:
        return None
    whole = next((n for n, (at, g) in enumerate(pieces) if at == 0 and g.shape == shape), None)
    if whole is not None and len(pieces) == 1:
        return pieces[0][1]
    if whole is None:
        out = torch.zeros(shape, dtype=pieces[0][1].dtype, device=pieces[0][1].device)
    else:
        out = pieces[whole][1].clone()
    for n, (at, g) in enumerate(pieces):
        if n != whole:
            out.narrow(axis, at, g.shape[axis]).add_(g)
    return out


class _HaloJoin(torch.autograd.Function):
    """Waits for the halo messages and builds, for each key grid [g0, g1) (global rows inside
    the slab), its (k, v) from the own rows and the halo rows it spans. Its backward sums each
    halo part's gradient over the grids and starts the exchange of the halo rows' gradients,
    which _HaloSend's backward ends: the one node that holds every halo row, so that a rank
    starts one batch per call, and early, since autograd runs it before the backward of the rows
    computed before the join (nodes created later run first). The own rows' gradients from the
    grids go to _HaloSend's backward through the link, not through autograd, which would need
    them as a gradient of all the own rows: a zero fill and one more sum over all of them."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, comm: "_Comm", link: _Link, grids, *halo):
        link.forward.finish()
        link.forward = None
        ctx.set_materialize_grads(False)
        ctx.comm, ctx.link, ctx.grids = comm, link, grids
        ctx.like = [(t.shape, t.dtype, t.device) for t in (k, v)]
        parts = _slab_parts(comm)
        outs = []
        for grid in grids:
            for idx, t in enumerate((k, v)):
                pieces = []
                for n, start, stop in parts:
                    first, last = _overlap((start, stop), grid)
                    if last > first:
                        part = t if n < 0 else halo[2 * n + idx]
                        pieces.append(part.narrow(comm.axis, first - start, last - first))
                outs.append(torch.cat(pieces, dim=comm.axis))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        comm, axis = ctx.comm, ctx.comm.axis
        parts = _slab_parts(comm)
        pieces = {(n, idx): [] for n, _, _ in parts for idx in (0, 1)}
        for number, grid in enumerate(ctx.grids):
            for idx in (0, 1):
                g = grads[2 * number + idx]
                if g is None:
                    continue
                for n, start, stop in parts:
                    first, last = _overlap((start, stop), grid)
                    if last > first:
                        pieces[n, idx].append((first - start,
                                               g.narrow(axis, first - grid[0], last - first)))
        halo = []
        for n, (_, start, stop) in enumerate(_halo_sources(comm)):
            shapes = [comm.halo_shape(shape, stop - start) for shape, _, _ in ctx.like]
            halo.append([_or_zeros(_rows_sum(pieces[n, idx], shapes[idx], axis), shapes[idx],
                                   dtype, device)
                         for idx, (_, dtype, device) in enumerate(ctx.like)])
        ctx.link.own = [pieces[-1, 0], pieces[-1, 1]]
        ctx.link.backward = _start_grad_exchange(comm, halo, ctx.like)
        # The halo rows' gradients also go to _HaloSend, unused there: they make its backward
        # wait for this one.
        return (None, None, None, None, None, *(g for pair in halo for g in pair))


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
    link = _Link()
    k, v, additional_keys, additional_values, *halo = _HaloSend.apply(
        k, v, additional_keys, additional_values, comm, link)
    call_args = dict(stride=stride, dilation=dilation, is_causal=is_causal, scale=scale,
                     additional_keys=additional_keys, additional_values=additional_values,
                     return_lse=return_lse)

    def backend_for(rows: Tuple[int, int], grid: Tuple[int, int]) -> Optional[str]:
        """The backend that computes own rows [rows) (local) as queries against the key grid of
        global rows [grid), or None where the call's backend cannot compute a range. It needs
        only the keys' shapes: stand-ins of one element take their place."""
        keys = [torch.empty_strided(comm.halo_shape(t, grid[1] - grid[0]), (0,) * t.dim(),
                                    dtype=t.dtype, device=t.device, requires_grad=t.requires_grad)
                for t in (k, v)]
        return _query_range_backend(rank, q.narrow(comm.axis, rows[0], rows[1] - rows[0]), *keys,
                                    kernel_size, stride, dilation, is_causal, scale,
                                    additional_keys, additional_values, shard_dim,
                                    lo + rows[0] - grid[0], backend)

    def ranged(rows: Tuple[int, int], grid: Tuple[int, int], keys: Tensor, values: Tensor,
               name: str):
        query = q.narrow(comm.axis, rows[0], rows[1] - rows[0])
        return _query_range_na(rank, query, keys, values, kernel_size, axis=shard_dim,
                               offset=lo + rows[0] - grid[0], backend=name, **call_args)

    # While the halo travels: the rows whose windows lie in the own rows, on the own rows.
    pieces = []
    inner = (0, 0)
    if _OVERLAP:
        # Split points at whole query boxes of every dilation group.
        inner = _aligned(_interior(extents, comm.me, kernel, s, d, causal),
                         d * _query_box_rows(rank, shard_dim))
    if inner[1] > inner[0]:
        name = backend_for(inner, (lo, hi))
        if name is not None:
            pieces.append((inner[0], ranged(inner, (lo, hi), k, v, name)))
    # Then each edge run on its own key grid (the halo on its side and the own rows that its
    # windows reach), or, where nothing was computed yet or an edge cannot be computed as a
    # range, every row on the slab.
    edges = _edge_grids(extents, comm.me, kernel, s, d, causal, inner) if pieces else ()
    names = [backend_for(*edge) for edge in edges]
    if None in names:
        pieces, edges = [], ()
    if not pieces:
        edges = (((0, hi - lo), (a, b)),)
        names = [backend_for(*edges[0])]
    grids = tuple(grid for _, grid in edges)
    has_join = bool(_halo_sources(comm) and grids)
    if has_join:
        joined = _HaloJoin.apply(k, v, comm, link, grids, *halo)
        keys = list(zip(joined[0::2], joined[1::2]))
    else:
        # Without a halo the grids are own rows; without grids the halo goes unused. Either way
        # the messages (this rank's sends at least) must end before their buffers go.
        link.forward.finish()
        keys = [tuple(t.narrow(comm.axis, g0 - lo, g1 - g0) for t in (k, v)) for g0, g1 in grids]
    if None not in names:
        for (rows, grid), name, (kx, vx) in zip(edges, names, keys):
            pieces.append((rows[0], ranged(rows, grid, kx, vx, name)))
        result = _join(sorted(pieces, key=lambda piece: piece[0]), comm.axis, return_lse)
    else:
        kx, vx = keys[0]
        qx = q
        if (a, b) != (lo, hi):
            pad = [torch.zeros(comm.halo_shape(q, n), dtype=q.dtype, device=q.device)
                   for n in (lo - a, b - hi)]
            qx = torch.cat([pad[0], q, pad[1]], dim=comm.axis)
        out = _OPS[rank](qx, kx, vx, kernel_size, backend=backend, **call_args)
        result = (tuple(t.narrow(comm.axis, lo - a, hi - lo) for t in out) if return_lse
                  else out.narrow(comm.axis, lo - a, hi - lo))
    if has_join or k.grad_fn is None:  # k.grad_fn: _HaloSend's node, where it has a backward
        return result
    like = [(t.shape, t.dtype, t.device) for t in (k, v)]
    outs = _BackwardStart.apply(comm, link, k.grad_fn, like,
                                *(result if return_lse else (result,)))
    return outs if return_lse else outs[0]


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

