"""Public functional API (docs/semantics.md, public API): fused attention, unfused ops, and the original
heads-first API. Every entry point validates through natten._checks before any kernel runs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from natten import _plan, ops
from natten._checks import check_av, check_qk

__all__ = [
    "na1d", "na2d", "na3d", "fused_na1d", "fused_na2d", "fused_na3d",
    "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "natten1dqkrpb", "natten2dqkrpb", "natten3dqkrpb", "natten1dqk", "natten2dqk", "natten3dqk",
    "natten1dav", "natten2dav", "natten3dav",
]


def _fused(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale,
           additional_keys, additional_values, backend, q_tile_shape, kv_tile_shape,
           backward_q_tile_shape, backward_kv_tile_shape, return_lse, query_range=None):
    tensors = (query, key, value, additional_keys, additional_values)
    eager = ops.is_eager(tensors)
    plan = _plan.plan(eager, rank, *tensors, kernel_size, stride, dilation, is_causal, scale,
                      backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape,
                      backward_kv_tile_shape, query_range)
    return ops.fused_attention(tensors, plan, eager, return_lse)


def _query_range_na(rank: int, query: Tensor, key: Tensor, value: Tensor, kernel_size, stride=1,
                    dilation=1, is_causal=False, *, axis: int, offset: int,
                    scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
                    additional_values: Optional[Tensor] = None, backend: Optional[str] = None,
                    return_lse: bool = False):
    """Private (natten.distributed): fused attention that computes only some of the queries.
    key/value span the grid [B, *S, H_kv, *]; query holds its rows [offset, offset + n) along
    spatial axis `axis` ([B, ..., n, ..., H, D]), each query with the window of its coordinate in
    the grid. Equals natten.na{rank}d on the grid with the whole query, sliced to those rows, and
    so do the gradients. Only backends whose query_range_unsupported is None run it."""
    return _fused(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                  additional_keys, additional_values, backend, None, None, None, None, return_lse,
                  (axis, offset))


def _make_fused(rank: int):
    def na(query: Tensor, key: Tensor, value: Tensor, kernel_size, stride=1, dilation=1,
           is_causal=False, scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
           additional_values: Optional[Tensor] = None, backend: Optional[str] = None,
           q_tile_shape=None, kv_tile_shape=None, backward_q_tile_shape=None,
           backward_kv_tile_shape=None, return_lse: bool = False):
        return _fused(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                      additional_keys, additional_values, backend, q_tile_shape, kv_tile_shape,
                      backward_q_tile_shape, backward_kv_tile_shape, return_lse)

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = f"""Fused {rank}-D neighborhood attention.

    query [B, *S, H, D], key [B, *S, H_kv, D], value [B, *S, H_kv, Dv] with len(S) == {rank};
    returns [B, *S, H, Dv] (and the logsumexp [B, *S, H] with return_lse=True). kernel_size,
    stride, dilation and is_causal take one value for all axes or one per axis. Every query
    also attends to additional_keys/values [B, N_extra, H_kv, D/Dv] when given."""
    return na


na1d, na2d, na3d = (_make_fused(r) for r in (1, 2, 3))
fused_na1d, fused_na2d, fused_na3d = na1d, na2d, na3d


def _qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb):
    window = check_qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb)
    return ops.na_qk(query, key, rpb, ops.pack_window(window))


def _av(rank, attn, value, kernel_size, stride, dilation, is_causal):
    window = check_av(rank, attn, value, kernel_size, stride, dilation, is_causal)
    return ops.na_av(attn, value, ops.pack_window(window))


def _make_unfused(rank: int):
    def qk(query: Tensor, key: Tensor, kernel_size, dilation=1, is_causal=False,
           rpb: Optional[Tensor] = None) -> Tensor:
        return _qk(rank, query, key, kernel_size, 1, dilation, is_causal, rpb)

    def av(attn: Tensor, value: Tensor, kernel_size, dilation=1, is_causal=False) -> Tensor:
        return _av(rank, attn, value, kernel_size, 1, dilation, is_causal)

    qk.__name__ = qk.__qualname__ = f"na{rank}d_qk"
    av.__name__ = av.__qualname__ = f"na{rank}d_av"
    qk.__doc__ = f"""Attention weights of {rank}-D neighborhood attention: [B, *S, H, prod(kernel_size)],
    query . key (+ rpb) for each window offset (row-major over offsets), -inf where a causal
    window has no key. No scaling is applied."""
    av.__doc__ = f"""Applies {rank}-D neighborhood attention weights [B, *S, H, prod(kernel_size)] to
    value [B, *S, H_kv, Dv]."""
    return qk, av


(na1d_qk, na1d_av), (na2d_qk, na2d_av), (na3d_qk, na3d_av) = (_make_unfused(r) for r in (1, 2, 3))


def _heads_last(t: Tensor, rank: int) -> Tensor:
    return t.movedim(1, rank + 1)


def _heads_first(t: Tensor, rank: int) -> Tensor:
    return t.movedim(rank + 1, 1)


def _make_legacy(rank: int):
    def qkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size, dilation) -> Tensor:
        attn = _qk(rank, _heads_last(query, rank), _heads_last(key, rank), kernel_size, 1, dilation,
                   False, rpb)
        return _heads_first(attn, rank)

    def qk(query: Tensor, key: Tensor, kernel_size, dilation) -> Tensor:
        return qkrpb(query, key, None, kernel_size, dilation)

    def av(attn: Tensor, value: Tensor, kernel_size, dilation) -> Tensor:
        out = _av(rank, _heads_last(attn, rank), _heads_last(value, rank), kernel_size, 1, dilation,
                  False)
        return _heads_first(out, rank)

    qkrpb.__name__ = qkrpb.__qualname__ = f"natten{rank}dqkrpb"
    qk.__name__ = qk.__qualname__ = f"natten{rank}dqk"
    av.__name__ = av.__qualname__ = f"natten{rank}dav"
    qkrpb.__doc__ = "Original API, heads-first [B, H, *S, D]: attention weights [B, H, *S, prod(k)]."
    qk.__doc__ = f"Original API: natten{rank}dqkrpb without a bias."
    av.__doc__ = "Original API, heads-first: attn [B, H, *S, prod(k)], value [B, H, *S, D]."
    return qkrpb, qk, av


((natten1dqkrpb, natten1dqk, natten1dav), (natten2dqkrpb, natten2dqk, natten2dav),
 (natten3dqkrpb, natten3dqk, natten3dav)) = (_make_legacy(r) for r in (1, 2, 3))


def _unfused_attention(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb,
                       attn_drop: float, training: bool) -> Tensor:
    """softmax(scale q k^T + rpb) v through the unfused ops; what modules use when they need
    the attention weights (relative positional bias, attention dropout)."""
    rpb = None if rpb is None else rpb.to(q.dtype)
    attn = _qk(rank, q * scale, k, kernel_size, stride, dilation, is_causal, rpb)
    attn = torch.nn.functional.dropout(attn.softmax(dim=-1), attn_drop, training)
    return _av(rank, attn, v, kernel_size, stride, dilation, is_causal)
