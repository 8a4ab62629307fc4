"""Shared checks for the fused ops (natten.na1d/2d/3d), run per backend by
test_cpu_fused.py and test_cuda_fused.py.

Every check compares the library against the float64 oracle (tests/oracle.py), never
against the library itself."""

import re
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import pytest
import torch

from conftest import assert_close, tolerance
from oracle import as_tuple, reference_na

IntOrTuple = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class Case:
    shape: Tuple[int, ...]
    kernel: IntOrTuple
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    causal: Union[bool, Tuple[bool, ...]] = False
    B: int = 1
    H: int = 2
    Hkv: Optional[int] = None  # None: same as H
    D: int = 16
    Dv: Optional[int] = None  # None: same as D
    extra: int = 0  # number of additional KV tokens
    scale: Optional[float] = None
    noncontig: bool = False
    broadcast_args: bool = False  # pass ints instead of tuples where possible
    tags: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def rank(self):
        return len(self.shape)

    def id(self):
        parts = [
            "x".join(map(str, self.shape)),
            "k" + _fmt(self.kernel),
        ]
        if self.stride != 1:
            parts.append("s" + _fmt(self.stride))
        if self.dilation != 1:
            parts.append("d" + _fmt(self.dilation))
        if self.causal:
            parts.append("c" + _fmt(self.causal))
        parts.append(f"B{self.B}H{self.H}")
        if self.Hkv:
            parts.append(f"kv{self.Hkv}")
        parts.append(f"D{self.D}")
        if self.Dv:
            parts.append(f"Dv{self.Dv}")
        if self.extra:
            parts.append(f"x{self.extra}")
        if self.scale is not None:
            parts.append("sc")
        if self.noncontig:
            parts.append("nc")
        return "-".join(parts)


def _fmt(v):
    if isinstance(v, (tuple, list)):
        return ",".join(str(int(x)) for x in v)
    return str(int(v))


def op_for_rank(rank, fused_alias=False):
    import natten

    if fused_alias:
        return {1: natten.fused_na1d, 2: natten.fused_na2d, 3: natten.fused_na3d}[rank]
    return {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]


