"""NeighborhoodAttention{1,2,3}D modules vs a float64 hand evaluation with the module's
own weights and the oracle; torch.compile(fullgraph=True) vs eager; merge_attentions."""

import pytest
import torch
import torch.nn.functional as Fn

from conftest import assert_close
from oracle import as_tuple, reference_na, reference_na_unfused


def _module_cls(rank):
    import natten

    return {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D, 3: natten.NeighborhoodAttention3D}[rank]


def _reference_module(m, x, kernel, dilation, stride, causal, num_heads, qk_scale, use_rpb):
    """Float64 evaluation: qkv linear -> [.., 3, heads, head_dim] -> NA -> proj."""
    rank = x.dim() - 2
    B, S, dim = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
    hd = dim // num_heads
    x64 = x.detach().double()
    W, b = m.qkv.weight.detach().double(), m.qkv.bias
    qkv = Fn.linear(x64, W, None if b is None else b.detach().double())
    qkv = qkv.reshape(B, *S, 3, num_heads, hd)
    q, k, v = qkv.unbind(dim=1 + rank)
    scale = qk_scale if qk_scale is not None else hd ** -0.5
    r = rank
    if use_rpb:
        out = reference_na_unfused(q, k, v, as_tuple(kernel, r), as_tuple(dilation, r), as_tuple(causal, r),
                                   rpb=m.rpb.detach().double(), scale=scale)
    else:
        out, _ = reference_na(q, k, v, as_tuple(kernel, r), as_tuple(stride, r), as_tuple(dilation, r),
                              as_tuple(causal, r), scale=scale)
    out = out.reshape(B, *S, dim)
    pb = m.proj.bias
    return Fn.linear(out, m.proj.weight.detach().double(), None if pb is None else pb.detach().double())


MODULE_CASES = [
    # rank, shape, dim, heads, kernel, dilation, stride, causal, rpb, qkv_bias, qk_scale
    (1, (13,), 16, 2, 5, 2, 1, False, False, True, None),
    (1, (12,), 24, 3, 4, 1, 2, True, False, False, 0.3),
    (1, (11,), 16, 4, 3, 3, 1, False, True, True, None),
    (2, (7, 8), 16, 2, (3, 4), (2, 1), (1, 2), (False, True), False, True, None),
    (2, (6, 7), 32, 4, 3, (1, 2), 1, False, True, True, 0.2),
    (2, (6, 6), 16, 2, 6, 1, 6, False, False, True, None),
    (3, (4, 5, 6), 16, 2, (3, 2, 3), (1, 2, 1), (1, 2, 3), (True, False, False), False, True, None),
    (3, (4, 5, 5), 8, 2, 3, 1, 1, False, True, False, None),
]


def _mid(c):
    rank, shape, dim, heads, kernel, dil, stride, causal, rpb, qb, sc = c
    return f"{rank}d-{'x'.join(map(str, shape))}-k{kernel}-d{dil}-s{stride}-c{causal}-{'rpb' if rpb else 'fused'}".replace(" ", "")


def _build(c):
    rank, shape, dim, heads, kernel, dil, stride, causal, rpb, qb, sc = c
    kw = dict(dilation=dil, is_causal=causal, bias=rpb, qkv_bias=qb, qk_scale=sc)
    if stride != 1:
        kw["stride"] = stride
    m = _module_cls(rank)(dim, heads, kernel, **kw)
    if rpb:
        assert isinstance(m.rpb, torch.nn.Parameter), "bias=True must create parameter `rpb`"
        expect = (heads, *[2 * k - 1 for k in as_tuple(kernel, rank)])
        assert tuple(m.rpb.shape) == expect, f"rpb shape {tuple(m.rpb.shape)} != {expect}"
        with torch.no_grad():  # make the bias matter (default init is tiny)
            m.rpb.copy_(torch.randn_like(m.rpb))
    else:
        assert getattr(m, "rpb", None) is None, "bias=False must not create an rpb parameter"
    if not qb:
        assert m.qkv.bias is None
    return m


