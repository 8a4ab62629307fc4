"""Plans of fused attention calls: what validation, backend choice and tile resolution make of a
call's arguments. Eager calls keep their plans by an exact signature of those arguments: redoing
that work costs more host time than a small problem's kernels run."""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from natten import backends, tuning
from natten._checks import check_fused, check_tile
from natten.backends.base import Backend, Tile, tf32_allowed
from natten.ops import pack_window


class Plan(NamedTuple):
    """What a fused call runs: the operators' arguments, and for eager calls the bound kernels."""

    backend: Backend
    window: List[int]  # the operators' packed window (natten.ops.pack_window)
    scale: float
    tiles: List[int]  # query and key tiles of the forward, then those of the backward
    requires_grad: bool
    # The backend's fna_forward / fna_backward with all but the tensors bound (Backend.bind);
    # eager plans only: binding reaches into natten._C, which torch.compile cannot trace.
    forward: Optional[Callable]
    backward: Optional[Callable]


def _tiles(name_q, q_tile, name_kv, kv_tile, backend, problem, backward) -> Tuple[Tile, Tile]:
    q_tile = check_tile(name_q, q_tile, problem.rank)
    kv_tile = check_tile(name_kv, kv_tile, problem.rank)
    q_tile, kv_tile, reason = backends.resolve_tiles(backend, problem, q_tile, kv_tile, backward)
    if reason is not None:
        raise ValueError(f"{name_q}={q_tile} / {name_kv}={kv_tile} do not fit backend "
                         f"{backend.name!r}: {reason}")
    return q_tile, kv_tile


def _build(bind, rank, query, key, value, additional_keys, additional_values, kernel_size, stride,
           dilation, is_causal, scale, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape,
           backward_kv_tile_shape) -> Plan:
    problem, scale = check_fused(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                                 scale, additional_keys, additional_values)
    backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape, backward_kv_tile_shape = tuning.choose(
        problem, bind, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape, backward_kv_tile_shape)
    impl = backends.select(problem, backend)
    tiles = _tiles("q_tile_shape", q_tile_shape, "kv_tile_shape", kv_tile_shape, impl, problem, False)
    # A call without gradients runs no backward (a backend may have no backward kernels for the
    # problem at all, e.g. cutlass-fna at head dim 256): its tiles are checked only when given.
    bwd_tiles = tiles
    if problem.requires_grad or backward_q_tile_shape is not None or backward_kv_tile_shape is not None:
        bwd_tiles = _tiles("backward_q_tile_shape", backward_q_tile_shape, "backward_kv_tile_shape",
                           backward_kv_tile_shape, impl, problem, True)
    forward = backward = None
    if bind:
        forward = impl.bind(problem, scale, *tiles, False)
        if problem.requires_grad:
            backward = impl.bind(problem, scale, *bwd_tiles, True)
    return Plan(impl, pack_window(problem.window), scale, [*tiles[0], *tiles[1], *bwd_tiles[0],
                *bwd_tiles[1]], problem.requires_grad, forward, backward)


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
         backward_q_tile_shape, backward_kv_tile_shape) -> Plan:
    """The plan of a fused call (the arguments of natten.na*d but return_lse), raising what
    validation raises. An eager call's plan comes bound and, for a signature seen before, from
    the cache; any other call is planned afresh, as torch.compile must see it."""
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
                _exact(backward_kv_tile_shape, int),
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
                   backward_q_tile_shape, backward_kv_tile_shape)
    if signature is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[signature] = found
    return found
