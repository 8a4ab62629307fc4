"""NeighborhoodAttention1D/2D/3D: multi-head self attention layers over token grids."""

from __future__ import annotations

import torch
from torch import nn

from natten import functional as F
from natten._checks import check_window

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    rank: int = 0

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, stride=1, is_causal=False,
                 rel_pos_bias: bool = False, qkv_bias: bool = True, qk_scale=None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
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
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"input must be of shape [batch, *spatial ({self.rank} dims), {self.dim}], got {tuple(x.shape)}"
            )
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
        return self.proj_drop(self.proj(out.reshape(*shape, self.dim)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    rank = 3
