"""FLOP counts of natten.flops against a brute-force count of docs/semantics.md.

The oracle here builds the dense visibility mask of a problem directly from the rules of
docs/semantics.md (written out again below, independently of the library) and counts the
multiply-adds a dense masked attention would need on the visible pairs only.
"""

import itertools
import math

import pytest
import torch

pytest.importorskip("natten._C")

import natten  # noqa: E402
from natten import flops as nflops  # noqa: E402


# ----------------------------------------------------------------------------------------
# Oracle: docs/semantics.md, one axis at a time
# ----------------------------------------------------------------------------------------


def axis_sees(L, k, s, d, c, x, y):
    """Does query x see key y along one axis (docs/semantics.md, steps 1-4)?"""
    if x % d != y % d:
        return False
    xi, yi = x // d, y // d
    Lg = L // d + (1 if (x % d) < (L % d) else 0)
    if c:
        lead = min((xi // s) * s + s - 1, Lg - 1)
        return yi <= xi and lead - yi < k
    left = k // 2
    right = k // 2 if k % 2 == 1 else k // 2 - 1
    lead = min((xi // s) * s + (s // 2), Lg - 1)
    centre = min(max(lead, left), Lg - 1 - right)
    return centre - left <= yi <= centre + right


def dense_mask(shape, kernel, stride, dilation, causal):
    """[N, N] boolean mask over row-major flattened tokens."""
    coords = list(itertools.product(*[range(L) for L in shape]))
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, x in enumerate(coords):
        for j, y in enumerate(coords):
            mask[i, j] = all(
                axis_sees(L, k, s, d, c, xa, ya)
                for L, k, s, d, c, xa, ya in zip(shape, kernel, stride, dilation, causal, x, y)
            )
    return mask


def brute_pairs(shape, kernel, stride, dilation, causal):
    return int(dense_mask(shape, kernel, stride, dilation, causal).sum())


# (shape, kernel, stride, dilation, causal)
CASES = [
    ((13,), (5,), (1,), (1,), (False,)),
    ((13,), (4,), (1,), (1,), (False,)),  # even window
    ((13,), (5,), (3,), (1,), (False,)),  # stride
    ((13,), (5,), (1,), (2,), (False,)),  # dilation, non-divisible extent
    ((13,), (5,), (2,), (2,), (True,)),  # causal + stride + dilation
    ((12,), (12,), (1,), (1,), (True,)),  # causal, full window
    ((7, 9), (3, 4), (1, 2), (2, 1), (False, True)),
    ((8, 8), (8, 3), (8, 1), (1, 2), (True, False)),  # blocked axis
    ((4, 5, 6), (3, 3, 2), (1, 3, 2), (1, 1, 3), (True, False, True)),
    ((5, 4, 7), (5, 2, 3), (2, 1, 1), (1, 2, 2), (False, False, False)),
]


def case_id(case):
    shape, k, s, d, c = case
    return f"L{shape}-k{k}-s{s}-d{d}-c{tuple(int(x) for x in c)}".replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_visible_pairs_match_dense_mask(case):
    shape, k, s, d, c = case
    assert nflops.visible_pairs(shape, k, s, d, c) == brute_pairs(shape, k, s, d, c)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_plain_counts(case):
    shape, k, s, d, c = case
    B, H, D, Dv, E = 2, 3, 8, 12, 5
    pairs = brute_pairs(shape, k, s, d, c)
    n = math.prod(shape)
    assert nflops.fna_flops(B, H, shape, D, k, s, d, c, head_dim_v=Dv) == B * H * pairs * (D + Dv)
    assert nflops.fna_flops(B, H, shape, D, k, s, d, c, head_dim_v=Dv, num_extra_kv=E) == (
        B * H * pairs * (D + Dv) + B * H * n * E * (D + Dv)
    )
    assert nflops.na_qk_flops(B, H, shape, D, k, s, d, c) == B * H * pairs * D
    assert nflops.na_av_flops(B, H, shape, Dv, k, s, d, c) == B * H * pairs * Dv


def test_scalar_arguments_broadcast():
    assert nflops.visible_pairs((9, 11), 3) == nflops.visible_pairs((9, 11), (3, 3), (1, 1), (1, 1), (False, False))
    with pytest.raises(ValueError, match="kernel_size"):
        nflops.visible_pairs((9, 11), (3, 3, 3))


# ----------------------------------------------------------------------------------------
# fvcore handles
# ----------------------------------------------------------------------------------------

fvcore_nn = pytest.importorskip("fvcore.nn")


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


class FusedNA(torch.nn.Module):
    def __init__(self, rank, **kwargs):
        super().__init__()
        self.fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[rank]
        self.kwargs = kwargs

    def forward(self, q, k, v, *extra):
        if extra:
            return self.fn(q, k, v, additional_keys=extra[0], additional_values=extra[1], **self.kwargs)
        return self.fn(q, k, v, **self.kwargs)


def _op_counts(model, inputs):
    counter = nflops.add_natten_handle(fvcore_nn.FlopCountAnalysis(model, inputs))
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return counter.by_operator(), counter.total()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("extra", [0, 3])
def test_fused_handle(case, extra):
    shape, k, s, d, c = case
    B, H, Hkv, D, Dv = 2, 4, 2, 8, 16
    q = _rand(B, *shape, H, D)
    kk = _rand(B, *shape, Hkv, D)
    v = _rand(B, *shape, Hkv, Dv)
    inputs = (q, kk, v)
    if extra:
        inputs += (_rand(B, extra, Hkv, D), _rand(B, extra, Hkv, Dv))
    model = FusedNA(len(shape), kernel_size=k, stride=s, dilation=d, is_causal=c)
    by_op, total = _op_counts(model, inputs)
    pairs = brute_pairs(shape, k, s, d, c)
    n = math.prod(shape)
    expected = B * H * (pairs + n * extra) * (D + Dv)
    assert total == expected
    assert sum(v for name, v in by_op.items() if "fna_forward" in name) == expected


class UnfusedNA(torch.nn.Module):
    def __init__(self, rank, kernel_size, dilation, is_causal):
        super().__init__()
        self.qk = getattr(natten.functional, f"na{rank}d_qk")
        self.av = getattr(natten.functional, f"na{rank}d_av")
        self.kwargs = dict(kernel_size=kernel_size, dilation=dilation, is_causal=is_causal)

    def forward(self, q, k, v):
        attn = self.qk(q, k, **self.kwargs).softmax(dim=-1)
        return self.av(attn, v, **self.kwargs)


UNFUSED_CASES = [case for case in CASES if all(s == 1 for s in case[2])]


@pytest.mark.parametrize("case", UNFUSED_CASES, ids=case_id)
def test_unfused_handles(case):
    shape, k, _, d, c = case
    B, H, D = 2, 3, 8
    q, kk, v = _rand(B, *shape, H, D), _rand(B, *shape, H, D), _rand(B, *shape, H, D)
    by_op, total = _op_counts(UnfusedNA(len(shape), k, d, c), (q, kk, v))
    pairs = brute_pairs(shape, k, (1,) * len(shape), d, c)
    qk = sum(v for name, v in by_op.items() if "na_qk" in name)
    av = sum(v for name, v in by_op.items() if "na_av" in name)
    assert qk == B * H * pairs * D
    assert av == B * H * pairs * D
    assert total == qk + av


@pytest.mark.parametrize(
    "kernel_size,dilation,stride,is_causal",
    [(7, 1, 1, False), (5, 2, 1, False), (4, 1, 2, (True, False))],
)
def test_get_flops_module(kernel_size, dilation, stride, is_causal):
    B, Hgt, W, dim, heads = 2, 14, 11, 48, 4
    torch.manual_seed(0)
    model = natten.NeighborhoodAttention2D(
        dim=dim, num_heads=heads, kernel_size=kernel_size, dilation=dilation, stride=stride,
        is_causal=is_causal,
    ).eval()
    x = _rand(B, Hgt, W, dim)
    n = Hgt * W
    linear = B * n * dim * (3 * dim) + B * n * dim * dim  # qkv + proj
    k2 = (kernel_size,) * 2
    causal = is_causal if isinstance(is_causal, tuple) else (is_causal,) * 2
    pairs = brute_pairs((Hgt, W), k2, (stride,) * 2, (dilation,) * 2, causal)
    head_dim = dim // heads
    na = B * heads * pairs * 2 * head_dim
    assert nflops.get_flops(model, x) == linear + na