@pytest.mark.parametrize("case", MODULE_CASES, ids=_mid)
def test_module_matches_reference(case):
    rank, shape, dim, heads, kernel, dil, stride, causal, rpb, qb, sc = case
    m = _build(case)
    x = torch.randn(2, *shape, dim, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    ref = _reference_module(m, x, kernel, dil, stride, causal, heads, sc, rpb)
    assert_close(y, ref, 1e-5, "module output")
    y.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no grad for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite grad for {name}"
        assert p.grad.abs().sum() > 0, f"zero grad for {name}"


def test_module_grads_match_reference():
    """Parameter gradients (incl. rpb) vs autograd through the float64 hand evaluation."""
    case = MODULE_CASES[4]
    rank, shape, dim, heads, kernel, dil, stride, causal, rpb, qb, sc = case
    m = _build(case)
    m64 = _build(case).double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(2, *shape, dim)
    g = torch.randn(2, *shape, dim)
    m(x).backward(g)

    # float64 reference with autograd through the module's float64 copy of the weights
    x64 = x.double()
    qkv = Fn.linear(x64, m64.qkv.weight, m64.qkv.bias).reshape(2, *shape, 3, heads, dim // heads)
    q, k, v = qkv.unbind(dim=1 + rank)
    out = reference_na_unfused(q, k, v, as_tuple(kernel, rank), as_tuple(dil, rank), False, rpb=m64.rpb, scale=sc)
    out = Fn.linear(out.reshape(2, *shape, dim), m64.proj.weight, m64.proj.bias)
    out.backward(g.double())
    p64 = dict(m64.named_parameters())
    for name, p in m.named_parameters():
        assert_close(p.grad, p64[name].grad, 1e-5, f"grad {name}")


def test_module_eval_deterministic_and_dropout_train():
    import natten

    m = natten.NeighborhoodAttention2D(16, 2, 3, bias=False, attn_drop=0.5, proj_drop=0.5)
    x = torch.randn(1, 6, 6, 16)
    m.eval()
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2)
    ref = _reference_module(m, x, 3, 1, 1, False, 2, None, False)
    assert_close(y1, ref, 1e-5, "eval-mode output with dropout configured")


# ---------------------------------------------------------------------------
# torch.compile (slow on 2 cores: keep to a few tiny cases)
# ---------------------------------------------------------------------------

COMPILE_CASES = [
    (2, (6, 7), 16, 2, (3, 4), (2, 1), (1, 2), (False, True), False, True, None),
    (1, (9,), 16, 2, 3, 2, 1, False, True, True, None),
]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=_mid)
def test_compile_matches_eager(case):
    rank, shape, dim, heads, kernel, dil, stride, causal, rpb, qb, sc = case
    torch._dynamo.reset()
    m = _build(case)
    x = torch.randn(2, *shape, dim)
    g = torch.randn(2, *shape, dim)

    xe = x.clone().requires_grad_()
    ye = m(xe)
    ye.backward(g)
    grads_e = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    cm = torch.compile(m, fullgraph=True)
    xc = x.clone().requires_grad_()
    yc = cm(xc)
    yc.backward(g)
    assert_close(yc, ye, 1e-5, "compiled output")
    assert_close(xc.grad, xe.grad, 1e-5, "compiled input grad")
    for n, p in m.named_parameters():
        assert_close(p.grad, grads_e[n], 1e-5, f"compiled grad {n}")
    # and both against the oracle
    ref = _reference_module(m, x, kernel, dil, stride, causal, heads, sc, rpb)
    assert_close(yc, ref, 1e-5, "compiled output vs oracle")


