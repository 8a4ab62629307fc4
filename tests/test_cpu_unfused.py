"""Unfused ops (natten.functional.na{1,2,3}d_qk / na{1,2,3}d_av) and the original API
(natten{1,2,3}dqkrpb / natten{1,2,3}dav, heads-first) vs the window-offset oracle,
forward and backward."""

import math

import pytest
import torch

from conftest import assert_close, assert_close_masked, tolerance
from oracle import as_tuple, reference_av, reference_na, reference_qk

UNFUSED_CASES = [
    # shape, kernel, dilation, causal, rpb
    ((13,), 5, 1, False, True),
    ((14,), 4, 3, False, False),  # even window, dilation, non-divisible
    ((11,), 3, 2, True, False),
    ((9,), 9, 1, False, True),  # kernel == extent
    ((7, 9), (3, 4), (2, 1), (False, False), True),
    ((8, 6), (4, 3), (1, 2), (True, False), False),
    ((6, 6), 6, 1, False, True),  # kernel == extent
    ((5, 7), (2, 5), 1, (False, True), True),
    ((4, 5, 6), (3, 2, 3), (1, 2, 2), False, True),
    ((5, 4, 6), 2, (2, 1, 3), (True, False, True), False),
    ((3, 4, 5), (3, 3, 2), 1, (False, True, False), True),
]


def _ids(c):
    shape, k, d, cz, rpb = c
    return "x".join(map(str, shape)) + f"-k{k}-d{d}-c{cz}-{'rpb' if rpb else 'norpb'}".replace(" ", "")


F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


def _dtype_params(half_subset):
    ps = []
    for i, c in enumerate(UNFUSED_CASES):
        dts = [F32] + ([F64] if i % 2 == 0 else []) + ([F16, BF16] if i in half_subset else [])
        for dt in dts:
            ps.append(pytest.param(c, dt, id=f"{_ids(c)}-{str(dt)[6:]}"))
    return ps


def _fn(name, rank):
    import natten.functional as F

    return getattr(F, f"na{rank}d_{name}")


def _rpb_shape(H, kernel, rank):
    return (H, *[2 * k - 1 for k in as_tuple(kernel, rank)])


def _case_on(device, case, dtype):
    """A case's fields and rank, skipping float64 off the CPU (it is CPU-only)."""
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 is CPU-only")
    return (*case, len(case[0]))


@pytest.mark.parametrize("case,dtype", _dtype_params((1, 4, 9)))
def test_qk(device, case, dtype):
    shape, kernel, dil, causal, use_rpb, r = _case_on(device, case, dtype)
    B, H, D = 2, 3, 16
    q = torch.randn(B, *shape, H, D, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    k = torch.randn(B, *shape, H, D, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    rpb = None
    if use_rpb:
        rpb = torch.randn(_rpb_shape(H, kernel, r), dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    attn = _fn("qk", r)(q, k, kernel, dilation=dil, is_causal=causal, rpb=rpb)
    K = math.prod(as_tuple(kernel, r))
    assert attn.shape == (B, *shape, H, K)
    assert attn.dtype == dtype
    leaves = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (q, k, rpb)]
    ref = reference_qk(leaves[0], leaves[1], kernel, dil, causal, rpb=leaves[2])
    tol = tolerance(dtype, device)
    assert_close_masked(attn, ref, tol, "qk")

    # backward: gradient only through visible entries
    g = torch.randn(attn.shape, dtype=torch.float64)
    attn.backward(g.to(device=device, dtype=dtype))
    ref.backward(g.to(dtype).double())
    for name, t, leaf in zip(("query", "key", "rpb"), (q, k, rpb), leaves):
        if t is None:
            continue
        assert t.grad is not None, f"no grad for {name}"
        assert_close(t.grad, leaf.grad, tol, f"grad {name}")


def test_rpb_gradient_repeats_bit_for_bit(device):
    """The bias gradient sums over batch and tokens (on the GPU over many slices of the rows):
    in a fixed order, so that a second backward gives the same bits, with or without
    torch.use_deterministic_algorithms."""
    B, H, D, shape, kernel, dil = 3, 2, 16, (40, 37), (7, 5), (2, 1)
    torch.manual_seed(0)
    q, k = (torch.randn(B, *shape, H, D, device=device) for _ in range(2))
    rpb = torch.randn(H, 13, 9, device=device, requires_grad=True)
    g = torch.randn(B, *shape, H, 35, device=device)

    def grad():
        attn = _fn("qk", 2)(q, k, kernel, dilation=dil, rpb=rpb)
        return torch.autograd.grad(attn, rpb, g)[0]

    first = grad()
    assert torch.equal(first, grad())
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, rpb)]
    ref = reference_qk(leaves[0], leaves[1], kernel, dil, False, rpb=leaves[2])
    ref.backward(g.cpu().double())
    assert_close(first, leaves[2].grad, tolerance(torch.float32, device), "grad rpb")


