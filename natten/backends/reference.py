"""The reference CUDA backend: plain CUDA kernels (no tensor cores) for any NVIDIA GPU the
toolkit targets; the always-correct GPU fallback, unfused ops included, and the one GPU backend
that runs float64 (accumulating in double), so backend=None sends float64 here."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from natten._checks import FusedProblem
from natten.backends.base import Tile, missing_kernels
from natten.backends.compiled import CompiledBackend, extension

# Lanes of a warp each hold up to this many head-dim elements / 32.
MAX_HEAD_DIM = 512


class ReferenceBackend(CompiledBackend):
    name = "reference"
    device_type = "cuda"

    def is_available(self) -> bool:
        try:
            return bool(extension().with_cuda) and torch.cuda.is_available()
        except ImportError:
            return False

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        if problem.device.type != "cuda":
            return f"inputs are on {problem.device}, the reference backend runs on CUDA GPUs"
        if max(problem.dim, problem.dim_v) > MAX_HEAD_DIM:
            return f"head dims {problem.dim}/{problem.dim_v} exceed {MAX_HEAD_DIM}"
        return missing_kernels(self.name, ("fna_fwd", "fna_bwd"), problem.rank, problem.dtype)

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile,
                    backward: bool = False) -> Optional[str]:
        # One warp per query: the kernels have no tiles, so any shape is accepted and ignored.
        return None

    def default_tiles(self, problem: FusedProblem, backward: bool) -> Tuple[Tile, Tile]:
        return (1,) * problem.rank, (1,) * problem.rank