def test_compile_fused_op_with_extra_kv():
    import natten

    torch._dynamo.reset()

    def f(q, k, v, ak, av):
        out, lse = natten.na1d(q, k, v, 4, stride=2, dilation=2, additional_keys=ak, additional_values=av,
                               return_lse=True)
        return out * 2.0, lse

    t = [torch.randn(1, 11, 2, 8, requires_grad=True) for _ in range(3)]
    e = [torch.randn(1, 3, 2, 8, requires_grad=True) for _ in range(2)]
    cf = torch.compile(f, fullgraph=True)
    out, lse = cf(*t, *e)
    ref, ref_lse = reference_na(*[x.detach() for x in t], 4, 2, 2, False,
                                additional_keys=e[0].detach(), additional_values=e[1].detach())
    assert_close(out, 2.0 * ref, 1e-5, "compiled fused output")
    assert_close(lse, ref_lse, 1e-5, "compiled fused lse")
    leaves = [x.detach().double().requires_grad_() for x in t + e]
    r, _ = reference_na(*leaves[:3], 4, 2, 2, False, additional_keys=leaves[3], additional_values=leaves[4])
    g = torch.randn(out.shape)
    out.backward(g)
    (2.0 * r).backward(g.double())
    for i, (x, lf) in enumerate(zip(t + e, leaves)):
        assert_close(x.grad, lf.grad, 1e-5, f"compiled grad input {i}")


# ---------------------------------------------------------------------------
# merge_attentions
# ---------------------------------------------------------------------------


def _plain_attention(q, k, v, scale):
    """q [B,*S,H,D], k/v [B,N,H,D] -> out [B,*S,H,Dv], lse [B,*S,H] (float32 math)."""
    s = torch.einsum("b...hd,bnhd->b...hn", q, k) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.einsum("b...hn,bnhd->b...hd", p, v), lse


def _merge(outs, lses):
    import natten

    res = natten.merge_attentions(outs, lses)
    if isinstance(res, (tuple, list)):
        return res[0], res[1]
    return res, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_merge_attentions(dtype):
    import natten

    B, S, H, D = 2, (7, 8), 2, 16
    q = torch.randn(B, *S, H, D, dtype=dtype)
    k = torch.randn(B, *S, H, D, dtype=dtype)
    v = torch.randn(B, *S, H, D, dtype=dtype)
    ak = torch.randn(B, 5, H, D, dtype=dtype)
    av = torch.randn(B, 5, H, D, dtype=dtype)
    kw = dict(kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(True, False))
    o1, l1 = natten.na2d(q, k, v, return_lse=True, **kw)
    o2, l2 = _plain_attention(q, ak, av, D ** -0.5)
    merged, mlse = _merge([o1, o2], [l1.to(l2.dtype), l2])
    ref, ref_lse = reference_na(q, k, v, (3, 4), (1, 2), (2, 1), (True, False), additional_keys=ak, additional_values=av)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert merged.shape == ref.shape
    assert_close(merged, ref, tol, "merged output")
    if mlse is not None:
        assert_close(mlse, ref_lse, tol, "merged lse")
    # the merge must actually change something: window-only attention differs
    assert (o1.double() - ref).abs().max() > 1e-3


def test_merge_attentions_backward():
    import natten

    B, S, H, D = 1, (6, 6), 2, 8
    q, k, v = (torch.randn(B, *S, H, D, requires_grad=True) for _ in range(3))
    ak, av = (torch.randn(B, 4, H, D, requires_grad=True) for _ in range(2))
    o1, l1 = natten.na2d(q, k, v, 3, return_lse=True)
    o2, l2 = _plain_attention(q, ak, av, D ** -0.5)
    merged, _ = _merge([o1, o2], [l1, l2])
    g = torch.randn(merged.shape)
    merged.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, ak, av)]
    ref, _ = reference_na(*leaves[:3], 3, additional_keys=leaves[3], additional_values=leaves[4])
    ref.backward(g.double())
    for name, t, lf in zip(("q", "k", "v", "ak", "av"), (q, k, v, ak, av), leaves):
        assert_close(t.grad, lf.grad, 1e-5, f"grad {name} through merge")
