"""Exact FLOP counts of neighborhood attention.

Counts follow fvcore's convention: one multiply-add is one flop, and the softmax is not
counted (fvcore does not count it for dense attention either). Counts are exact: they
use the number of (query, key) pairs that docs/semantics.md makes visible, so causal masks,
stride and dilation are all accounted for. The window arithmetic itself lives in the
extension (``natten._C.axis_visible_pairs``); nothing here re-derives it.

For a problem with batch ``B``, ``H`` query heads, ``N`` query tokens, head dims ``D``
(query/key) and ``Dv`` (value), ``E`` additional key/value tokens, and ``P`` visible pairs
per (batch, head):

* fused attention (``natten::fna_forward``): ``B*H*P*(D + Dv) + B*H*N*E*(D + Dv)``
* ``natten::na_qk`` (attention weights): ``B*H*P*D``
* ``natten::na_av`` (weighted values): ``B*H*P*Dv``

Plain functions (:func:`visible_pairs`, :func:`fna_flops`, :func:`na_qk_flops`,
:func:`na_av_flops`) serve the profiler and benchmarks; :func:`add_natten_handle` and
:func:`get_flops` plug the same counts into fvcore's ``FlopCountAnalysis``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

IntOrSeq = Union[int, Sequence[int]]
BoolOrSeq = Union[bool, Sequence[bool]]

# Op names as they appear in a torch.jit trace.
FNA_FORWARD_OP = "natten::fna_forward"
NA_QK_OP = "natten::na_qk"
NA_AV_OP = "natten::na_av"


# ----------------------------------------------------------------------------------------
# Plain counts
# ----------------------------------------------------------------------------------------


def _per_axis(name: str, value: Any, rank: int, kind: type) -> tuple:
    """Broadcast an int/bool (or a sequence of them) to one value per axis."""
    if isinstance(value, (list, tuple)):
        values = tuple(value)
        if len(values) != rank:
            raise ValueError(
                f"{name}={list(values)} has {len(values)} entries, but the problem has "
                f"rank {rank}; give one value per axis or a single value."
            )
    else:
        values = (value,) * rank
    return tuple(kind(v) for v in values)


def _axis_visible_pairs(extent: int, kernel: int, stride: int, dilation: int, causal: bool) -> int:
    try:
        from natten import _C
    except ImportError as e:  # pragma: no cover - only without a built extension
        raise ImportError(
            "natten.flops needs the compiled extension natten._C for exact window counts; "
            "build natten first."
        ) from e
    return int(_C.axis_visible_pairs(int(extent), int(kernel), int(stride), int(dilation), bool(causal)))


def visible_pairs(
    spatial_shape: Sequence[int],
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    dilation: IntOrSeq = 1,
    is_causal: BoolOrSeq = False,
) -> int:
    """Number of visible (query, key) pairs of one (batch, head) over the whole grid.

    Visibility is a product over axes (docs/semantics.md), so this is the product of the
    per-axis counts of ``natten._C.axis_visible_pairs``.

    Args:
        spatial_shape: token grid ``(L_1, ..., L_r)``, ``r`` in {1, 2, 3}.
        kernel_size, stride, dilation: an int for every axis, or one per axis.
        is_causal: a bool for every axis, or one per axis.
    """
    shape = tuple(int(x) for x in spatial_shape)
    rank = len(shape)
    if rank not in (1, 2, 3):
        raise ValueError(f"spatial_shape={list(shape)} must have 1, 2 or 3 axes.")
    ks = _per_axis("kernel_size", kernel_size, rank, int)
    ss = _per_axis("stride", stride, rank, int)
    ds = _per_axis("dilation", dilation, rank, int)
    cs = _per_axis("is_causal", is_causal, rank, bool)
    total = 1
    for L, k, s, d, c in zip(shape, ks, ss, ds, cs):
        total *= _axis_visible_pairs(L, k, s, d, c)
    return total


def fna_flops(
    batch: int,
    heads: int,
    spatial_shape: Sequence[int],
    head_dim: int,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    dilation: IntOrSeq = 1,
    is_causal: BoolOrSeq = False,
    head_dim_v: Optional[int] = None,
    num_extra_kv: int = 0,
) -> int:
    """FLOPs (multiply-adds) of one fused neighborhood attention forward pass.

    ``B*H*P*(D + Dv) + B*H*N*E*(D + Dv)`` with ``P`` from :func:`visible_pairs`, ``N`` the
    number of query tokens and ``E = num_extra_kv`` additional key/value tokens. ``heads``
    counts query heads (GQA/MQA do not change the arithmetic). ``head_dim_v`` defaults to
    ``head_dim``.
    """
    dv = head_dim if head_dim_v is None else head_dim_v
    pairs = visible_pairs(spatial_shape, kernel_size, stride, dilation, is_causal)
    n = math.prod(int(x) for x in spatial_shape)
    per_bh = pairs * (head_dim + dv) + n * int(num_extra_kv) * (head_dim + dv)
    return int(batch) * int(heads) * per_bh


def na_qk_flops(
    batch: int,
    heads: int,
    spatial_shape: Sequence[int],
    head_dim: int,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    dilation: IntOrSeq = 1,
    is_causal: BoolOrSeq = False,
) -> int:
    """FLOPs of the unfused attention-weight op ``na{r}d_qk``: ``B*H*P*D``."""
    pairs = visible_pairs(spatial_shape, kernel_size, stride, dilation, is_causal)
    return int(batch) * int(heads) * pairs * int(head_dim)


def na_av_flops(
    batch: int,
    heads: int,
    spatial_shape: Sequence[int],
    head_dim_v: int,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    dilation: IntOrSeq = 1,
    is_causal: BoolOrSeq = False,
) -> int:
    """FLOPs of the unfused weighted-value op ``na{r}d_av``: ``B*H*P*Dv``."""
    pairs = visible_pairs(spatial_shape, kernel_size, stride, dilation, is_causal)
    return int(batch) * int(heads) * pairs * int(head_dim_v)


# ----------------------------------------------------------------------------------------
# fvcore handles
# ----------------------------------------------------------------------------------------


def _import_fvcore():
    try:
        import fvcore.nn  # noqa: F401
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import get_shape
    except ImportError as e:
        raise ImportError(
            "natten.flops needs fvcore to count FLOPs of models; install it with "
            "`pip install fvcore`."
        ) from e
    return FlopCountAnalysis, get_shape


def _constant(val: Any) -> Any:
    """Python value of a constant jit value; lists built by prim::ListConstruct included."""
    ivalue = val.toIValue()
    if ivalue is not None:
        return ivalue
    node = val.node()
    if node.kind() == "prim::ListConstruct":
        items = [_constant(v) for v in node.inputs()]
        if all(item is not None for item in items):
            return items
    if node.kind() == "prim::Constant" and val.type().kind() == "NoneType":
        return None
    raise ValueError(
        f"natten.flops: cannot read the constant argument produced by `{node.kind()}`; "
        "kernel_size, stride, dilation and is_causal must be constants in the trace."
    )


def _shape(val: Any) -> Optional[list]:
    _, get_shape = _import_fvcore()
    if val.type().kind() == "NoneType":
        return None
    return get_shape(val)


def _require_shape(val: Any, what: str, op: str) -> list:
    shape = _shape(val)
    if shape is None:
        raise ValueError(f"natten.flops: the trace of {op} has no complete shape for {what}.")
    return list(shape)


def _window(val: Any) -> list:
    """(kernel_size, stride, dilation, is_causal) of an op's window argument, which holds the
    four per-axis lists one after another."""
    window = _constant(val)
    rank = len(window) // 4
    return [window[i * rank:(i + 1) * rank] for i in range(4)]


def _fna_forward_flop_jit(inputs: list, outputs: list) -> int:
    # (query, key, value, additional_keys, additional_values, window, scale, backend, tile shapes)
    q = _require_shape(inputs[0], "query", FNA_FORWARD_OP)
    v = _require_shape(inputs[2], "value", FNA_FORWARD_OP)
    extra_k = _shape(inputs[3])
    kernel_size, stride, dilation, is_causal = _window(inputs[5])
    batch, spatial, heads, head_dim = q[0], q[1:-2], q[-2], q[-1]
    return fna_flops(
        batch,
        heads,
        spatial,
        head_dim,
        kernel_size,
        stride,
        dilation,
        is_causal,
        head_dim_v=v[-1],
        num_extra_kv=0 if extra_k is None else extra_k[1],
    )


def _na_qk_flop_jit(inputs: list, outputs: list) -> int:
    # (query, key, rpb, window)
    q = _require_shape(inputs[0], "query", NA_QK_OP)
    kernel_size, stride, dilation, is_causal = _window(inputs[3])
    return na_qk_flops(q[0], q[-2], q[1:-2], q[-1], kernel_size, stride, dilation, is_causal)


def _na_av_flop_jit(inputs: list, outputs: list) -> int:
    # (attn, value, window)
    attn = _require_shape(inputs[0], "attn", NA_AV_OP)
    v = _require_shape(inputs[1], "value", NA_AV_OP)
    kernel_size, stride, dilation, is_causal = _window(inputs[2])
    return na_av_flops(attn[0], attn[-2], attn[1:-2], v[-1], kernel_size, stride, dilation, is_causal)


HANDLES = {
    FNA_FORWARD_OP: _fna_forward_flop_jit,
    NA_QK_OP: _na_qk_flop_jit,
    NA_AV_OP: _na_av_flop_jit,
}


def add_natten_handle(counter):
    """Register natten's FLOP handles on an fvcore ``FlopCountAnalysis``; returns it."""
    _import_fvcore()
    import natten  # noqa: F401  (registers the ops)

    return counter.set_op_handle(**HANDLES)


def get_flops(model, input, disable_warnings: bool = True) -> int:
    """Total FLOPs (fvcore convention) of ``model(*input)``.

    ``input`` is a tensor or a tuple of tensors, as ``FlopCountAnalysis`` takes it.
    natten's ops are counted by the handles above; fvcore's own handles count the rest
    (linear layers, matmuls, ...).
    """
    FlopCountAnalysis, _ = _import_fvcore()
    counter = add_natten_handle(FlopCountAnalysis(model, input))
    if disable_warnings:
        counter = counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counter = counter.tracer_warnings("none")
    return int(counter.total())


__all__ = [
    "visible_pairs",
    "fna_flops",
    "na_qk_flops",
    "na_av_flops",
    "add_natten_handle",
    "get_flops",
]
