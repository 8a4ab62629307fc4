"""The oracle checks itself: classic NA, window counts, blocked and causal rules,
dilation residues, its two formulations (mask rules vs first/last table) against each
other, its vectorised attention against a per-query loop, and finally the library's own
window arithmetic (natten._C.axis_window) against it."""

import itertools
import math
import random

import pytest
import torch

from oracle import (
    axis_mask,
    axis_params,
    na_mask,
    reference_av,
    reference_na,
    reference_na_unfused,
    reference_qk,
    window_table,
)


def _axis_configs(n, seed, max_len=24):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        L = rng.randint(1, max_len)
        d = rng.randint(1, max(1, min(4, L)))
        kmax = L // d
        if kmax < 1:
            continue
        k = rng.randint(1, kmax)
        s = rng.randint(1, k)
        c = rng.random() < 0.5
        out.append((L, k, s, d, c))
    return out


# ---------------------------------------------------------------------------
# Classic NA and window sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("L,k", [(7, 3), (9, 5), (13, 7), (5, 5), (12, 1), (16, 9)])
def test_classic_na(L, k):
    m = axis_mask(L, k, 1, 1, False)
    for x in range(L):
        start = min(max(x - k // 2, 0), L - k)
        expect = torch.zeros(L, dtype=torch.bool)
        expect[start : start + k] = True
        assert torch.equal(m[x], expect), (L, k, x)


def test_classic_na_2d_is_product():
    shape, k = (6, 7), (3, 5)
    m = na_mask(shape, k)
    for x0, x1 in itertools.product(range(6), range(7)):
        s0 = min(max(x0 - 1, 0), 6 - 3)
        s1 = min(max(x1 - 2, 0), 7 - 5)
        row = m[x0 * 7 + x1].view(6, 7)
        expect = torch.zeros(6, 7, dtype=torch.bool)
        expect[s0 : s0 + 3, s1 : s1 + 5] = True
        assert torch.equal(row, expect)


@pytest.mark.parametrize("L,k", [(8, 4), (10, 2), (9, 6)])
def test_even_window_leans_left(L, k):
    m = axis_mask(L, k, 1, 1, False)
    for x in range(k // 2, L - (k // 2 - 1)):
        idx = m[x].nonzero().flatten().tolist()
        assert idx == list(range(x - k // 2, x + k // 2)), (L, k, x, idx)


@pytest.mark.parametrize("cfg", _axis_configs(60, 1))
def test_noncausal_counts(cfg):
    L, k, s, d, _ = cfg
    m = axis_mask(L, k, s, d, False)
    assert (m.sum(1) == k).all(), cfg


def test_noncausal_counts_3d():
    shape, k = (5, 6, 7), (3, 4, 5)
    m = na_mask(shape, k, stride=(1, 2, 3), dilation=(1, 1, 1))
    assert (m.sum(1) == 60).all()
    m = na_mask((6, 7, 8), (2, 3, 2), stride=(2, 1, 2), dilation=(2, 2, 3))
    assert (m.sum(1) == 12).all()


@pytest.mark.parametrize("L,k", [(8, 4), (9, 3), (12, 2), (6, 6), (7, 7)])
def test_stride_equals_kernel_is_blocked(L, k):
    m = axis_mask(L, k, k, 1, False)
    for x in range(L):
        b = x // k
        expect = torch.zeros(L, dtype=torch.bool)
        expect[b * k : b * k + k] = True
        assert torch.equal(m[x], expect), (L, k, x)


def test_blocked_2d():
    m = na_mask((6, 8), (3, 4), stride=(3, 4))
    blocks = torch.arange(48).view(6, 8)
    blk = (torch.arange(6).view(6, 1) // 3) * 2 + (torch.arange(8).view(1, 8) // 4)
    blk = blk.flatten()
    assert torch.equal(m, blk.view(-1, 1) == blk.view(1, -1))
    assert blocks.numel() == 48


@pytest.mark.parametrize("cfg", _axis_configs(60, 2))
def test_stride_group_shares_window(cfg):
    L, k, s, d, _ = cfg
    m = axis_mask(L, k, s, d, False)
    for x in range(L):
        for x2 in range(L):
            if x % d == x2 % d and (x // d) // s == (x2 // d) // s:
                assert torch.equal(m[x], m[x2]), (cfg, x, x2)


# ---------------------------------------------------------------------------
# Causal
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("L,k", [(7, 3), (8, 4), (5, 5), (9, 1)])
def test_causal_stride1(L, k):
    m = axis_mask(L, k, 1, 1, True)
    for x in range(L):
        expect = torch.zeros(L, dtype=torch.bool)
        expect[max(0, x - k + 1) : x + 1] = True
        assert torch.equal(m[x], expect), (L, k, x)


@pytest.mark.parametrize("cfg", _axis_configs(80, 3))
def test_causal_rules(cfg):
    L, k, s, d, _ = cfg
    m = axis_mask(L, k, s, d, True)
    for x in range(L):
        ys = m[x].nonzero().flatten().tolist()
        assert x in ys, (cfg, x)
        assert all(y <= x for y in ys), (cfg, x, ys)
        xi = x // d
        Lg = L // d + (1 if x % d < L % d else 0)
        lead = min((xi // s) * s + s - 1, Lg - 1)
        count = xi - max(lead - k + 1, 0) + 1
        assert len(ys) == count, (cfg, x, ys, count)
        assert 1 <= len(ys) <= k
        # contiguous in group coordinates
        yis = [y // d for y in ys]
        assert yis == list(range(yis[0], yis[0] + len(yis)))


@pytest.mark.parametrize("L,k", [(8, 4), (9, 3), (6, 2)])
def test_causal_blocked(L, k):
    m = axis_mask(L, k, k, 1, True)
    for x in range(L):
        b = x // k
        expect = torch.zeros(L, dtype=torch.bool)
        expect[b * k : x + 1] = True
        assert torch.equal(m[x], expect), (L, k, x)


def test_causal_per_axis():
    shape = (5, 6)
    m = na_mask(shape, (3, 3), is_causal=(True, False)).view(5, 6, 5, 6)
    mc = axis_mask(5, 3, 1, 1, True)
    mn = axis_mask(6, 3, 1, 1, False)
    assert torch.equal(m, mc.view(5, 1, 5, 1) & mn.view(1, 6, 1, 6))
    # second axis non-causal: some key has a larger coordinate than its query
    assert m[0, 0, 0, 1]


# ---------------------------------------------------------------------------
# Dilation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [c for c in _axis_configs(200, 4) if c[3] > 1][:40])
def test_dilation_residue(cfg):
    L, k, s, d, c = cfg
    m = axis_mask(L, k, s, d, c)
    for x in range(L):
        ys = m[x].nonzero().flatten()
        assert ((ys % d) == (x % d)).all(), (cfg, x)


@pytest.mark.parametrize("L,k,d", [(10, 3, 3), (11, 2, 4), (13, 4, 3), (9, 3, 3)])
def test_dilation_is_na_in_groups(L, k, d):
    """Dilated NA on an axis equals undilated NA inside each residue class."""
    for c in (False, True):
        m = axis_mask(L, k, 1, d, c)
        for r in range(d):
            members = list(range(r, L, d))
            sub = m[members][:, members]
            assert torch.equal(sub, axis_mask(len(members), k, 1, 1, c)), (L, k, d, r, c)


# ---------------------------------------------------------------------------
# Two formulations of the window agree
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", _axis_configs(80, 5))
def test_window_table_matches_mask(cfg):
    L, k, s, d, c = cfg
    m = axis_mask(L, k, s, d, c)
    key, valid, _ = window_table((L,), k, d, c, s)
    for x in range(L):
        xi, first, last, _ = axis_params(L, k, s, d, c, x)
        vis = set(key[x][valid[x]].tolist())
        assert vis == set(m[x].nonzero().flatten().tolist()), (cfg, x)
        assert valid[x].sum().item() == last - first + 1
        # offset j refers to yi = first + j
        for j in range(k):
            if valid[x, j]:
                assert key[x, j].item() == (first + j) * d + x % d


def test_window_table_3d_matches_mask():
    shape, k, d, c = (5, 6, 7), (2, 3, 3), (2, 1, 2), (False, True, False)
    m = na_mask(shape, k, 1, d, c)
    key, valid, _ = window_table(shape, k, d, c)
    N = math.prod(shape)
    dense = torch.zeros(N, N, dtype=torch.bool)
    rows = torch.arange(N).view(N, 1).expand_as(key)
    dense[rows[valid], key[valid]] = True
    assert torch.equal(dense, m)


# ---------------------------------------------------------------------------
# Vectorised attention vs a per-query loop
# ---------------------------------------------------------------------------


def _loop_attention(q, k, v, mask, scale, ak=None, av=None):
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    out = torch.zeros(B, N, H, v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(B, N, H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(N):
                keys = mask[i].nonzero().flatten()
                K = k[b, keys, hk]
                V = v[b, keys, hk]
                if ak is not None:
                    K = torch.cat([K, ak[b, :, hk]])
                    V = torch.cat([V, av[b, :, hk]])
                sc = (K @ q[b, i, h]) * scale
                mx = sc.max()
                e = torch.exp(sc - mx)
                out[b, i, h] = (e / e.sum()) @ V
                lse[b, i, h] = mx + torch.log(e.sum())
    return out, lse


@pytest.mark.parametrize(
    "shape,ks,st,dl,ca,extra",
    [
        ((9,), 3, 1, 2, False, 0),
        ((4, 5), (2, 3), (2, 1), 1, (True, False), 3),
        ((3, 4, 5), (3, 2, 2), 1, (1, 2, 2), False, 2),
    ],
)
def test_reference_na_matches_loop(shape, ks, st, dl, ca, extra):
    B, H, Hkv, D, Dv = 2, 4, 2, 5, 3
    N = math.prod(shape)
    q = torch.randn(B, *shape, H, D, dtype=torch.float64)
    k = torch.randn(B, *shape, Hkv, D, dtype=torch.float64)
    v = torch.randn(B, *shape, Hkv, Dv, dtype=torch.float64)
    ak = av = None
    if extra:
        ak = torch.randn(B, extra, Hkv, D, dtype=torch.float64)
        av = torch.randn(B, extra, Hkv, Dv, dtype=torch.float64)
    out, lse = reference_na(q, k, v, ks, st, dl, ca, scale=0.7, additional_keys=ak, additional_values=av)
    mask = na_mask(shape, ks, st, dl, ca)
    o2, l2 = _loop_attention(
        q.reshape(B, N, H, D), k.reshape(B, N, Hkv, D), v.reshape(B, N, Hkv, Dv), mask, 0.7, ak, av
    )
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == (B, *shape, H, Dv) and lse.shape == (B, *shape, H)
    torch.testing.assert_close(out.reshape(B, N, H, Dv), o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.reshape(B, N, H), l2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape,ks,dl,ca",
    [((11,), 4, 2, False), ((11,), 3, 3, True), ((5, 6), (3, 2), (1, 2), (False, True)), ((3, 4, 5), 2, 1, True)],
)
def test_unfused_reference_equals_fused_reference(shape, ks, dl, ca):
    B, H, D = 2, 2, 4
    q = torch.randn(B, *shape, H, D, dtype=torch.float64)
    k = torch.randn(B, *shape, H, D, dtype=torch.float64)
    v = torch.randn(B, *shape, H, D, dtype=torch.float64)
    o1, _ = reference_na(q, k, v, ks, 1, dl, ca)
    o2 = reference_na_unfused(q, k, v, ks, dl, ca)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)


def test_reference_qk_rpb_and_av_by_hand():
    # 1D, L=5, k=3, d=1: query 0 window keys 0..2, rpb index (y - x) + 2
    q = torch.randn(1, 5, 1, 2, dtype=torch.float64)
    k = torch.randn(1, 5, 1, 2, dtype=torch.float64)
    rpb = torch.randn(1, 5, dtype=torch.float64)
    a = reference_qk(q, k, 3, rpb=rpb)
    for x in range(5):
        start = min(max(x - 1, 0), 2)
        for j in range(3):
            y = start + j
            expect = (q[0, x, 0] @ k[0, y, 0]) + rpb[0, y - x + 2]
            assert torch.allclose(a[0, x, 0, j], expect)
    v = torch.randn(1, 5, 1, 3, dtype=torch.float64)
    attn = torch.randn(1, 5, 1, 3, dtype=torch.float64)
    o = reference_av(attn, v, 3)
    for x in range(5):
        start = min(max(x - 1, 0), 2)
        expect = sum(attn[0, x, 0, j] * v[0, start + j, 0] for j in range(3))
        assert torch.allclose(o[0, x, 0], expect)


def test_reference_qk_causal_marks_invisible():
    q = torch.randn(1, 6, 1, 2, dtype=torch.float64)
    k = torch.randn(1, 6, 1, 2, dtype=torch.float64)
    a = reference_qk(q, k, 3, is_causal=True)
    # query 0 sees 1 key (offset 0), query 1 sees 2, later 3
    counts = torch.isfinite(a[0, :, 0]).sum(-1).tolist()
    assert counts == [1, 2, 3, 3, 3, 3]
    assert torch.isneginf(a[0, 0, 0, 1:]).all()


# ---------------------------------------------------------------------------
# The library's window arithmetic agrees with the oracle
# ---------------------------------------------------------------------------


def test_library_axis_window_matches_oracle():
    import natten._C as C

    cfgs = _axis_configs(400, 6, max_len=40)
    cfgs += [(L, k, s, d, c) for L in (1, 2, 7, 8) for d in (1, 2) for k in range(1, L // d + 1) for s in range(1, k + 1) for c in (False, True)]
    bad = []
    for L, k, s, d, c in cfgs:
        for x in range(L):
            got = tuple(int(v) for v in C.axis_window(L, k, s, d, c, x))
            xi, first, last, _ = axis_params(L, k, s, d, c, x)
            if got != (first, first, last):
                bad.append(((L, k, s, d, c, x), got, (first, first, last)))
    assert not bad, f"{len(bad)} mismatches, first few (L,k,s,d,c,x), got, expected: {bad[:5]}"