@pytest.mark.parametrize("case,dtype", _dtype_params((2, 5, 8)))
def test_av(device, case, dtype):
    shape, kernel, dil, causal, _, r = _case_on(device, case, dtype)
    B, H, Dv = 2, 2, 24
    K = math.prod(as_tuple(kernel, r))
    # softmax-like weights at visible offsets, large garbage at invisible ones (must be ignored)
    a = torch.rand(B, *shape, H, K, dtype=torch.float64)
    v = torch.randn(B, *shape, H, Dv, dtype=torch.float64)
    a = a.to(device=device, dtype=dtype).requires_grad_()
    v = v.to(device=device, dtype=dtype).requires_grad_()
    out = _fn("av", r)(a, v, kernel, dilation=dil, is_causal=causal)
    assert out.shape == (B, *shape, H, Dv)
    assert out.dtype == dtype
    la = a.detach().cpu().double().requires_grad_()
    lv = v.detach().cpu().double().requires_grad_()
    ref = reference_av(la, lv, kernel, dil, causal)
    tol = tolerance(dtype, device)
    assert_close(out, ref, tol, "av")
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(device=device, dtype=dtype))
    ref.backward(g.to(dtype).double())
    assert_close(a.grad, la.grad, tol, "grad attn")
    assert_close(v.grad, lv.grad, tol, "grad value")


@pytest.mark.parametrize("case", [c for c in UNFUSED_CASES if c[3] is True or (isinstance(c[3], tuple) and any(c[3]))][:2],
                         ids=_ids)
def test_av_ignores_invisible_offsets(device, case):
    shape, kernel, dil, causal, _ = case
    r = len(shape)
    K = math.prod(as_tuple(kernel, r))
    qk = torch.randn(1, *shape, 2, 8, device=device)
    attn = _fn("qk", r)(qk, qk, kernel, dilation=dil, is_causal=causal)
    invisible = torch.isneginf(attn)
    assert invisible.any(), "a causal case must have invisible offsets"
    v = torch.randn(1, *shape, 2, 8, device=device)
    a1 = torch.rand(1, *shape, 2, K, device=device)
    a2 = a1.masked_fill(invisible, 1e4)
    o1 = _fn("av", r)(a1, v, kernel, dilation=dil, is_causal=causal)
    o2 = _fn("av", r)(a2, v, kernel, dilation=dil, is_causal=causal)
    ref = reference_av(a1, v, kernel, dil, causal)
    assert_close(o1, ref, 1e-5, "av")
    assert_close(o2, ref, 1e-5, "av with garbage at invisible offsets")


@pytest.mark.parametrize("case", UNFUSED_CASES, ids=_ids)
def test_pipeline_equals_fused(device, case):
    import natten

    shape, kernel, dil, causal, _ = case
    r = len(shape)
    B, H, D = 2, 2, 16
    scale = D ** -0.5
    q = torch.randn(B, *shape, H, D, device=device)
    k = torch.randn(B, *shape, H, D, device=device)
    v = torch.randn(B, *shape, H, D, device=device)
    attn = _fn("qk", r)(q * scale, k, kernel, dilation=dil, is_causal=causal)
    attn = torch.softmax(attn, dim=-1)
    out = _fn("av", r)(attn, v, kernel, dilation=dil, is_causal=causal)
    ref, _ = reference_na(q, k, v, kernel, 1, dil, causal)
    tol = tolerance(torch.float32, device)
    assert_close(out, ref, tol, "unfused pipeline vs oracle")
    fused = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[r](q, k, v, kernel, dilation=dil, is_causal=causal)
    assert_close(out, fused, tol, "unfused pipeline vs fused")


