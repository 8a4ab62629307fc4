"""The custom operators (torch.library): real implementations that call a backend, fake
implementations for tracing, and autograd through the matching backward operators; and the
eager path of fused attention, which runs a plan's bound kernels without the operator layer.
Arguments arrive validated and normalised (natten._plan, natten.functional).

A window travels as one int[] (kernel_size, stride, dilation, is_causal as 0/1, then the query
range's axis, offset and extent when there is one: natten._checks.QueryRange) and the tile
shapes of a call as another: each schema argument costs host time on every call (the autograd
wrapper of torch.library re-reads the whole schema once per argument), and torch.jit's tracer,
which fvcore counts FLOPs with, cannot record bool[] arguments."""

from __future__ import annotations

import functools
import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from natten import backends
from natten._checks import FusedProblem, QueryRange, Window, fused_problem
from natten._memo import memoize
from natten.backends.base import Backend, Tile, lse_dtype


def pack_window(window: Window) -> List[int]:
    packed = [*window.kernel_size, *window.stride, *window.dilation, *map(int, window.is_causal)]
    r = window.query_range
    if r is not None:
        # Fields by name: torch 2.11's Dynamo traces `list += NamedTuple` as list + tuple, a
        # TypeError.
        packed += [r.axis, r.offset, r.extent]
    return packed


# A tile of the operators' tile_shapes left to the backend's default (real tiles are positive).
_DEFAULT_TILE = 0


def pack_tiles(tiles: Sequence[Optional[Tile]], rank: int) -> List[int]:
    """The operators' tile_shapes argument; None marks a tile the operator resolves (resolve)."""
    return [x for t in tiles for x in (t or (_DEFAULT_TILE,) * rank)]


def resolve(backend: Backend, problem: FusedProblem, q_tile: Optional[Tile],
            kv_tile: Optional[Tile], backward: bool) -> Tuple[Tile, Tile]:
    """The tiles a call runs with: those given, the backend's defaults for the others; raises
    ValueError naming the arguments when they do not fit the backend."""
    q_tile, kv_tile, reason = backends.resolve_tiles(backend, problem, q_tile, kv_tile, backward)
    if reason is not None:
        prefix = "backward_" if backward else ""
        raise ValueError(f"{prefix}q_tile_shape={q_tile} / {prefix}kv_tile_shape={kv_tile} do not "
                         f"fit backend {backend.name!r}: {reason}")
    return q_tile, kv_tile


def _operator_tiles(backend: Backend, tile_shapes: List[int], window: Window, backward: bool, query,
                    key, value, additional_keys) -> Tuple[Tile, Tile]:
    """The tiles of an operator call. Plans of traced calls leave default tiles to the operator,
    and check none against the backend (natten._plan): here the extents are concrete."""
    q_tile, kv_tile = (None if _DEFAULT_TILE in t else t for t in _split(tile_shapes, 2))
    # The forward operator takes no gradients itself; requires_grad marks the backward's problem.
    problem = fused_problem(window, query, key, value, additional_keys, backward)
    return resolve(backend, problem, q_tile, kv_tile, backward)


def _split(values: List[int], parts: int) -> List[Tuple[int, ...]]:
    n = len(values) // parts
    return [tuple(values[i * n:(i + 1) * n]) for i in range(parts)]


def _window(window: List[int]) -> Window:
    return _unpack_window(tuple(window))


