"""One neighborhood attention problem: shape, window parameters, dtype, device.

The profiler times backends on a :class:`Problem`; it builds the inputs, calls the public
API, and counts exact FLOPs through :mod:`natten.flops`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

# The profiler's name for backend=None (natten's own choice).
AUTO = "auto"

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def per_axis(name: str, values, rank: int) -> tuple:
    """Broadcast a one-element list to every axis; otherwise require one value per axis."""
    values = tuple(values)
    if len(values) == 1:
        return values * rank
    if len(values) != rank:
        raise ValueError(
            f"{name} has {len(values)} values {list(values)}, but the input has {rank} "
            f"axes; give one value, or one per axis."
        )
    return values


def _axes(values) -> str:
    return "x".join(str(int(v)) for v in values)


@dataclass
class Problem:
    input_size: tuple
    batch: int = 1
    heads: int = 4
    heads_kv: Optional[int] = None
    dim: int = 32
    dim_value: Optional[int] = None
    kernel_size: tuple = (7,)
    stride: tuple = (1,)
    dilation: tuple = (1,)
    is_causal: tuple = (False,)
    extra_kv: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = field(default=0, repr=False)

    def __post_init__(self):
        self.input_size = tuple(int(x) for x in self.input_size)
        if self.rank not in (1, 2, 3):
            raise ValueError(
                f"input size {list(self.input_size)} has {self.rank} axes; neighborhood "
                "attention supports 1, 2 or 3."
            )
        self.kernel_size = tuple(int(x) for x in per_axis("kernel size", self.kernel_size, self.rank))
        self.stride = tuple(int(x) for x in per_axis("stride", self.stride, self.rank))
        self.dilation = tuple(int(x) for x in per_axis("dilation", self.dilation, self.rank))
        self.is_causal = tuple(bool(x) for x in per_axis("causal", self.is_causal, self.rank))
        if self.heads_kv is None:
            self.heads_kv = self.heads
        if self.dim_value is None:
            self.dim_value = self.dim
        for name in ("batch", "heads", "heads_kv", "dim", "dim_value"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be positive, got {getattr(self, name)}.")
        if self.extra_kv < 0:
            raise ValueError(f"extra kv must be >= 0, got {self.extra_kv}.")
        if any(x < 1 for x in self.input_size):
            raise ValueError(f"input size must be positive, got {list(self.input_size)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}.")

    # ---- derived ---------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return len(self.input_size)

    @property
    def tokens(self) -> int:
        return math.prod(self.input_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def op(self):
        import natten

        return {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[self.rank]

    def forward_flops(self) -> int:
        """Exact multiply-adds of one forward pass (fvcore convention)."""
        from natten.flops import fna_flops

        return fna_flops(
            self.batch,
            self.heads,
            self.input_size,
            self.dim,
            self.kernel_size,
            self.stride,
            self.dilation,
            self.is_causal,
            head_dim_v=self.dim_value,
            num_extra_kv=self.extra_kv,
        )

    def describe(self) -> str:
        heads = f"heads {self.heads}" + (f" (kv {self.heads_kv})" if self.heads_kv != self.heads else "")
        dim = f"dim {self.dim}" + (f" (v {self.dim_value})" if self.dim_value != self.dim else "")
        parts = [
            f"na{self.rank}d",
            f"input {_axes(self.input_size)}",
            f"batch {self.batch}",
            heads,
            dim,
            f"kernel {_axes(self.kernel_size)}",
            f"stride {_axes(self.stride)}",
            f"dilation {_axes(self.dilation)}",
            f"causal {_axes(self.is_causal)}",
        ]
        if self.extra_kv:
            parts.append(f"extra kv {self.extra_kv}")
        parts.append(self.dtype)
        return "  ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("seed", None)
        for key in ("input_size", "kernel_size", "stride", "dilation", "is_causal"):
            d[key] = list(d[key])
        d["rank"] = self.rank
        return d

    # ---- inputs and calls ------------------------------------------------------------

    def make_inputs(self, requires_grad: bool = False) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)

        def rand(*shape):
            t = torch.randn(*shape, generator=gen, dtype=torch.float32)
            t = t.to(device=self.device, dtype=self.torch_dtype)
            return t.requires_grad_(requires_grad)

        B, S = self.batch, self.input_size
        inputs = {
            "query": rand(B, *S, self.heads, self.dim),
            "key": rand(B, *S, self.heads_kv, self.dim),
            "value": rand(B, *S, self.heads_kv, self.dim_value),
        }
        if self.extra_kv:
            inputs["additional_keys"] = rand(B, self.extra_kv, self.heads_kv, self.dim)
            inputs["additional_values"] = rand(B, self.extra_kv, self.heads_kv, self.dim_value)
        return inputs

    def call(self, inputs: dict, backend: Optional[str], tiles: Optional[dict] = None):
        """Run the public API once on ``inputs`` with a backend (AUTO: backend=None) and tile
        shapes (q_tile_shape, kv_tile_shape, backward_q_tile_shape, backward_kv_tile_shape)."""
        return self.op(
            kernel_size=self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            is_causal=self.is_causal,
            backend=None if backend == AUTO else backend,
            **inputs,
            **(tiles or {}),
        )
