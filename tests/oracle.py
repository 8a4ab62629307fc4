"""Float64 dense-mask evaluation of docs/semantics.md, written from the rules' text only.

Nothing here imports `natten`: the oracle must be independent of the library it judges.

Conventions
-----------
- Fused inputs are heads-last: q [B, *S, H, D], k [B, *S, Hkv, D], v [B, *S, Hkv, Dv].
- Tokens are flattened row-major (last axis fastest).
- GQA: query head h uses KV head h // (H // Hkv).
- Unfused ops index window offsets per axis from `first` (the first visible key in
  dilation-group coordinates); offsets past `last` are invisible.
"""

import functools
import math

import torch

__all__ = [
    "as_tuple",
    "axis_params",
    "axis_mask",
    "na_mask",
    "window_table",
    "reference_na",
    "reference_qk",
    "reference_av",
    "reference_na_unfused",
]


def as_tuple(x, rank):
    if isinstance(x, (tuple, list)):
        assert len(x) == rank, (x, rank)
        return tuple(x)
    return (x,) * rank


# ---------------------------------------------------------------------------
# One axis
# ---------------------------------------------------------------------------


def axis_params(L, k, s, d, c, x):
    """Window of real coordinate x on one axis, per docs/semantics.md.

    Returns (xi, first, last, group_len) in dilation-group coordinates.
    """
    assert 1 <= k and 1 <= s <= k and d >= 1 and k * d <= L, (L, k, s, d, c)
    r = x % d
    xi = x // d
    Lg = L // d + (1 if r < L % d else 0)
    assert k <= Lg
    if c:
        lead = min((xi // s) * s + s - 1, Lg - 1)
        first = max(lead - k + 1, 0)
        last = xi
    else:
        left = k // 2
        right = k // 2 if k % 2 == 1 else k // 2 - 1
        lead = min((xi // s) * s + (s // 2), Lg - 1)
        centre = min(max(lead, left), Lg - 1 - right)
        first = centre - left
        last = centre + right
    return xi, first, last, Lg


@functools.lru_cache(maxsize=None)
def axis_mask(L, k, s, d, c):
    """Bool [L, L]: mask[x, y] is True iff query x sees key y along this axis.

    Written as the literal rules of docs/semantics.md (not via first/last) so that the two
    formulations check each other in test_oracle.py.
    """
    m = torch.zeros(L, L, dtype=torch.bool)
    for x in range(L):
        r = x % d
        xi = x // d
        Lg = L // d + (1 if r < L % d else 0)
        for y in range(L):
            if y % d != r:
                continue
            yi = y // d
            if c:
                lead = min((xi // s) * s + s - 1, Lg - 1)
                ok = yi <= xi and lead - yi < k
            else:
                left = k // 2
                right = k // 2 if k % 2 == 1 else k // 2 - 1
                lead = min((xi // s) * s + (s // 2), Lg - 1)
                centre = lead
                if centre < left:
                    centre = left
                if centre > Lg - 1 - right:
                    centre = Lg - 1 - right
                ok = centre - left <= yi <= centre + right
            m[x, y] = ok
    return m


def _per_axis(shape, kernel_size, stride, dilation, is_causal):
    """The grid shape as a tuple, its rank, and the window arguments with one value per axis."""
    shape = tuple(shape)
    rank = len(shape)
    return shape, rank, tuple(as_tuple(x, rank) for x in (kernel_size, stride, dilation, is_causal))


def na_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False):
    """Bool [N, N] mask over row-major flattened tokens of grid `shape`."""
    shape, rank, (ks, ss, ds, cs) = _per_axis(shape, kernel_size, stride, dilation, is_causal)
    masks = [axis_mask(shape[a], ks[a], ss[a], ds[a], bool(cs[a])) for a in range(rank)]
    # full[x1..xr, y1..yr] = AND_a masks[a][x_a, y_a]
    full = torch.ones(*shape, *shape, dtype=torch.bool)
    for a in range(rank):
        view = [1] * (2 * rank)
        view[a] = shape[a]
        view[rank + a] = shape[a]
        full = full & masks[a].view(view)
    N = math.prod(shape)
    return full.reshape(N, N)


# ---------------------------------------------------------------------------
# Fused (dense masked softmax)
# ---------------------------------------------------------------------------


def _expand_kv_heads(t, H):
    """[B, N, Hkv, D] -> [B, N, H, D] with query head h -> KV head h // (H // Hkv)."""
    Hkv = t.shape[2]
    assert H % Hkv == 0
    idx = torch.arange(H) // (H // Hkv)
    return t[:, :, idx, :]


def reference_na(
    q,
    k,
    v,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale=None,
    additional_keys=None,
    additional_values=None,
):
    """Returns (out [B, *S, H, Dv], lse [B, *S, H]), both float64.

    Differentiable w.r.t. every tensor input (use float64 leaves for gradients).
    """
    rank = q.dim() - 3
    B = q.shape[0]
    S = tuple(q.shape[1 : 1 + rank])
    H, D = q.shape[-2], q.shape[-1]
    Dv = v.shape[-1]
    N = math.prod(S)
    if scale is None:
        scale = D ** -0.5
    qf = q.to("cpu", torch.float64).reshape(B, N, H, D)
    kf = _expand_kv_heads(k.to("cpu", torch.float64).reshape(B, N, k.shape[-2], D), H)
    vf = _expand_kv_heads(v.to("cpu", torch.float64).reshape(B, N, v.shape[-2], Dv), H)
    mask = na_mask(S, kernel_size, stride, dilation, is_causal)  # [N, N]
    if additional_keys is not None:
        ak = _expand_kv_heads(additional_keys.to("cpu", torch.float64), H)
        av = _expand_kv_heads(additional_values.to("cpu", torch.float64), H)
        kf = torch.cat([kf, ak], dim=1)
        vf = torch.cat([vf, av], dim=1)
        mask = torch.cat([mask, torch.ones(N, ak.shape[1], dtype=torch.bool)], dim=1)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, N]
    p = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    out = out.reshape(B, *S, H, Dv)
    lse = lse.permute(0, 2, 1).reshape(B, *S, H)
    return out, lse


# ---------------------------------------------------------------------------
# Unfused (window-offset indexed)
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _axis_table(L, k, s, d, c):
    """Per axis: key real coordinate [L, k] (clamped where invalid), valid [L, k],
    rpb index [L, k]."""
    key = torch.zeros(L, k, dtype=torch.long)
    valid = torch.zeros(L, k, dtype=torch.bool)
    bias_idx = torch.zeros(L, k, dtype=torch.long)
    for x in range(L):
        xi, first, last, _ = axis_params(L, k, s, d, c, x)
        r = x % d
        for j in range(k):
            yi = first + j
            ok = yi <= last
            valid[x, j] = ok
            key[x, j] = (yi if ok else first) * d + r
            bias_idx[x, j] = (yi - xi) + k - 1 if ok else 0
    return key, valid, bias_idx


def window_table(shape, kernel_size, dilation=1, is_causal=False, stride=1):
    """Returns (key_flat [N, K], valid [N, K], bias_idx list of [N, K] per axis),
    K = prod(kernel_size), window offsets row-major."""
    shape, rank, (ks, ss, ds, cs) = _per_axis(shape, kernel_size, stride, dilation, is_causal)
    tabs = [_axis_table(shape[a], ks[a], ss[a], ds[a], bool(cs[a])) for a in range(rank)]
    # broadcast to [L1..Lr, k1..kr]
    key_flat = torch.zeros(*shape, *ks, dtype=torch.long)
    valid = torch.ones(*shape, *ks, dtype=torch.bool)
    bias = []
    stride_flat = 1
    for a in reversed(range(rank)):
        view = [1] * (2 * rank)
        view[a] = shape[a]
        view[rank + a] = ks[a]
        key, val, bi = tabs[a]
        key_flat = key_flat + key.view(view) * stride_flat
        valid = valid & val.view(view)
        bias.insert(0, bi.view(view).expand(*shape, *ks))
        stride_flat *= shape[a]
    N = math.prod(shape)
    K = math.prod(ks)
    return (
        key_flat.reshape(N, K),
        valid.reshape(N, K),
        [b.reshape(N, K) for b in bias],
    )


def reference_qk(q, k, kernel_size, dilation=1, is_causal=False, rpb=None, stride=1):
    """Unscaled q.k over each query's window: [B, *S, H, prod(kernel)] float64,
    -inf at invisible offsets. rpb: [H, 2k_1-1, ...] added at visible offsets."""
    rank = q.dim() - 3
    B = q.shape[0]
    S = tuple(q.shape[1 : 1 + rank])
    H, D = q.shape[-2], q.shape[-1]
    N = math.prod(S)
    key_flat, valid, bias = window_table(S, kernel_size, dilation, is_causal, stride)
    K = key_flat.shape[1]
    qf = q.to("cpu", torch.float64).reshape(B, N, H, D)
    kf = _expand_kv_heads(k.to("cpu", torch.float64).reshape(B, N, k.shape[-2], D), H)
    kg = kf[:, key_flat.reshape(-1)].reshape(B, N, K, H, D)
    attn = torch.einsum("bnhd,bnkhd->bnhk", qf, kg)
    if rpb is not None:
        rp = rpb.to("cpu", torch.float64)
        b = rp[(slice(None),) + tuple(bias)]  # [H, N, K]
        attn = attn + b.permute(1, 0, 2).unsqueeze(0)
    attn = attn.masked_fill(~valid.view(1, N, 1, K), float("-inf"))
    return attn.reshape(B, *S, H, K)


def reference_av(attn, v, kernel_size, dilation=1, is_causal=False, stride=1):
    """attn [B, *S, H, prod(kernel)] times window values -> [B, *S, H, Dv] float64.
    Invisible offsets are ignored (whatever attn holds there)."""
    rank = v.dim() - 3
    B = v.shape[0]
    S = tuple(v.shape[1 : 1 + rank])
    H = attn.shape[-2]
    Dv = v.shape[-1]
    N = math.prod(S)
    key_flat, valid, _ = window_table(S, kernel_size, dilation, is_causal, stride)
    K = key_flat.shape[1]
    af = attn.to("cpu", torch.float64).reshape(B, N, H, K)
    af = af.masked_fill(~valid.view(1, N, 1, K), 0.0)
    vf = _expand_kv_heads(v.to("cpu", torch.float64).reshape(B, N, v.shape[-2], Dv), H)
    vg = vf[:, key_flat.reshape(-1)].reshape(B, N, K, H, Dv)
    out = torch.einsum("bnhk,bnkhd->bnhd", af, vg)
    return out.reshape(B, *S, H, Dv)


def reference_na_unfused(q, k, v, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None):
    """softmax(scale * q.k + rpb) @ v via the window-offset references."""
    D = q.shape[-1]
    if scale is None:
        scale = D ** -0.5
    attn = reference_qk(q.to("cpu", torch.float64) * scale, k, kernel_size, dilation, is_causal, rpb)
    attn = torch.softmax(attn, dim=-1)
    return reference_av(attn, v, kernel_size, dilation, is_causal)
