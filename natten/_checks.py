"""Argument validation for every public entry point (docs/semantics.md, bad input), in one place.

Each check raises before any kernel runs, with a message that names the argument, the value
it got and the rule it broke. The result is a normalised, hashable description of the problem
that the backends and the custom ops consume.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class QueryRange(NamedTuple):
    """The queries of a call that computes only part of them (context parallelism: a rank's own
    rows of its keys' grid, which holds halo rows of its neighbours too): coordinates
    [offset, offset + extent) along spatial axis `axis` of the key grid. Each keeps the window of
    its key-grid coordinate; the query tensor and the results hold only these rows."""

    axis: int
    offset: int
    extent: int


@dataclass(frozen=True)
class Window:
    """Per-axis window parameters of one problem (all tuples have the problem's rank), and the
    query range when the call computes only part of the queries (None: all of them)."""

    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    query_range: Optional[QueryRange] = None

    @property
    def rank(self) -> int:
        return len(self.kernel_size)


@dataclass(frozen=True)
class FusedProblem:
    """Shapes and window of a fused attention call; what backends decide support on."""

    window: Window
    spatial: Tuple[int, ...]
    batch: int
    heads: int
    heads_kv: int
    dim: int
    dim_v: int
    num_extra: int
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @property
    def rank(self) -> int:
        return self.window.rank

    @property
    def query_spatial(self) -> Tuple[int, ...]:
        """Spatial shape of the query tensor and the results (`spatial` is the key grid's)."""
        r = self.window.query_range
        if r is None:
            return self.spatial
        return self.spatial[:r.axis] + (r.extent,) + self.spatial[r.axis + 1:]

    def whole_grid(self) -> "FusedProblem":
        """The same problem with every query of the key grid computed."""
        return replace(self, window=replace(self.window, query_range=None))


def _per_axis(name: str, value, rank: int, kind: type) -> tuple:
    """Broadcasts an int (bool) or checks a sequence of `rank` of them."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {kind.__name__} or a sequence of {rank}, got a tensor")
    if isinstance(value, (list, tuple)):
        values = tuple(value)
    else:
        values = (value,) * rank
    for v in values:
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise TypeError(f"{name} must be {kind.__name__} or a sequence of {kind.__name__}, got {value!r}")
    if len(values) != rank:
        raise ValueError(f"{name}={value!r} must have one entry per spatial axis ({rank})")
    return values


def _positive(name: str, values: tuple) -> None:
    if any(v < 1 for v in values):
        raise ValueError(f"{name}={values} must be positive on every axis")


def check_window(rank: int, spatial: Sequence[int], kernel_size, stride, dilation, is_causal) -> Window:
    kernel_size = _per_axis("kernel_size", kernel_size, rank, int)
    stride = _per_axis("stride", stride, rank, int)
    dilation = _per_axis("dilation", dilation, rank, int)
    is_causal = _per_axis("is_causal", is_causal, rank, bool)
    _positive("kernel_size", kernel_size)
    _positive("stride", stride)
    _positive("dilation", dilation)
    for axis, (L, k, s, d) in enumerate(zip(spatial, kernel_size, stride, dilation)):
        if k * d > L:
            raise ValueError(
                f"kernel_size * dilation must not exceed the input size on every axis: axis {axis} "
                f"has kernel_size={k}, dilation={d}, input size {L}"
            )
        if s > k:
            raise ValueError(f"stride must not exceed kernel_size: axis {axis} has stride={s}, kernel_size={k}")
    return Window(kernel_size, stride, dilation, is_causal)


def _tensor(name: str, t, rank: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float64, float16, bfloat16")
    if t.dim() != rank + 3:
        raise ValueError(
            f"{name} must be of shape [batch, *spatial ({rank} dims), heads, head_dim], got {tuple(t.shape)}"
        )
    if any(s < 1 for s in t.shape):
        raise ValueError(f"{name} has an empty dimension: {tuple(t.shape)}")
    return t


def _same_kind(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _gqa(heads: int, heads_kv: int, name: str) -> None:
    if heads % heads_kv:
        raise ValueError(f"{name} has {heads_kv} heads, which must divide the query's {heads} heads (GQA/MQA)")


def _query_range(query_range, rank: int, query: torch.Tensor, key: torch.Tensor) -> QueryRange:
    """The checked (axis, offset) of a query range, completed with the query's extent."""
    axis, offset = query_range
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < rank:
        raise ValueError(f"query range axis must be an integer in [0, {rank}), got {axis!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"query offset must be a non-negative integer, got {offset!r}")
    extent, length = query.shape[1 + axis], key.shape[1 + axis]
    if offset + extent > length:
        raise ValueError(f"query rows [{offset}, {offset + extent}) along axis {axis} leave the "
                         f"key grid, which has {length} rows there")
    return QueryRange(axis, offset, extent)


def check_fused(rank: int, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                additional_keys, additional_values,
                query_range: Optional[Tuple[int, int]] = None) -> Tuple[FusedProblem, float]:
    """query_range: (axis, offset) when the query tensor holds only rows [offset, offset +
    its extent) of the key grid along that axis (QueryRange); None when it holds the grid."""
    query = _tensor("query", query, rank)
    key = _tensor("key", key, rank)
    value = _tensor("value", value, rank)
    for name, t in (("key", key), ("value", value)):
        _same_kind(name, t, query, "query")
    spatial = tuple(query.shape[1 : rank + 1])
    if query_range is not None:
        query_range = _query_range(query_range, rank, query, key)
        axis = query_range.axis
        spatial = spatial[:axis] + (key.shape[1 + axis],) + spatial[axis + 1:]
    batch, heads, dim = query.shape[0], query.shape[rank + 1], query.shape[rank + 2]
    if tuple(key.shape[: rank + 1]) != (batch, *spatial) or key.shape[-1] != dim:
        raise ValueError(
            f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)} "
            "(batch, spatial and head_dim must agree)"
        )
    if tuple(value.shape[: rank + 2]) != tuple(key.shape[: rank + 2]):
        raise ValueError(
            f"value shape {tuple(value.shape)} does not match key shape {tuple(key.shape)} "
            "(batch, spatial and heads must agree)"
        )
    heads_kv = key.shape[rank + 1]
    _gqa(heads, heads_kv, "key")
    window = check_window(rank, spatial, kernel_size, stride, dilation, is_causal)
    if query_range is not None:
        window = replace(window, query_range=query_range)

    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        for name, t, width in (("additional_keys", additional_keys, dim),
                               ("additional_values", additional_values, value.shape[-1])):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            _same_kind(name, t, query, "query")
            if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != heads_kv or t.shape[3] != width or t.shape[1] < 1:
                raise ValueError(
                    f"{name} must be of shape [batch={batch}, n_extra >= 1, heads_kv={heads_kv}, {width}], "
                    f"got {tuple(t.shape)}"
                )
        if additional_keys.shape[1] != additional_values.shape[1]:
            raise ValueError(
                f"additional_keys has {additional_keys.shape[1]} tokens but additional_values has "
                f"{additional_values.shape[1]}"
            )

    if scale is None:
        scale = dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    requires_grad = any(
        t is not None and t.requires_grad for t in (query, key, value, additional_keys, additional_values)
    )
    return fused_problem(window, query, key, value, additional_keys, requires_grad), float(scale)


def fused_problem(window: Window, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  additional_keys: Optional[torch.Tensor], requires_grad: bool) -> FusedProblem:
    """The problem of tensors that passed check_fused with this window."""
    rank = window.rank
    num_extra = 0 if additional_keys is None else additional_keys.shape[1]
    return FusedProblem(window, tuple(key.shape[1:rank + 1]), query.shape[0],
                        query.shape[rank + 1], key.shape[rank + 1], query.shape[-1],
                        value.shape[-1], num_extra, query.dtype, query.device, requires_grad)


def check_tile(name: str, tile: Optional[IntOrTuple], rank: int) -> Optional[Tuple[int, ...]]:
    if tile is None:
        return None
    values = _per_axis(name, tile, rank, int)
    _positive(name, values)
    return values


def check_qk(rank: int, query, key, kernel_size, stride, dilation, is_causal, rpb) -> Window:
    query = _tensor("query", query, rank)
    key = _tensor("key", key, rank)
    _same_kind("key", key, query, "query")
    if tuple(key.shape[: rank + 1]) != tuple(query.shape[: rank + 1]) or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    _gqa(query.shape[rank + 1], key.shape[rank + 1], "key")
    window = check_window(rank, query.shape[1 : rank + 1], kernel_size, stride, dilation, is_causal)
    if rpb is not None:
        if not isinstance(rpb, torch.Tensor):
            raise TypeError(f"rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
        expected = (query.shape[rank + 1], *(2 * k - 1 for k in window.kernel_size))
        if tuple(rpb.shape) != expected:
            raise ValueError(f"rpb must be of shape {expected} (heads, 2k-1 per axis), got {tuple(rpb.shape)}")
        if rpb.device != query.device:
            raise ValueError(f"rpb is on {rpb.device} but query is on {query.device}")
        if rpb.dtype != query.dtype:
            raise ValueError(f"rpb has dtype {rpb.dtype} but query has {query.dtype}")
    return window


def check_av(rank: int, attn, value, kernel_size, stride, dilation, is_causal) -> Window:
    value = _tensor("value", value, rank)
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    _same_kind("attn", attn, value, "value")
    window = check_window(rank, value.shape[1 : rank + 1], kernel_size, stride, dilation, is_causal)
    window_size = 1
    for k in window.kernel_size:
        window_size *= k
    if attn.dim() != rank + 3 or tuple(attn.shape[: rank + 1]) != tuple(value.shape[: rank + 1]) \
            or attn.shape[-1] != window_size:
        raise ValueError(
            f"attn must be of shape [batch, *spatial, heads, {window_size}] matching value "
            f"{tuple(value.shape)}, got {tuple(attn.shape)}"
        )
    _gqa(attn.shape[rank + 1], value.shape[rank + 1], "value")
    return window
