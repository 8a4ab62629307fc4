"""The hopper-fna backend: fused kernels on Hopper tensor cores (wgmma, TMA), sm_90a only, from
the `sm90` family of natten._C, forward and backward.

The kernels load query and key boxes of the heads-last tensors with TMA, which bounds what they
serve beyond the tiled families' common checks (cutlass_kernels/sm90/fwd_params.h); the backward
loads through the forward's descriptors, so the same bounds hold for its boxes."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from natten._checks import FusedProblem
from natten.backends.base import Tile
from natten.backends.tiled import TiledBackend

# TMA limits: a traversal stride (the dilation) of at most 8 positions, and a box (a tile's
# extent times the dilation, on a dilated axis) of at most 256 positions per axis.
_MAX_DILATION = 8
_MAX_BOX_SPAN = 256

# backend=None takes hopper-fna over cutlass-fna, forward and backward alike, only for problems
# of at least this many query rows (query tokens x heads x batch: 256 CTAs of 128 queries, about
# two waves on an H100)...
_MIN_ROWS = 32 * 1024
# ...whose windows hold at least one key box (the 128 keys of every instantiated pair): with
# smaller windows most of each box a walk loads is masked, and the SM80 kernels' 64-key boxes
# waste less. Measured on an H200 (benchmarks/NOTES.md): on P1-P3 hopper-fna is 1.8-2.1x faster
# than cutlass-fna forward and 1.7-1.9x forward+backward; on P4 (7x7 windows, head dim 32) they
# tie forward+backward and cutlass-fna is 13% faster forward; on P5 (the same, dilated) cutlass-fna
# is 2.1x faster forward and 1.5x forward+backward.
_MIN_WINDOW_KEYS = 128


def _tma_limit(problem: FusedProblem, q_tile: Tile, kv_tile: Tile) -> Optional[str]:
    """Why the TMA loads of these boxes cannot stride over the problem's dilation, or None."""
    for axis, d in enumerate(problem.window.dilation):
        if d > _MAX_DILATION:
            return (f"dilation {d} on axis {axis} is not supported by hopper-fna: it exceeds "
                    f"{_MAX_DILATION}, the largest stride of its TMA loads")
        span = d * max(q_tile[axis], kv_tile[axis])
        if d > 1 and span > _MAX_BOX_SPAN:
            return (f"dilation {d} on axis {axis} with tile extents {q_tile[axis]}/{kv_tile[axis]} "
                    f"is not supported by hopper-fna: the tiles span {span} positions, more than "
                    f"the {_MAX_BOX_SPAN} of a TMA box")
    return None


class HopperBackend(TiledBackend):
    name = "hopper-fna"
    family = "sm90"
    # Its backward adds dQ partials from many CTAs in no fixed order, except under
    # torch.use_deterministic_algorithms(True), which the binding passes to the kernels: then dQ
    # has a pass of its own with one writer per element (cutlass_kernels/sm90/bwd_launch.cuh).

    def configs(self, problem: FusedProblem, backward: bool) -> List[Tuple[Tile, Tile]]:
        """The instantiated pairs whose boxes TMA can load for the problem's dilation."""
        return [c for c in super().configs(problem, backward) if _tma_limit(problem, *c) is None]

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        reason = super().unsupported(problem)
        if reason is not None:
            return reason
        for backward in (False, True) if problem.requires_grad else (False,):
            if not self.configs(problem, backward):
                return _tma_limit(problem, *super().configs(problem, backward)[0])
        tokens = math.prod(problem.spatial)
        if (problem.batch * tokens * problem.heads > 2**31 - 1
                or problem.batch * problem.num_extra * problem.heads_kv > 2**31 - 1):
            return ("more than 2^31 - 1 rows of batch x tokens x heads (or of batch x additional "
                    "keys x key heads) are not supported by hopper-fna, whose TMA coordinates are "
                    "32-bit")
        return None

    def query_range_unsupported(self, problem: FusedProblem) -> Optional[str]:
        # Query boxes tile only the range, forward and backward; Q, dO and the rows they index
        # are loaded from the range's grid (cutlass_kernels/sm90/fwd_params.h).
        return None

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile,
                    backward: bool = False) -> Optional[str]:
        return (_tma_limit(problem, q_tile, kv_tile)
                or super().check_tiles(problem, q_tile, kv_tile, backward))

    def passed_over(self, problem: FusedProblem) -> Optional[str]:
        # Under torch.compile the sizes are symbols: the comparison becomes a guard (a compiled
        # call whose sizes cross the bound recompiles once), and the message must not print them,
        # which would specialise the graph on their values.
        rows = problem.batch * math.prod(problem.spatial) * problem.heads
        if rows < _MIN_ROWS:
            return (f"fewer query rows (batch x tokens x heads) than the {_MIN_ROWS} from which "
                    "hopper-fna is preferred")
        keys = math.prod(problem.window.kernel_size)
        if keys < _MIN_WINDOW_KEYS:
            return (f"windows of {keys} keys are smaller than hopper-fna's key boxes of "
                    f"{_MIN_WINDOW_KEYS}, which it is preferred from")
        return None
