"""Backends whose kernels live in natten._C, as `<family>_<op>` functions that write into
outputs allocated here (so that NATTEN_POISON_OUTPUTS covers every kernel)."""

from __future__ import annotations

import math

from natten._checks import Window
from natten._memo import memoize
from natten.backends.base import Backend, Tile, lse_dtype, new_output


def extension():
    from natten import _C

    return _C


@memoize  # building the extension's Window costs more host time than a small kernel runs
def window_arg(window: Window):
    return extension().Window(list(window.kernel_size), list(window.stride), list(window.dilation),
                              list(window.is_causal))


class CompiledBackend(Backend):
    supports_unfused = True

    def _kernel(self, op: str):
        return getattr(extension(), f"{self.name}_{op}")

    def _tile_args(self, q, v, q_tile: Tile, kv_tile: Tile, backward: bool) -> list:
        """Extra arguments the family's fused kernels take after `scale`."""
        return []

    def fna_forward(self, q, k, v, extra_k, extra_v, window, scale, q_tile, kv_tile):
        out = new_output((*q.shape[:-1], v.shape[-1]), q.dtype, q.device)
        lse = new_output(q.shape[:-1], lse_dtype(q.dtype), q.device)
        self._kernel("fna_forward")(q, k, v, extra_k, extra_v, window_arg(window), scale,
                                    *self._tile_args(q, v, q_tile, kv_tile, False), out, lse)
        return out, lse

    def fna_backward(self, d_out, d_lse, q, k, v, extra_k, extra_v, out, lse, window, scale, q_tile,
                     kv_tile):
        d_q = new_output(q.shape, q.dtype, q.device)
        d_k = new_output(k.shape, k.dtype, k.device)
        d_v = new_output(v.shape, v.dtype, v.device)
        d_ek = None if extra_k is None else new_output(extra_k.shape, q.dtype, q.device)
        d_ev = None if extra_v is None else new_output(extra_v.shape, q.dtype, q.device)
        self._kernel("fna_backward")(q, k, v, extra_k, extra_v, out, lse, d_out, d_lse,
                                     window_arg(window), scale,
                                     *self._tile_args(q, v, q_tile, kv_tile, True),
                                     d_q, d_k, d_v, d_ek, d_ev)
        return d_q, d_k, d_v, d_ek, d_ev

    def na_qk(self, q, k, rpb, window):
        attn = new_output((*q.shape[:-1], math.prod(window.kernel_size)), q.dtype, q.device)
        self._kernel("na_qk_forward")(q, k, rpb, window_arg(window), attn)
        return attn

    def na_qk_backward(self, d_attn, q, k, has_rpb, window):
        d_q = new_output(q.shape, q.dtype, q.device)
        d_k = new_output(k.shape, k.dtype, k.device)
        rpb_shape = (q.shape[-2], *(2 * x - 1 for x in window.kernel_size))
        d_rpb = new_output(rpb_shape, q.dtype, q.device) if has_rpb else None
        self._kernel("na_qk_backward")(d_attn, q, k, window_arg(window), d_q, d_k, d_rpb)
        return d_q, d_k, d_rpb

    def na_av(self, attn, v, window):
        out = new_output((*attn.shape[:-1], v.shape[-1]), v.dtype, v.device)
        self._kernel("na_av_forward")(attn, v, window_arg(window), out)
        return out

    def na_av_backward(self, d_out, attn, v, window):
        d_attn = new_output(attn.shape, attn.dtype, attn.device)
        d_v = new_output(v.shape, v.dtype, v.device)
        self._kernel("na_av_backward")(d_out, attn, v, window_arg(window), d_attn, d_v)
        return d_attn, d_v
