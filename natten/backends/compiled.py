"""Backends whose kernels live in natten._C, as `<family>_<op>` functions that write into
outputs allocated here (so that NATTEN_POISON_OUTPUTS covers every kernel)."""

from __future__ import annotations

import functools
import math

from natten._checks import Window
from natten._memo import memoize
from natten.backends.base import Backend, Tile, lse_dtype, new_output, output_like


def extension():
    from natten import _C

    return _C


@memoize  # building the extension's Window costs more host time than a small kernel runs
def window_arg(window: Window):
    q_offset = []  # the query range, placed by its offset: its extent is the query tensor's
    if window.query_range is not None:
        q_offset = [0] * window.rank
        q_offset[window.query_range.axis] = window.query_range.offset
    return extension().Window(list(window.kernel_size), list(window.stride), list(window.dilation),
                              list(window.is_causal), q_offset)


def _forward(kernel, window, scale, tile_args, out_shape, lse_shape, lse_type, q, k, v, extra_k,
             extra_v):
    out = new_output(q, *out_shape)
    lse = new_output(q, *lse_shape, dtype=lse_type)
    kernel(q, k, v, extra_k, extra_v, window, scale, *tile_args, out, lse)
    return out, lse


def _backward(kernel, window, scale, tile_args, d_out, d_lse, q, k, v, extra_k, extra_v, out, lse):
    d_q, d_k, d_v = output_like(q), output_like(k), output_like(v)
    d_ek = None if extra_k is None else output_like(extra_k)
    d_ev = None if extra_v is None else output_like(extra_v)
    kernel(q, k, v, extra_k, extra_v, out, lse, d_out, d_lse, window, scale, *tile_args,
           d_q, d_k, d_v, d_ek, d_ev)
    return d_q, d_k, d_v, d_ek, d_ev


class CompiledBackend(Backend):
    supports_unfused = True

    def _kernel(self, op: str):
        return getattr(extension(), f"{self.name}_{op}")

    def _tile_args(self, rank: int, dtype, head_dim: int, q_tile: Tile, kv_tile: Tile,
                   backward: bool) -> list:
        """Extra arguments the family's fused kernels take after `scale` (head_dim: the larger
        of the query's and the value's)."""
        return []

    def _fna_args(self, window: Window, scale: float, rank: int, dtype, head_dim: int, q_tile: Tile,
                  kv_tile: Tile, backward: bool) -> tuple:
        """The leading arguments of _forward / _backward."""
        kernel = self._kernel("fna_backward" if backward else "fna_forward")
        return (kernel, window_arg(window), scale,
                self._tile_args(rank, dtype, head_dim, q_tile, kv_tile, backward))

    def bind(self, problem, scale, q_tile, kv_tile, backward):
        args = self._fna_args(problem.window, scale, problem.rank, problem.dtype,
                              max(problem.dim, problem.dim_v), q_tile, kv_tile, backward)
        if backward:
            return functools.partial(_backward, *args)
        # Output shapes are bound too: reading them off the tensors takes longer than allocating.
        lse_shape = (problem.batch, *problem.query_spatial, problem.heads)
        return functools.partial(_forward, *args, (*lse_shape, problem.dim_v), lse_shape,
                                 lse_dtype(problem.dtype))

    def fna_forward(self, q, k, v, extra_k, extra_v, window, scale, q_tile, kv_tile):
        args = self._fna_args(window, scale, q.dim() - 3, q.dtype, max(q.shape[-1], v.shape[-1]),
                              q_tile, kv_tile, False)
        return _forward(*args, (*q.shape[:-1], v.shape[-1]), q.shape[:-1], lse_dtype(q.dtype),
                        q, k, v, extra_k, extra_v)

    def fna_backward(self, d_out, d_lse, q, k, v, extra_k, extra_v, out, lse, window, scale, q_tile,
                     kv_tile):
        args = self._fna_args(window, scale, q.dim() - 3, q.dtype, max(q.shape[-1], v.shape[-1]),
                              q_tile, kv_tile, True)
        return _backward(*args, d_out, d_lse, q, k, v, extra_k, extra_v, out, lse)

    def na_qk(self, q, k, rpb, window):
        attn = new_output(q, *q.shape[:-1], math.prod(window.kernel_size))
        self._kernel("na_qk_forward")(q, k, rpb, window_arg(window), attn)
        return attn

    def na_qk_backward(self, d_attn, q, k, has_rpb, window):
        d_q, d_k = output_like(q), output_like(k)
        d_rpb = new_output(q, q.shape[-2], *(2 * x - 1 for x in window.kernel_size)) if has_rpb else None
        self._kernel("na_qk_backward")(d_attn, q, k, window_arg(window), d_q, d_k, d_rpb)
        return d_q, d_k, d_rpb

    def na_av(self, attn, v, window):
        out = new_output(v, *attn.shape[:-1], v.shape[-1])
        self._kernel("na_av_forward")(attn, v, window_arg(window), out)
        return out

    def na_av_backward(self, d_out, attn, v, window):
        d_attn, d_v = output_like(attn), output_like(v)
        self._kernel("na_av_backward")(d_out, attn, v, window_arg(window), d_attn, d_v)
        return d_attn, d_v
