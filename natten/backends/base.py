"""The interface every backend implements, and output allocation shared by all of them."""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, List, Optional, Tuple

import torch

from natten._checks import FusedProblem, Window

Tile = Tuple[int, ...]


# Output buffers. With NATTEN_POISON_OUTPUTS=1 they start as NaN, so an element a kernel forgets
# to write cannot pass a comparison; the variable is read once, so it must be set before natten is
# imported (tests/conftest.py does). Otherwise they are torch's own factories, called directly:
# every call layer costs host time, and *_like / new_* take half the time of torch.empty with a
# device.
if os.environ.get("NATTEN_POISON_OUTPUTS") == "1":
    def output_like(like: torch.Tensor) -> torch.Tensor:
        """An output of like's shape, dtype and device; dense where `like` is."""
        return torch.full_like(like, math.nan)

    def new_output(like: torch.Tensor, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """An output of this shape on like's device, of like's dtype unless given."""
        return like.new_full(shape, math.nan, dtype=dtype)
else:
    output_like = torch.empty_like
    new_output = torch.Tensor.new_empty


# torch.compile cannot trace the settings' getters; it calls this once per trace instead (and
# guards on the settings, so changing them recompiles).
@torch.compiler.assume_constant_result
def tf32_allowed() -> bool:
    """Whether torch lets float32 matrix products run on TF32 tensor cores (both of its APIs:
    torch.backends.cuda.matmul.fp32_precision, else torch.set_float32_matmul_precision)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}


def manifest_rows() -> Optional[tuple]:
    """The generated manifest's rows (natten._manifest.Key: family, op, rank, dtype, head dim,
    query box, key box), or None when natten._C is not built."""
    try:
        from natten._manifest import INSTANTIATIONS
    except ImportError:
        return None
    return INSTANTIATIONS


def manifest_archs() -> dict:
    """CUDA family -> the compute capabilities the build compiled it for ({} without CUDA)."""
    try:
        from natten._manifest import ARCHS
    except ImportError:
        return {}
    return ARCHS


# (family, op, rank, dtype) of every instantiation, gathered once: a set built per call took
# longer than a small kernel runs.
_PRESENT = None if manifest_rows() is None else frozenset(
    (row.family, row.op, row.rank, row.dtype) for row in manifest_rows())


def missing_kernels(family: str, ops, rank: int, dtype: torch.dtype) -> Optional[str]:
    """Why the build lacks the instantiations an op needs (from the generated manifest that
    lists exactly what natten._C was compiled with), or None when all are there."""
    if _PRESENT is None:
        return "natten._C is not built"
    name = DTYPE_NAMES[dtype]
    absent = [op for op in ops if (family, op, rank, name) not in _PRESENT]
    if absent:
        return (f"this build has no {family} kernels {', '.join(absent)} for rank {rank} and "
                f"{name} (see NATTEN_KERNEL_FILTER)")
    return None


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Backend:
    """A way to run neighbourhood attention on one kind of device."""

    name: str = ""
    device_type: str = ""

    def is_available(self) -> bool:
        raise NotImplementedError

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        """Why this backend cannot run the fused problem, or None when it can."""
        raise NotImplementedError

    def query_range_unsupported(self, problem: FusedProblem) -> Optional[str]:
        """Why this backend cannot compute only a range of the queries (Window.query_range) of a
        problem it can run whole, or None. Callers that can fall back to computing every query
        (natten.distributed) ask this first."""
        return f"the {self.name} kernels compute every query of the grid"

    def passed_over(self, problem: FusedProblem) -> Optional[str]:
        """Why backend=None passes over this backend for a problem it can run (asked for by
        name, it runs), or None. Not memoized: the answer may follow torch's global settings."""
        return None

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile,
                    backward: bool = False) -> Optional[str]:
        """Why the tile shapes do not fit this backend and problem, or None."""
        raise NotImplementedError

    def default_tiles(self, problem: FusedProblem, backward: bool) -> Tuple[Tile, Tile]:
        raise NotImplementedError

    def tile_configs(self, problem: FusedProblem, backward: bool) -> List[Tuple[Tile, Tile]]:
        """(query tile, key tile) pairs worth timing for the problem (the profiler's
        --sweep-tiles): the default alone, unless the backend has several kernels to pick from."""
        return [self.default_tiles(problem, backward)]

    def fna_forward(self, q, k, v, extra_k, extra_v, window: Window, scale: float,
                    q_tile: Tile, kv_tile: Tile) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (out [B,*S,H,Dv], lse [B,*S,H]); inputs are dense."""
        raise NotImplementedError

    def fna_backward(self, d_out, d_lse, q, k, v, extra_k, extra_v, out, lse, window: Window,
                     scale: float, q_tile: Tile, kv_tile: Tile):
        """Returns (d_q, d_k, d_v, d_extra_k or None, d_extra_v or None); d_lse may be None."""
        raise NotImplementedError

    def bind(self, problem: FusedProblem, scale: float, q_tile: Tile, kv_tile: Tile,
             backward: bool) -> Callable:
        """fna_backward (backward=True) or fna_forward with all but its tensors bound, which the
        eager calls of one plan run; a backend overrides it to do its per-call lookups once."""
        op = self.fna_backward if backward else self.fna_forward
        return functools.partial(op, window=problem.window, scale=scale, q_tile=q_tile, kv_tile=kv_tile)

    # Unfused ops (attention weights materialised); backends without them leave these.
    supports_unfused: bool = False

    def na_qk(self, q, k, rpb, window: Window) -> torch.Tensor:
        raise NotImplementedError

    def na_qk_backward(self, d_attn, q, k, has_rpb: bool, window: Window):
        raise NotImplementedError

    def na_av(self, attn, v, window: Window) -> torch.Tensor:
        raise NotImplementedError

    def na_av_backward(self, d_out, attn, v, window: Window):
        raise NotImplementedError
