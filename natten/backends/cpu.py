"""The CPU backend: fused and unfused kernels of natten._C (C++, at::parallel_for, BLAS)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from natten._checks import FusedProblem, Window
from natten.backends.base import Backend, Tile, lse_dtype, new_output


def _C():
    from natten import _C

    return _C


def _window_arg(window: Window):
    return _C().Window(list(window.kernel_size), list(window.stride), list(window.dilation),
                       list(window.is_causal))


# Keys per chunk of the fused kernels; a chunk's scores stay in the core's cache.
_KV_CHUNK = 512


def _default_q_tile(problem: FusedProblem) -> Tile:
    """About 64 queries per tile, shaped like the window: per axis the tile grows with the
    kernel, since the key box of a tile is (tile + kernel - 1) long and the work wasted on keys
    outside a query's window shrinks as the tile gets small next to the kernel."""
    rank = problem.rank
    budget = 64
    tile = [1] * rank
    kernels = problem.window.kernel_size
    groups = [math.ceil(L / d) for L, d in zip(problem.spatial, problem.window.dilation)]
    while True:
        # Grow the axis where doubling costs the least extra key work, relative to its kernel.
        candidates = [a for a in range(rank) if tile[a] < groups[a] and math.prod(tile) * 2 <= budget]
        if not candidates:
            return tuple(tile)
        a = min(candidates, key=lambda a: (tile[a] / kernels[a], -a))
        tile[a] = min(tile[a] * 2, groups[a])


def _kv_tile(rank: int) -> Tile:
    side = round(_KV_CHUNK ** (1 / rank))
    return (side,) * (rank - 1) + (_KV_CHUNK // side ** (rank - 1),)


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    supports_unfused = True

    def is_available(self) -> bool:
        try:
            _C()
        except ImportError:
            return False
        return True

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        if problem.device.type != "cpu":
            return f"inputs are on {problem.device}, the cpu backend runs on the CPU"
        return None

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile) -> Optional[str]:
        # Any positive tile works: query tiles are clipped to each dilation group, and the key
        # tile only bounds how many keys are scored at once (its product is the chunk size).
        return None

    def default_tiles(self, problem: FusedProblem, backward: bool) -> Tuple[Tile, Tile]:
        return _default_q_tile(problem), _kv_tile(problem.rank)

    def fna_forward(self, q, k, v, extra_k, extra_v, window, scale, q_tile, kv_tile):
        out = new_output((*q.shape[:-1], v.shape[-1]), q.dtype, q.device)
        lse = new_output(q.shape[:-1], lse_dtype(q.dtype), q.device)
        _C().fna_forward(q, k, v, extra_k, extra_v, _window_arg(window), scale, list(q_tile),
                         math.prod(kv_tile), out, lse)
        return out, lse

    def fna_backward(self, d_out, d_lse, q, k, v, extra_k, extra_v, out, lse, window, scale, q_tile,
                     kv_tile):
        d_q = new_output(q.shape, q.dtype, q.device)
        d_k = new_output(k.shape, k.dtype, k.device)
        d_v = new_output(v.shape, v.dtype, v.device)
        d_ek = None if extra_k is None else new_output(extra_k.shape, q.dtype, q.device)
        d_ev = None if extra_v is None else new_output(extra_v.shape, q.dtype, q.device)
        _C().fna_backward(q, k, v, extra_k, extra_v, out, lse, d_out, d_lse, _window_arg(window), scale,
                          list(q_tile), math.prod(kv_tile), d_q, d_k, d_v, d_ek, d_ev)
        return d_q, d_k, d_v, d_ek, d_ev

    def na_qk(self, q, k, rpb, window):
        attn = new_output((*q.shape[:-1], math.prod(window.kernel_size)), q.dtype, q.device)
        _C().na_qk_forward(q, k, rpb, _window_arg(window), attn)
        return attn

    def na_qk_backward(self, d_attn, q, k, has_rpb, window):
        d_q = new_output(q.shape, q.dtype, q.device)
        d_k = new_output(k.shape, k.dtype, k.device)
        rpb_shape = (q.shape[-2], *(2 * x - 1 for x in window.kernel_size))
        d_rpb = new_output(rpb_shape, q.dtype, q.device) if has_rpb else None
        _C().na_qk_backward(d_attn, q, k, _window_arg(window), d_q, d_k, d_rpb)
        return d_q, d_k, d_rpb

    def na_av(self, attn, v, window):
        out = new_output((*attn.shape[:-1], v.shape[-1]), v.dtype, v.device)
        _C().na_av_forward(attn, v, _window_arg(window), out)
        return out

    def na_av_backward(self, d_out, attn, v, window):
        d_attn = new_output(attn.shape, attn.dtype, attn.device)
        d_v = new_output(v.shape, v.dtype, v.device)
        _C().na_av_backward(d_out, attn, v, _window_arg(window), d_attn, d_v)
        return d_attn, d_v
