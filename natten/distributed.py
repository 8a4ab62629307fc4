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

Communication: halo K/V rows come from their owners by point-to-point messages (several
owners when slabs are thinner than the halo); in the backward the halo rows' dK/dV go back to
their owners and are summed there; the gradients of the replicated additional keys/values
are summed over the group. Every rank must run the backward of its output (the backward
exchanges messages).
"""

from __future__ import annotations

import functools
import zlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from natten import backends
from natten._checks import check_fused
from natten.functional import _query_range_na, na1d as _na1d, na2d as _na2d, na3d as _na3d

__all__ = ["na1d", "na2d", "na3d", "module_forward"]

_OPS = {1: _na1d, 2: _na2d, 3: _na3d}


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

    def exchange(self, sends: dict, recv_like: dict) -> dict:
        """Sends sends[j] (a list of tensors) to rank j and receives, from rank j, tensors
        shaped as recv_like[j]; one message per peer and direction."""
        ops, inbox = [], {}
        for j, like in recv_like.items():
            sizes = [t.numel() * t.element_size() for t in like]
            buf = torch.empty(sum(sizes), dtype=torch.uint8, device=like[0].device)
            inbox[j] = (buf, sizes, like)
            ops.append(dist.P2POp(dist.irecv, buf, self.peer(j), self.group))
        for j, tensors in sends.items():
            buf = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])
            ops.append(dist.P2POp(dist.isend, buf, self.peer(j), self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        out = {}
        for j, (buf, sizes, like) in inbox.items():
            parts, at = [], 0
            for size, t in zip(sizes, like):
                parts.append(buf[at:at + size].view(t.dtype).view(t.shape))
                at += size
            out[j] = parts
        return out

    def halo_shape(self, t: Tensor, n: int) -> torch.Size:
        shape = list(t.shape)
        shape[self.axis] = n
        return torch.Size(shape)


class _HaloExchange(torch.autograd.Function):
    """(k, v) of this rank's rows -> (k, v) of its slab; backward returns the halo rows'
    gradients to their owners, which add them to their own."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, comm: _Comm):
        ctx.comm = comm
        me, routes = comm.me, comm.routes
        sends = {i: [comm.rows(t, *routes[i][me]) for t in (k, v)]
                 for i in range(len(routes)) if i != me and routes[i][me][1] > routes[i][me][0]}
        recv_like = {}
        for j, (start, stop) in enumerate(routes[me]):
            if j != me and stop > start:
                recv_like[j] = [torch.empty(comm.halo_shape(t, stop - start), dtype=t.dtype,
                                            device=t.device) for t in (k, v)]
        got = comm.exchange(sends, recv_like)
        left = [got[j] for j in sorted(got) if j < me]
        right = [got[j] for j in sorted(got) if j > me]
        outs = []
        for idx, t in enumerate((k, v)):
            pieces = [p[idx] for p in left] + [t] + [p[idx] for p in right]
            outs.append(torch.cat(pieces, dim=comm.axis) if len(pieces) > 1 else t.clone())
        return tuple(outs)

    @staticmethod
    def backward(ctx, gk: Tensor, gv: Tensor):
        comm = ctx.comm
        me, routes = comm.me, comm.routes
        a = comm.slab[0]
        lo, hi = comm.owned[me]
        sends = {}
        for j, (start, stop) in enumerate(routes[me]):
            if j != me and stop > start:
                sends[j] = [g.narrow(comm.axis, start - a, stop - start) for g in (gk, gv)]
        recv_like = {}
        for i in range(len(routes)):
            start, stop = routes[i][me]
            if i != me and stop > start:
                recv_like[i] = [torch.empty(comm.halo_shape(g, stop - start), dtype=g.dtype,
                                            device=g.device) for g in (gk, gv)]
        got = comm.exchange(sends, recv_like)
        grads = [g.narrow(comm.axis, lo - a, hi - lo).clone() for g in (gk, gv)]
        for i, parts in got.items():
            start, stop = routes[i][me]
            for g, part in zip(grads, parts):
                g.narrow(comm.axis, start - lo, stop - start).add_(part)
        return grads[0], grads[1], None


class _SumGradients(torch.autograd.Function):
    """Identity whose backward sums the gradient over the group (replicated tensors)."""

    @staticmethod
    def forward(ctx, t: Tensor, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


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
    kx, vx = _HaloExchange.apply(k, v, comm)
    if additional_keys is not None:
        additional_keys = _SumGradients.apply(additional_keys, group)
        additional_values = _SumGradients.apply(additional_values, group)
    call_args = dict(stride=stride, dilation=dilation, is_causal=is_causal, scale=scale,
                     additional_keys=additional_keys, additional_values=additional_values,
                     return_lse=return_lse)
    ranged = _query_range_backend(rank, q, kx, vx, kernel_size, stride, dilation, is_causal, scale,
                                  additional_keys, additional_values, shard_dim, lo - a, backend)
    if ranged is not None:
        return _query_range_na(rank, q, kx, vx, kernel_size, axis=shard_dim, offset=lo - a,
                               backend=ranged, **call_args)
    qx = q
    if (a, b) != (lo, hi):
        pad = [torch.zeros(comm.halo_shape(q, n), dtype=q.dtype, device=q.device)
               for n in (lo - a, b - hi)]
        qx = torch.cat([pad[0], q, pad[1]], dim=comm.axis)
    out = _OPS[rank](qx, kx, vx, kernel_size, backend=backend, **call_args)
    if return_lse:
        return tuple(t.narrow(comm.axis, lo - a, hi - lo) for t in out)
    return out.narrow(comm.axis, lo - a, hi - lo)


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