@memoize
def _unpack_window(window: Tuple[int, ...]) -> Window:
    # Four per-axis lists of at most three axes, plus three entries for a query range: the
    # length's remainder mod 4 tells them apart.
    query_range = QueryRange(*window[-3:]) if len(window) % 4 else None
    kernel_size, stride, dilation, is_causal = _split(list(window[:len(window) // 4 * 4]), 4)
    return Window(kernel_size, stride, dilation, tuple(bool(c) for c in is_causal), query_range)


def _dense_all(*tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
    return [None if t is None else t.contiguous() for t in tensors]


def _fake_like(t: Tensor) -> Tensor:
    """A fake result shaped like t and, as every real result of the operators, contiguous (they
    make their inputs contiguous first): torch.empty_like keeps the strides of a permuted input,
    and inductor asserts that real results have the strides of the fake ones."""
    return t.new_empty(t.shape)


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Operator results cannot be None; an absent gradient travels as an empty tensor.
    return like.new_empty(0) if t is None else t


# ----------------------------------------------------------------------------- fused attention

def _dispatch_keys(*names: str) -> torch._C.DispatchKeySet:
    return functools.reduce(operator.or_, (torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, n))
                                           for n in names))


# While a Python dispatch mode handles an operator, torch excludes every dispatch key above
# Python, and an operator's implementation inherits that. torch.compile runs the first call of
# each compiled graph under such a mode (its check of custom operators' aliasing), where the
# function transforms flex-fna relies on (vmap in FlexAttention's block masks, functionalization
# in its compiled kernels) would fail. The fused operators run their backend with those keys back,
# excluding only what a plain call of an operator excludes: autograd and autocast.
_ABOVE_PYTHON = (torch._C._dispatch_keyset_full()
                 - torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
                 - _dispatch_keys("Python"))
_PLAIN_EXCLUDED = _dispatch_keys(
    "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor",
    *(name for name in dir(torch._C.DispatchKey) if name.startswith("Autocast")))


def _as_plain_call():
    exclude = torch._C._dispatch_tls_local_exclude_set()
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           exclude - (_ABOVE_PYTHON - _PLAIN_EXCLUDED))


@torch.library.custom_op("natten::fna_forward", mutates_args=())
def fna_forward(query: Tensor, key: Tensor, value: Tensor, additional_keys: Optional[Tensor],
                additional_values: Optional[Tensor], window: List[int], scale: float, backend: str,
                tile_shapes: List[int]) -> Tuple[Tensor, Tensor]:
    """tile_shapes: the query and key tiles of the forward, then those of the backward."""
    impl, window = backends.get(backend), _window(window)
    tiles = _operator_tiles(impl, tile_shapes[:len(tile_shapes) // 2], window, False, query, key,
                            value, additional_keys)
    with _as_plain_call():
        out, lse = impl.fna_forward(
            *_dense_all(query, key, value, additional_keys, additional_values), window, scale,
            *tiles)
    # Dense as the fake results: inductor asserts their strides (a backend may return views).
    return out.contiguous(), lse.contiguous()


@fna_forward.register_fake
def _(query, key, value, additional_keys, additional_values, window, scale, backend, tile_shapes):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    lse = query.new_empty(query.shape[:-1], dtype=lse_dtype(query.dtype))
    return out, lse


@torch.library.custom_op("natten::fna_backward", mutates_args=())
def fna_backward(d_out: Tensor, d_lse: Optional[Tensor], query: Tensor, key: Tensor, value: Tensor,
                 additional_keys: Optional[Tensor], additional_values: Optional[Tensor], out: Tensor,
                 lse: Tensor, window: List[int], scale: float, backend: str,
                 tile_shapes: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """tile_shapes: the query tile, then the key tile."""
    impl, window = backends.get(backend), _window(window)
    tiles = _operator_tiles(impl, tile_shapes, window, True, query, key, value, additional_keys)
    with _as_plain_call():
        grads = impl.fna_backward(
            *_dense_all(d_out, d_lse, query, key, value, additional_keys, additional_values, out,
                        lse), window, scale, *tiles)
    # Dense as the fake results (see fna_forward): flex-fna's gradients of the additional keys
    # and values are transposed views.
    return tuple(_empty_if_none(g, query) for g in _dense_all(*grads))


@fna_backward.register_fake
def _(d_out, d_lse, query, key, value, additional_keys, additional_values, out, lse, window, scale,
      backend, tile_shapes):
    extra = [_empty_if_none(None if t is None else _fake_like(t), query)
             for t in (additional_keys, additional_values)]
    return _fake_like(query), _fake_like(key), _fake_like(value), *extra


def _fna_grads(ctx, d_out, d_lse, backward):
    """Gradients of query, key, value and the additional keys/values (None when absent);
    `backward` takes the saved tensors after the output gradients, then ctx.args."""
    q, k, v, ek, ev, out, lse = ctx.saved_tensors
    if d_out is None:  # only the logsumexp was used
        d_out = torch.zeros_like(out)
    d_q, d_k, d_v, d_ek, d_ev = backward(d_out, d_lse, q, k, v, ek, ev, out, lse, *ctx.args)
    if ek is None:
        d_ek = d_ev = None
    return d_q, d_k, d_v, d_ek, d_ev


def _fna_setup(ctx, inputs, output):
    q, k, v, ek, ev, window, scale, backend, tile_shapes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, ek, ev, out, lse)
    ctx.args = (window, scale, backend, tile_shapes[len(tile_shapes) // 2:])


def _fna_backward(ctx, d_out, d_lse):
    return _fna_grads(ctx, d_out, d_lse, fna_backward) + (None,) * 4


fna_forward.register_autograd(_fna_backward, setup_context=_fna_setup)


def _eager_backward(d_out, d_lse, query, key, value, additional_keys, additional_values, out, lse,
                    bound_backward):
    return bound_backward(
        *_dense_all(d_out, d_lse, query, key, value, additional_keys, additional_values, out, lse))


def _eager_grads(ctx, d_out, d_lse):
    # Gradients past the inputs given must be None, and autograd drops them.
    return (None, None) + _fna_grads(ctx, d_out, d_lse, _eager_backward)


_eager_grads_once = once_differentiable(_eager_grads)


class _EagerFna(torch.autograd.Function):
    """fna_forward with its autograd formula for eager calls, running a plan's bound kernels.
    Every argument and output costs host time: the additional keys and values come only when
    given, and the logsumexp is an output only when the caller asked for it."""

    @staticmethod
    def forward(ctx, plan, return_lse, query, key, value, *extra):
        ctx.set_materialize_grads(False)  # as the operator: an unused output's gradient is None
        additional_keys, additional_values = extra or (None, None)
        out, lse = plan.forward(*_dense_all(query, key, value, additional_keys, additional_values))
        ctx.save_for_backward(query, key, value, additional_keys, additional_values, out, lse)
        ctx.args = (plan.backward,)
        return (out, lse) if return_lse else out

    @staticmethod
    def backward(ctx, d_out, d_lse=None):
        # Grad mode is on here only under create_graph=True, where once_differentiable makes a
        # second differentiation fail loudly; elsewhere its no_grad block only costs host time.
        if torch.is_grad_enabled():
            return _eager_grads_once(ctx, d_out, d_lse)
        return _eager_grads(ctx, d_out, d_lse)


def is_eager(tensors) -> bool:
    """Whether a call may skip the operator layer: nothing traces, compiles, transforms or
    intercepts it, and every tensor is a plain one. The operator layer's dispatch and its
    autograd wrapper cost 30-70 us of host time per call, longer than a small problem's kernels
    run; what runs below it is the same either way."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
            or torch._C._are_functorch_transforms_active()):
        return False
    for t in tensors:
        if t is not None and type(t) is not Tensor:
            return False
    return True


def fused_attention(tensors, plan, eager: bool, return_lse: bool):
    """Runs a plan (natten._plan) on (query, key, value, additional_keys, additional_values):
    through natten::fna_forward, or for an eager call (is_eager) without the operator layer.
    Returns the output, and the logsumexp with return_lse."""
    if not eager:
        out, lse = fna_forward(*tensors, plan.window, plan.scale, plan.backend.name, plan.tiles)
        return (out, lse) if return_lse else out
    if plan.requires_grad and torch.is_grad_enabled():
        given = tensors if tensors[3] is not None else tensors[:3]
        return _EagerFna.apply(plan, return_lse, *given)
    out, lse = plan.forward(*_dense_all(*tensors))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- unfused ops

@torch.library.custom_op("natten::na_qk", mutates_args=())
def na_qk(query: Tensor, key: Tensor, rpb: Optional[Tensor], window: List[int]) -> Tensor:
    return backends.for_unfused(query.device.type).na_qk(
        *_dense_all(query, key, rpb), _window(window))


@na_qk.register_fake
def _(query, key, rpb, window):
    window_size = 1
    for k in _window(window).kernel_size:
        window_size *= k
    return query.new_empty((*query.shape[:-1], window_size))


@torch.library.custom_op("natten::na_qk_backward", mutates_args=())
def na_qk_backward(d_attn: Tensor, query: Tensor, key: Tensor, has_rpb: bool,
                   window: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    d_q, d_k, d_rpb = backends.for_unfused(query.device.type).na_qk_backward(
        d_attn.contiguous(), query.contiguous(), key.contiguous(), has_rpb, _window(window))
    return d_q, d_k, _empty_if_none(d_rpb, query)


@na_qk_backward.register_fake
def _(d_attn, query, key, has_rpb, window):
    kernel_size = _window(window).kernel_size
    rpb_shape = (query.shape[-2], *(2 * k - 1 for k in kernel_size)) if has_rpb else (0,)
    return _fake_like(query), _fake_like(key), query.new_empty(rpb_shape)


def _qk_setup(ctx, inputs, output):
    q, k, rpb, window = inputs
    ctx.save_for_backward(q, k)
    ctx.window = window
    ctx.has_rpb = rpb is not None


def _qk_backward(ctx, d_attn):
    q, k = ctx.saved_tensors
    d_q, d_k, d_rpb = na_qk_backward(d_attn, q, k, ctx.has_rpb, ctx.window)
    return d_q, d_k, d_rpb if ctx.has_rpb else None, None


na_qk.register_autograd(_qk_backward, setup_context=_qk_setup)


@torch.library.custom_op("natten::na_av", mutates_args=())
def na_av(attn: Tensor, value: Tensor, window: List[int]) -> Tensor:
    return backends.for_unfused(value.device.type).na_av(
        attn.contiguous(), value.contiguous(), _window(window))


@na_av.register_fake
def _(attn, value, window):
    return value.new_empty((*attn.shape[:-1], value.shape[-1]))


@torch.library.custom_op("natten::na_av_backward", mutates_args=())
def na_av_backward(d_out: Tensor, attn: Tensor, value: Tensor,
                   window: List[int]) -> Tuple[Tensor, Tensor]:
    return backends.for_unfused(value.device.type).na_av_backward(
        d_out.contiguous(), attn.contiguous(), value.contiguous(), _window(window))


@na_av_backward.register_fake
def _(d_out, attn, value, window):
    return _fake_like(attn), _fake_like(value)


def _av_setup(ctx, inputs, output):
    attn, v, window = inputs
    ctx.save_for_backward(attn, v)
    ctx.window = window


def _av_backward(ctx, d_out):
    attn, v = ctx.saved_tensors
    d_attn, d_v = na_av_backward(d_out, attn, v, ctx.window)
    return d_attn, d_v, None


na_av.register_autograd(_av_backward, setup_context=_av_setup)
