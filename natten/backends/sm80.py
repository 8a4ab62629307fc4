"""The cutlass-fna backend: fused kernels on tensor cores (CuTe, mma.sync + cp.async) for
Ampere and every later NVIDIA GPU, from the `sm80` family of natten._C.

Which (rank, dtype, head dim, query box, key box) instantiations exist comes from the generated
manifest; a problem's head dims are padded up to the smallest instantiated head dim that holds
them (multiples of 8 only: rows move in 16-byte pieces).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from natten._checks import FusedProblem
from natten._memo import memoize
from natten.backends.base import Tile, manifest_rows, tf32_allowed
from natten.backends.compiled import CompiledBackend, extension

FAMILY = "sm80"
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
# A 64-query box walks fewer keys per query than a 128-query one, but reads each key box from
# shared memory for half as many queries: count its work as this much dearer. Measured on an H100
# (bf16, 2-D): at head dim 128 a 64-query box does 1.45x the time per score element (P2: 8x8
# 1.69 ms against 8x16 1.39 ms for 0.83x the elements); at head dim 32 about the same time (P4).
def _small_box_penalty(head_dim: int) -> float:
    return 1.45 if head_dim >= 128 else 1.15 if head_dim >= 64 else 1.0


def _index() -> Dict[Tuple[str, int, str], Dict[int, List[Tuple[Tile, Tile]]]]:
    index: Dict[Tuple[str, int, str], Dict[int, List[Tuple[Tile, Tile]]]] = {}
    for family, op, rank, dtype, hd, q_box, kv_box in manifest_rows() or ():
        if family == FAMILY:
            index.setdefault((op, rank, dtype), {}).setdefault(hd, []).append((q_box, kv_box))
    return index


# (op, rank, dtype) -> head dim -> (query box, key box) pairs in manifest order; scanning the
# manifest on every call cost more host time than a small kernel runs.
_INDEX = _index()


def _op(backward: bool) -> str:
    return "fna_bwd" if backward else "fna_fwd"


def head_dims(rank: int, dtype: torch.dtype, backward: bool) -> List[int]:
    return sorted(_INDEX.get((_op(backward), rank, _DTYPES.get(dtype)), ()))


def configs(problem: FusedProblem, backward: bool) -> List[Tuple[Tile, Tile]]:
    """(query box, key box) pairs instantiated for the problem's rank, dtype and head dim."""
    hd = instantiated_head_dim(problem, backward)
    by_dim = _INDEX.get((_op(backward), problem.rank, _DTYPES.get(problem.dtype)), {})
    return list(by_dim.get(hd, ()))


def instantiated_head_dim(problem: FusedProblem, backward: bool) -> Optional[int]:
    return _fitting_head_dim(problem.rank, problem.dtype, max(problem.dim, problem.dim_v), backward)


@memoize  # the operators pad per call; sorting the head dims took longer than a small kernel runs
def _fitting_head_dim(rank: int, dtype: torch.dtype, need: int, backward: bool) -> Optional[int]:
    """The smallest instantiated head dim holding `need` (head dims are padded up to it)."""
    fits = [d for d in head_dims(rank, dtype, backward) if d >= need]
    return fits[0] if fits else None


def walk_cost(problem: FusedProblem, q_box: Tile, kv_box: Tile) -> float:
    """Score elements a problem computes per (batch, head) with these boxes: per axis, the query
    boxes of every dilation group times the keys their walk covers (the union of t consecutive
    windows spans about t + k - 1 keys, counted in whole key boxes)."""
    cost = 1.0
    for L, k, d, tq, tk in zip(problem.spatial, problem.window.kernel_size, problem.window.dilation,
                               q_box, kv_box):
        group = math.ceil(L / d)
        span = min(tq + k - 1, group)
        cost *= d * math.ceil(group / tq) * tq * math.ceil(span / tk) * tk
    small = math.prod(q_box) < 128
    return cost * (_small_box_penalty(max(problem.dim, problem.dim_v)) if small else 1.0)


class Sm80Backend(CompiledBackend):
    name = "cutlass-fna"
    device_type = "cuda"
    supports_unfused = False

    def _kernel(self, op: str):
        return getattr(extension(), f"{FAMILY}_{op}")

    def is_available(self) -> bool:
        try:
            return (bool(extension().with_cuda) and hasattr(extension(), f"{FAMILY}_fna_forward")
                    and torch.cuda.is_available())
        except ImportError:
            return False

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        if problem.device.type != "cuda":
            return f"inputs are on {problem.device}; cutlass-fna runs on CUDA GPUs"
        major, minor = torch.cuda.get_device_capability(problem.device)
        if major < 8:
            return (f"compute capability {major}.{minor} ({problem.device}) is not supported by cutlass-fna, "
                    "which needs 8.0 or newer")
        if problem.dtype not in _DTYPES:
            return (f"{str(problem.dtype).replace('torch.', '')} is not supported by cutlass-fna, which runs "
                    "float16, bfloat16 and float32 (on TF32 tensor cores)")
        if problem.dim % 8 or problem.dim_v % 8:
            return (f"head dims {problem.dim}/{problem.dim_v} are not supported by cutlass-fna, which needs "
                    "multiples of 8")
        if max(problem.batch, problem.heads) > 65535:
            return "more than 65535 batch entries or heads are not supported by cutlass-fna"
        if math.prod(problem.spatial) > 2**31 - 1:
            return "more than 2^31 - 1 tokens per batch entry are not supported by cutlass-fna"
        for backward in (False, True) if problem.requires_grad else (False,):
            if instantiated_head_dim(problem, backward) is None:
                dims = head_dims(problem.rank, problem.dtype, backward)
                what = "backward" if backward else "forward"
                return (f"head dim {max(problem.dim, problem.dim_v)} is not supported by this build's "
                        f"cutlass-fna {what} kernels for rank {problem.rank} and {_DTYPES[problem.dtype]} "
                        f"(instantiated head dims: {dims or 'none'}; see NATTEN_KERNEL_FILTER)")
        return None

    def passed_over(self, problem: FusedProblem) -> Optional[str]:
        # As torch's own float32 matrix products: TF32 only where the user allows it.
        if problem.dtype == torch.float32 and not tf32_allowed():
            return ("float32 runs on TF32 tensor cores here, which torch does not allow now "
                    "(torch.backends.cuda.matmul.fp32_precision / torch.set_float32_matmul_precision)")
        return None

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile,
                    backward: bool = False) -> Optional[str]:
        available = configs(problem, backward)
        if (tuple(q_tile), tuple(kv_tile)) in available:
            return None
        listed = ", ".join(f"{q}/{kv}" for q, kv in available) or "none"
        return f"not an instantiated (query box, key box) pair; this problem has: {listed}"

    def default_tiles(self, problem: FusedProblem, backward: bool) -> Tuple[Tile, Tile]:
        """The rule: the instantiated pair of least walk_cost (ties: the larger query box)."""
        available = configs(problem, backward)
        if not available:
            return (1,) * problem.rank, (1,) * problem.rank  # check_tiles reports it
        return min(available, key=lambda c: (walk_cost(problem, *c), -math.prod(c[0])))

    def tile_configs(self, problem: FusedProblem, backward: bool) -> List[Tuple[Tile, Tile]]:
        return configs(problem, backward)

    def _tile_args(self, rank, dtype, head_dim, q_tile: Tile, kv_tile: Tile, backward: bool) -> list:
        return [_fitting_head_dim(rank, dtype, head_dim, backward), list(q_tile), list(kv_tile)]
