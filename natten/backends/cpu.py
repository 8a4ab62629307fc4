"""The CPU backend: fused and unfused kernels of natten._C (C++, at::parallel_for, BLAS)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

from natten._checks import FusedProblem
from natten.backends.base import Tile, missing_kernels
from natten.backends.compiled import CompiledBackend, extension


# Keys per chunk of the fused kernels; a chunk's scores stay in the core's cache.
_KV_CHUNK = 512


def _default_q_tile(problem: FusedProblem) -> Tile:
    """About 64 queries per tile, shaped like the window: per axis the tile grows with the
    kernel, since the key box of a tile is (tile + kernel - 1) long and the work wasted on keys
    outside a query's window shrinks as the tile gets small next to the kernel."""
    rank = problem.rank
    budget = 64
    tile = [1] * rank
    kernels = problem.window.kernel_size
    groups = [math.ceil(L / d) for L, d in zip(problem.query_spatial, problem.window.dilation)]
    while True:
        # Grow the axis where doubling costs the least extra key work, relative to its kernel.
        candidates = [a for a in range(rank) if tile[a] < groups[a] and math.prod(tile) * 2 <= budget]
        if not candidates:
            return tuple(tile)
        a = min(candidates, key=lambda a: (tile[a] / kernels[a], -a))
        tile[a] = min(tile[a] * 2, groups[a])


def _kv_tile(rank: int) -> Tile:
    side = round(_KV_CHUNK ** (1 / rank))
    return (side,) * (rank - 1) + (_KV_CHUNK // side ** (rank - 1),)


class CpuBackend(CompiledBackend):
    name = "cpu"
    device_type = "cpu"

    def is_available(self) -> bool:
        try:
            extension()
        except ImportError:
            return False
        return True

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        if problem.device.type != "cpu":
            return f"inputs are on {problem.device}, the cpu backend runs on the CPU"
        return missing_kernels(self.name, ("fna_fwd", "fna_bwd"), problem.rank, problem.dtype)

    def query_range_unsupported(self, problem: FusedProblem) -> Optional[str]:
        return None  # the kernels tile only the range (cpu/fna_tile.h)

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile,
                    backward: bool = False) -> Optional[str]:
        # Any positive tile works: query tiles are clipped to each dilation group, and the key
        # tile only bounds how many keys are scored at once (its product is the chunk size).
        return None

    def default_tiles(self, problem: FusedProblem, backward: bool) -> Tuple[Tile, Tile]:
        return _default_q_tile(problem), _kv_tile(problem.rank)

    def _tile_args(self, rank, dtype, head_dim, q_tile: Tile, kv_tile: Tile, backward: bool) -> list:
        return [list(q_tile), math.prod(kv_tile)]
