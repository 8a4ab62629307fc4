"""Plans of fused attention calls: what validation, backend choice and tile resolution make of a
call's arguments. Eager calls keep their plans by an exact signature of those arguments: redoing
that work costs more host time than a small problem's kernels run."""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from natten import backends, tuning
from natten._checks import check_fused, check_tile
from natten.backends.base import Backend, tf32_allowed
from natten.ops import pack_tiles, pack_window, resolve


class Plan(NamedTuple):
    """What a fused call runs: the operators' arguments, and for eager calls the bound kernels."""

    backend: Backend
    window: List[int]  # the operators' packed window (natten.ops.pack_window)
    scale: float
    # Query and key tiles of the forward, then those of the backward (natten.ops.pack_tiles): in
    # plans of traced calls, as given, the operator resolving the others.
    tiles: List[int]
    requires_grad: bool
    # The backend's fna_forward / fna_backward with all but the tensors bound (Backend.bind);
    # eager plans only: binding reaches into natten._C, which torch.compile cannot trace.
    forward: Optional[Callable]
    backward: Optional[Callable]


def _build(eager, rank, query, key, value, additional_keys, additional_values, kernel_size, stride,
           dilation, is_causal, scale, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape,
           backward_kv_tile_shape, query_range) -> Plan:
    # Under torch.compile the sizes may be symbols. Validation and the backend choice read sizes
    # only in comparisons that every valid size passes alike (k * d <= L, H % H_kv == 0, a
    # backend's size limits), which Dynamo turns into guards on the symbols: one graph then serves
    # every spatial shape, batch size and head count. A size that fails a check fails its guard,
    # and the retrace raises the check's error. Head dims pick kernels and set the scale (a float
    # argument of the operators), so Dynamo specialises on them.
    problem, scale = check_fused(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                                 scale, additional_keys, additional_values, query_range)
    backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape, backward_kv_tile_shape = tuning.choose(
        problem, eager, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape, backward_kv_tile_shape)
    impl = backends.select(problem, backend)
    given = [check_tile(name, tile, rank) for name, tile in (
        ("q_tile_shape", q_tile_shape), ("kv_tile_shape", kv_tile_shape),
        ("backward_q_tile_shape", backward_q_tile_shape),
        ("backward_kv_tile_shape", backward_kv_tile_shape))]
    window = pack_window(problem.window)
    if not eager:
        # Default tiles depend on the exact extents (a CPU tile clips to each dilation group,
        # cutlass-fna and flex-fna weigh every box against the grid), so a traced call leaves
        # them, and the checks of the tiles given against them, to the operator, which runs
        # on concrete tensors (natten.ops.fna_forward): specialising the plan on the extents
        # instead would recompile for every new shape, and fullgraph=True fails hard once
        # torch._dynamo.config.recompile_limit is reached.
        return Plan(impl, window, scale, pack_tiles(given, rank), problem.requires_grad, None, None)
    tiles = resolve(impl, problem, given[0], given[1], False)
    # A call without gradients runs no backward (a backend may have no backward kernels for the
    # problem at all, e.g. cutlass-fna at head dim 256): its tiles are checked only when given.
    bwd_tiles = tiles
    if problem.requires_grad or given[2] is not None or given[3] is not None:
        bwd_tiles = resolve(impl, problem, given[2], given[3], True)
    forward = impl.bind(problem, scale, *tiles, False)
    backward = impl.bind(problem, scale, *bwd_tiles, True) if problem.requires_grad else None
    return Plan(impl, window, scale, pack_tiles([*tiles, *bwd_tiles], rank), problem.requires_grad,
                forward, backward)


# Plans of eager calls by signature (see plan). A workload repeats a few signatures; one that
# keeps making new ones starts over when the cache is full (clear() is safe across threads).
_PLANS: Dict[tuple, Plan] = {}
_MAX_PLANS = 1024


class _Inexact(Exception):
    """An argument whose type a signature cannot tell apart from a valid one's."""


def _exact(value, kind: type):
    """value, or a tuple of it, for a signature: 3.0 and True equal 3 in Python but fail
    validation where 3 passes, so only None, `kind` and tuples or lists of `kind` go in."""
    t = type(value)
    if t is kind or value is None:
        return value
    if t is tuple or t is list:
        for v in value:
            if type(v) is not kind:
                raise _Inexact
        return tuple(value)
    raise _Inexact


def plan(eager: bool, rank, query, key, value, additional_keys, additional_values, kernel_size,
         stride, dilation, is_causal, scale, backend, q_tile_shape, kv_tile_shape,
         backward_q_tile_shape, backward_kv_tile_shape, query_range=None) -> Plan:
    """The plan of a fused call (the arguments of natten.na*d but return_lse, and the query
    range of natten._checks.check_fused), raising what validation raises. An eager call's plan
    comes bound and, for a signature seen before, from the cache; any other call is planned
    afresh, as torch.compile must see it."""
    signature = None
    if eager:
        try:
            # Everything validation and planning read, exactly; an eager call's tensors are plain.
            if not (scale is None or type(scale) is float or type(scale) is int):
                raise _Inexact
            if not (backend is None or type(backend) is str):
                raise _Inexact
            extra = None
            if additional_keys is not None or additional_values is not None:
                extra = tuple(None if t is None else (t.shape, t.dtype, t.device, t.requires_grad)
                              for t in (additional_keys, additional_values))
            signature = (
                rank, query.shape, query.dtype, query.device, query.requires_grad,
                key.shape, key.dtype, key.device, key.requires_grad,
                value.shape, value.dtype, value.device, value.requires_grad, extra,
                _exact(kernel_size, int), _exact(stride, int), _exact(dilation, int),
                _exact(is_causal, bool), scale, backend, _exact(q_tile_shape, int),
                _exact(kv_tile_shape, int), _exact(backward_q_tile_shape, int),
                _exact(backward_kv_tile_shape, int), _exact(query_range, int),
                # backend=None picks float32 kernels by torch's TF32 setting (Backend.passed_over)
                query.dtype is torch.float32 and tf32_allowed())
        except _Inexact:
            pass
        else:
            found = _PLANS.get(signature)
            if found is not None:
                return found
    found = _build(eager, rank, query, key, value, additional_keys, additional_values, kernel_size,
                   stride, dilation, is_causal, scale, backend, q_tile_shape, kv_tile_shape,
                   backward_q_tile_shape, backward_kv_tile_shape, query_range)
    if signature is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[signature] = found
    return found
