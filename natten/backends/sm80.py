"""The cutlass-fna backend: fused kernels on tensor cores (CuTe, mma.sync + cp.async) for
Ampere and every later NVIDIA GPU, from the `sm80` family of natten._C. Float32 runs on TF32
tensor cores."""

from __future__ import annotations

import math
from typing import Optional

import torch

from natten._checks import FusedProblem
from natten.backends.base import Tile, tf32_allowed
from natten.backends.tiled import TiledBackend, walk_elements


# A 64-query box walks fewer keys per query than a 128-query one, but reads each key box from
# shared memory for half as many queries: count its work as this much dearer. Measured on an H100
# (bf16, 2-D): at head dim 128 a 64-query box does 1.45x the time per score element (P2: 8x8
# 1.69 ms against 8x16 1.39 ms for 0.83x the elements); at head dim 32 about the same time (P4).
def _small_box_penalty(head_dim: int) -> float:
    return 1.45 if head_dim >= 128 else 1.15 if head_dim >= 64 else 1.0


class Sm80Backend(TiledBackend):
    name = "cutlass-fna"
    family = "sm80"

    def tile_cost(self, problem: FusedProblem, q_box: Tile, kv_box: Tile) -> float:
        """Score elements computed, a box of fewer than 128 queries counted dearer."""
        small = math.prod(q_box) < 128
        penalty = _small_box_penalty(max(problem.dim, problem.dim_v)) if small else 1.0
        return walk_elements(problem, q_box, kv_box) * penalty

    def query_range_unsupported(self, problem: FusedProblem) -> Optional[str]:
        return None  # query boxes tile only the range, forward and backward (common/tile_geometry.cuh)

    def dtype_note(self) -> str:
        return " (float32 on TF32 tensor cores)"

    def passed_over(self, problem: FusedProblem) -> Optional[str]:
        # As torch's own float32 matrix products: TF32 only where the user allows it.
        if problem.dtype == torch.float32 and not tf32_allowed():
            return ("float32 runs on TF32 tensor cores here, which torch does not allow now "
                    "(torch.backends.cuda.matmul.fp32_precision / torch.set_float32_matmul_precision)")
        return None