def _noncontig(t, kind):
    """Returns a non-contiguous view holding the same values as `t` (a fresh tensor)."""
    if kind == 0:
        # stored heads-first, viewed heads-last
        store = t.movedim(-2, 1).contiguous()
        view = store.movedim(1, -2)
    elif kind == 1:
        # every other element of a wider last dim
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide.normal_()
        wide[..., ::2] = t
        view = wide[..., ::2]
    else:
        # every other batch entry of a larger batch
        big = torch.empty(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        big.normal_()
        big[::2] = t
        view = big[::2]
    if view.is_contiguous():  # size-1 dims can make a strided view count as contiguous
        return _noncontig(t, 1)
    assert torch.equal(view, t)
    return view


def make_inputs(case, dtype, device, requires_grad=True):
    H = case.H
    Hkv = case.Hkv or H
    D = case.D
    Dv = case.Dv or D
    shp = (case.B, *case.shape)

    def rnd(*s):
        return torch.randn(*s, dtype=torch.float64).to(device=device, dtype=dtype)

    q = rnd(*shp, H, D)
    k = rnd(*shp, Hkv, D)
    v = rnd(*shp, Hkv, Dv)
    ak = av = None
    if case.extra:
        ak = rnd(case.B, case.extra, Hkv, D)
        av = rnd(case.B, case.extra, Hkv, Dv)
    if case.noncontig:
        q = _noncontig(q, 0)
        k = _noncontig(k, 1)
        v = _noncontig(v, 2 if case.B > 1 else 0)
        if ak is not None:
            ak = _noncontig(ak, 1)
            av = _noncontig(av, 0)
    tensors = [q, k, v, ak, av]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


def call_args(case):
    r = case.rank
    if case.broadcast_args:
        return dict(
            kernel_size=case.kernel,
            stride=case.stride,
            dilation=case.dilation,
            is_causal=case.causal,
        )
    return dict(
        kernel_size=as_tuple(case.kernel, r),
        stride=as_tuple(case.stride, r),
        dilation=as_tuple(case.dilation, r),
        is_causal=tuple(bool(c) for c in as_tuple(case.causal, r)),
    )


def lse_dtype_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def maybe_skip_unsupported(device, backend, dtype, fn):
    """GPU backends may decline dtypes/head dims (docs/semantics.md, bad input, says explicitly
    requested backends raise ValueError naming the reason). CPU never declines."""
    if device != "cpu" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    try:
        return fn()
    except ValueError as e:
        if device != "cpu" and re.search(r"support", str(e), re.I):
            pytest.skip(f"{backend} declines: {e}")
        raise


def check_fused(case, dtype, device, backend, grad=True, fused_alias=False, extra_kwargs=None, tol=None):
    op = op_for_rank(case.rank, fused_alias)
    q, k, v, ak, av = make_inputs(case, dtype, device, requires_grad=grad)
    originals = [t.detach().clone() if t is not None else None for t in (q, k, v, ak, av)]
    kwargs = call_args(case)
    if case.scale is not None:
        kwargs["scale"] = case.scale
    if case.extra:
        kwargs["additional_keys"] = ak
        kwargs["additional_values"] = av
    if extra_kwargs:
        kwargs.update(extra_kwargs)
    tol = tol if tol is not None else tolerance(dtype, device, backend)

    res = maybe_skip_unsupported(
        device, backend, dtype, lambda: op(q, k, v, backend=backend, return_lse=True, **kwargs)
    )
    assert isinstance(res, (tuple, list)) and len(res) == 2, "return_lse=True must return (output, lse)"
    out, lse = res

    # reference on the rounded inputs, float64
    leaves = [t.detach().to("cpu", torch.float64).requires_grad_(grad) if t is not None else None for t in (q, k, v, ak, av)]
    r = case.rank
    ref_out, ref_lse = reference_na(
        leaves[0],
        leaves[1],
        leaves[2],
        as_tuple(case.kernel, r),
        as_tuple(case.stride, r),
        as_tuple(case.dilation, r),
        tuple(bool(c) for c in as_tuple(case.causal, r)),
        scale=case.scale,
        additional_keys=leaves[3],
        additional_values=leaves[4],
    )

    Dv = case.Dv or case.D
    assert out.shape == (case.B, *case.shape, case.H, Dv), f"output shape {tuple(out.shape)}"
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert out.device.type == torch.device(device).type
    assert lse.shape == (case.B, *case.shape, case.H), f"lse shape {tuple(lse.shape)}"
    assert lse.dtype == lse_dtype_for(dtype), f"lse dtype {lse.dtype}, expected {lse_dtype_for(dtype)}"
    assert_close(out, ref_out, tol, "output")
    assert_close(lse, ref_lse, tol, "lse")

    # inputs must be left untouched
    for name, t, o in zip(("q", "k", "v", "additional_keys", "additional_values"), (q, k, v, ak, av), originals):
        if t is not None:
            assert torch.equal(t.detach(), o), f"{name} was modified by the forward pass"

    if not grad:
        return
    dout = torch.randn(out.shape, dtype=torch.float64)
    out.backward(dout.to(device=device, dtype=dtype))
    ref_out.backward(dout.to(dtype).to(torch.float64))
    names = ("query", "key", "value", "additional_keys", "additional_values")
    for name, t, leaf in zip(names, (q, k, v, ak, av), leaves):
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.shape == t.shape, f"grad {name} shape {tuple(t.grad.shape)} != {tuple(t.shape)}"
        assert t.grad.dtype == t.dtype, f"grad {name} dtype {t.grad.dtype}"
        assert_close(t.grad, leaf.grad, tol, f"grad {name}")


# ---------------------------------------------------------------------------
# Case lists
# ---------------------------------------------------------------------------

GEOMETRY_CASES = [
    # 1D
    Case((16,), 5, B=2),
    Case((15,), 4, stride=2, dilation=2, D=8),  # even window, non-divisible extent
    Case((12,), 12, D=32),  # kernel == extent
    Case((17,), 6, stride=6, H=4, Hkv=2),  # s == k, non-divisible, GQA
    Case((13,), 3, stride=2, dilation=3, causal=True, B=2),
    Case((10,), 1, D=8),
    Case((14,), 7, stride=3, causal=True, extra=3, Dv=8),
    Case((20,), 4, dilation=5, H=3, Hkv=1),  # k*d == L, MQA
    Case((1,), 1, B=2),  # smallest grid
    Case((7,), 2, stride=2, dilation=3, causal=True, extra=1),  # groups of lengths 3, 2, 2
    # 2D
    Case((9, 10), (3, 4), stride=(1, 2), dilation=(2, 1), causal=(True, False), B=2),
    Case((8, 8), 4, stride=4, broadcast_args=True),  # blocked
    Case((7, 9), (7, 3), D=8, Dv=16),  # kernel == extent on one axis
    Case((6, 11), (5, 5), dilation=(1, 2), causal=(False, True), H=4, Hkv=2, extra=4),
    Case((5, 7), (2, 3), stride=(2, 3), causal=True, scale=0.3),
    Case((1, 6), (1, 3), causal=(True, True), H=2, Hkv=1),  # extent-1 axis
    Case((8, 6), (4, 2), dilation=(2, 3), stride=(3, 1), H=4, Hkv=1, B=2, noncontig=True),
    # 3D
    Case((4, 5, 6), (3, 2, 3), stride=(1, 2, 3)),
    Case((5, 4, 7), 2, dilation=(2, 1, 3), causal=(True, False, True), H=2, Hkv=1, broadcast_args=True),
    Case((3, 4, 5), (3, 4, 5), causal=(True, True, True), D=8),  # kernel == extent, causal
    Case((4, 6, 5), (2, 3, 4), stride=(2, 3, 2), dilation=(2, 1, 1), extra=2, Dv=8, B=2, noncontig=True),
]

# feature-focused cases (one rank each is enough to exercise the wiring; geometry
# above covers the window arithmetic)
FEATURE_CASES = [
    Case((11,), 3, H=4, Hkv=2, extra=5, D=8, Dv=32, scale=1.7, B=2, noncontig=True),
    Case((6, 7), (3, 3), H=4, Hkv=4, extra=1, D=32, Dv=8, noncontig=True),
    Case((6, 7), (4, 2), H=2, Hkv=1, D=16, Dv=16, B=3, extra=6, causal=(False, True)),
    Case((4, 3, 5), (2, 3, 3), H=4, Hkv=2, extra=3, D=8, scale=0.5, noncontig=True, B=2),
]

DTYPE_CASES = [
    Case((13,), 5, stride=2, dilation=2, B=2, H=4, Hkv=2, D=32, extra=3),
    Case((7, 8), (3, 4), stride=(1, 2), causal=(True, False), D=16, Dv=8, extra=2, noncontig=True),
    Case((4, 5, 6), (3, 2, 3), dilation=(1, 2, 1), causal=(False, False, True), D=16, B=2),
]

LONG_CASES = [
    Case((33,), 9, stride=4, dilation=3, B=2, H=4, Hkv=2, D=32, extra=7),
    Case((31,), 16, stride=16, causal=True, D=64),
    Case((17, 19), (7, 8), stride=(3, 8), dilation=(2, 2), causal=(True, False), D=32, extra=5),
    Case((12, 13), (12, 13), causal=(False, True)),
    Case((9, 10, 11), (3, 4, 5), stride=(3, 2, 5), dilation=(3, 2, 2), causal=(False, True, True), H=4, Hkv=1, extra=3),
    Case((8, 8, 8), 4, stride=4, D=64, B=2),
]

TILE_SHAPES = {
    1: [(1,), (3,), (7,), (64,)],
    2: [(1, 1), (2, 3), (5, 4), (16, 16)],
    3: [(1, 2, 3), (2, 2, 2), (4, 8, 1), (8, 8, 8)],
}

TILE_CASES = {
    1: Case((19,), 6, stride=2, dilation=2, extra=2, H=2, Hkv=1),
    2: Case((9, 7), (4, 3), stride=(2, 1), causal=(False, True), dilation=(2, 1)),
    3: Case((5, 6, 7), (3, 2, 4), stride=(1, 2, 2), causal=(True, False, False)),
}


def tile_combos(rank):
    shapes = TILE_SHAPES[rank]
    return [(q, kv) for i, q in enumerate(shapes) for j, kv in enumerate(shapes) if (i + j) % 2 == 0 or i == j]


def dtype_id(dt):
    return str(dt).replace("torch.", "")
