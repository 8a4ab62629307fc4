"""NeighborhoodAttention1D/2D/3D: multi-head self attention layers over token grids.

The constructor keeps the positional order of the original (0.14) modules, and `bias=True`,
their default, creates the relative positional bias `rpb` they had, so models and checkpoints
written for them load unchanged. Arguments those modules did not have are keyword-only.
"""

from __future__ import annotations

import torch
from torch import nn

from natten import functional as F
from natten._checks import check_window

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    rank: int = 0

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, bias: bool = True,
                 qkv_bias: bool = True, qk_scale=None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, stride=1, is_causal=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if dilation is None:  # the original modules read None as no dilation
            dilation = 1
        # Validate the window against its own sizes now; extents are checked at call time.
        window = check_window(self.rank, [10**9] * self.rank, kernel_size, stride, dilation, is_causal)
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.kernel_size, self.stride = window.kernel_size, window.stride
        self.dilation, self.is_causal = window.dilation, window.is_causal
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        if bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"input must be of shape [batch, *spatial ({self.rank} dims), {self.dim}], got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[1:-1])
        # An axis shorter than the window's span gets zero tokens appended before the
        # projections (so they carry the qkv bias, as in the original modules); the output is
        # cropped back to the input's tokens.
        short = [max(0, k * d - L) for L, k, d in zip(spatial, self.kernel_size, self.dilation)]
        if any(short):
            x = torch.nn.functional.pad(x, [0, 0] + [p for n in reversed(short) for p in (0, n)])
        shape = x.shape[:-1]
        q, k, v = self.qkv(x).reshape(*shape, 3, self.num_heads, self.head_dim).unbind(dim=-3)
        window = (self.kernel_size, self.stride, self.dilation, self.is_causal)
        needs_weights = self.rpb is not None or (self.training and self.attn_drop > 0)
        if needs_weights:
            out = F._unfused_attention(self.rank, q, k, v, *window, self.scale, self.rpb,
                                       self.attn_drop, self.training)
        else:
            out = F._fused(self.rank, q, k, v, *window, self.scale, None, None, None, None, None,
                           None, None, False)
        if any(short):
            out = out[(slice(None), *(slice(0, L) for L in spatial))]
        return self.proj_drop(self.proj(out.reshape(x.shape[0], *spatial, self.dim)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, bias={self.rpb is not None}, stride={self.stride}, "
                f"is_causal={self.is_causal}")


_DOC = """{rank}-D neighborhood attention layer, input and output [batch, *spatial ({rank} dims), dim].

    NeighborhoodAttention{rank}D(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0, *, stride=1, is_causal=False)

    bias: a learned relative positional bias `rpb` [num_heads, 2k-1 per axis] added to the scores
    (on by default, as in NATTEN 0.14); with it, or with attention dropout while training, the
    layer runs the unfused ops. bias=False runs the fused kernels. Inputs shorter than
    kernel_size * dilation on an axis are zero-padded at its end and the output cropped back."""


class NeighborhoodAttention1D(_NeighborhoodAttention):
    __doc__ = _DOC.format(rank=1)
    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    __doc__ = _DOC.format(rank=2)
    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    __doc__ = _DOC.format(rank=3)
    rank = 3