def test_unfused_noncontiguous(device):
    # heads-first storage viewed heads-last
    B, H, D = 2, 2, 8
    q = torch.randn(B, H, 7, 8, D, device=device).permute(0, 2, 3, 1, 4)
    k = torch.randn(B, H, 7, 8, D, device=device).permute(0, 2, 3, 1, 4)
    v = torch.randn(B, 7, 8, H, 2 * D, device=device)[..., ::2]
    assert not q.is_contiguous() and not v.is_contiguous()
    attn = _fn("qk", 2)(q, k, (3, 5), dilation=(2, 1))
    assert_close_masked(attn, reference_qk(q, k, (3, 5), (2, 1), False), 1e-5)
    a = torch.softmax(attn, -1)
    a_nc = torch.randn(B, 7, 8, H, 2 * 15, device=device)[..., ::2]
    a_nc.copy_(a)
    out = _fn("av", 2)(a_nc, v, (3, 5), dilation=(2, 1))
    assert_close(out, reference_av(a, v, (3, 5), (2, 1), False), 1e-5)


# ---------------------------------------------------------------------------
# Original API (heads-first, positional)
# ---------------------------------------------------------------------------

ORIG_CASES = [
    ((12,), 5, 2),
    ((10,), 4, 1),
    ((7, 9), 3, 2),
    ((8, 8), 4, 1),
    ((4, 5, 6), 3, 1),
    ((6, 5, 4), 2, 2),
]


def _heads_last(t, rank):
    return t.movedim(1, 1 + rank)


@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "norpb"])
@pytest.mark.parametrize("shape,kernel,dil", ORIG_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_original_api(device, shape, kernel, dil, use_rpb):
    import natten.functional as F

    r = len(shape)
    qkrpb = getattr(F, f"natten{r}dqkrpb")
    av = getattr(F, f"natten{r}dav")
    B, H, D = 2, 2, 8
    q = torch.randn(B, H, *shape, D, device=device, requires_grad=True)
    k = torch.randn(B, H, *shape, D, device=device, requires_grad=True)
    v = torch.randn(B, H, *shape, D, device=device, requires_grad=True)
    rpb = torch.randn(H, *[2 * kernel - 1] * r, device=device, requires_grad=True) if use_rpb else None
    attn = qkrpb(q, k, rpb, kernel, dil)
    K = kernel ** r
    assert attn.shape == (B, H, *shape, K), tuple(attn.shape)

    lq, lk, lv = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    lrpb = rpb.detach().cpu().double().requires_grad_() if use_rpb else None
    ref_attn = reference_qk(_heads_last(lq, r), _heads_last(lk, r), kernel, dil, False, rpb=lrpb)
    ref_attn = ref_attn.movedim(1 + r, 1)
    assert_close(attn, ref_attn, 1e-5, "natten qkrpb")

    p = torch.softmax(attn, dim=-1)
    out = av(p, v, kernel, dil)
    assert out.shape == (B, H, *shape, D)
    ref_p = torch.softmax(ref_attn, dim=-1)
    ref_out = reference_av(_heads_last(ref_p, r), _heads_last(lv, r), kernel, dil, False).movedim(1 + r, 1)
    assert_close(out, ref_out, 1e-5, "natten av")

    g = torch.randn(out.shape)
    out.backward(g.to(device))
    ref_out.backward(g.double())
    assert_close(q.grad, lq.grad, 1e-5, "grad query")
    assert_close(k.grad, lk.grad, 1e-5, "grad key")
    assert_close(v.grad, lv.grad, 1e-5, "grad value")
    if use_rpb:
        assert_close(rpb.grad, lrpb.grad, 1e-5, "grad rpb")


def test_gradcheck_unfused():
    import natten.functional as F

    q = torch.randn(1, 5, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, rpb: F.na2d_qk(q, k, (3, 2), dilation=(1, 2), is_causal=(False, True), rpb=rpb).nan_to_num(neginf=0.0),
        (q, k, rpb),
    )
    a = torch.randn(1, 5, 6, 2, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 5, 6, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, v: F.na2d_av(a, v, (3, 2), dilation=(1, 2), is_causal=(False, True)), (a, v)
    )
