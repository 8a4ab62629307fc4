"""What every tiled kernel family's backend shares: the family's instantiations from the
generated manifest (per op, rank and dtype: head dims and (query box, key box) pairs), head-dim
padding, the capability check against the targets the build compiled, the default-tile rule and
its cost, and the kernels bound once per plan through the binding's one pair of tiled entry
points.

A family's backend is a small subclass naming its family and backend, with hooks for what
differs: `tile_cost` (the rule's measure), `passed_over`, `dtype_note`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from natten._checks import FusedProblem
from natten._memo import memoize
from natten.backends.base import DTYPE_NAMES, Tile, manifest_archs, manifest_rows
from natten.backends.compiled import CompiledBackend, extension

_OPS = {False: "fna_fwd", True: "fna_bwd"}


@memoize
def tile_key_ranges(extent: int, kernel: int, stride: int, dilation: int, causal: bool,
                    tile: int) -> list:
    """Per query tile of `tile` coordinates, dilation group by group: (first, last, full_first,
    full_last), the keys the tile reaches and those all its queries see, from the extension's
    one definition (common/na_window.h: tile_key_range)."""
    return extension().tile_key_ranges(extent, kernel, stride, dilation, causal, tile)


def walk_elements(problem: FusedProblem, q_box: Tile, kv_box: Tile) -> int:
    """Score elements a tiled kernel computes per (batch, head) with these boxes: per axis, over
    the query boxes of every dilation group, the box's queries times the keys of its walk, which
    runs in whole key boxes from the first key the box reaches (common/tile_geometry.cuh:
    KeyWalk). Walks are products of per-axis walks, so the total is the product over axes."""
    w = problem.window
    total = 1
    for a, (tq, tk) in enumerate(zip(q_box, kv_box)):
        ranges = tile_key_ranges(problem.spatial[a], w.kernel_size[a], w.stride[a], w.dilation[a],
                                 w.is_causal[a], tq)
        total *= sum(tq * math.ceil((last - first + 1) / tk) * tk for first, last, _, _ in ranges)
    return total


class TiledBackend(CompiledBackend):
    """The backend of one tiled family (autogen/registry.py) of natten._C."""

    family: str = ""
    device_type = "cuda"
    supports_unfused = False
    head_dim_multiple = 8  # rows move in 16-byte pieces

    def __init__(self):
        # (op, rank, dtype name) -> head dim -> (query box, key box) pairs in manifest order;
        # scanning the manifest on every call cost more host time than a small kernel runs.
        self._index: Dict[Tuple[str, int, str], Dict[int, List[Tuple[Tile, Tile]]]] = {}
        for row in manifest_rows() or ():
            if row.family == self.family:
                by_dim = self._index.setdefault((row.op, row.rank, row.dtype), {})
                by_dim.setdefault(row.head_dim, []).append((row.q_tile, row.kv_tile))
        self._dtypes = sorted({dtype for _, _, dtype in self._index})
        self._targets = manifest_archs().get(self.family, ())

    # Hooks ---------------------------------------------------------------------------------

    def tile_cost(self, problem: FusedProblem, q_box: Tile, kv_box: Tile) -> float:
        """What the default-tile rule minimises: by default the score elements computed."""
        return walk_elements(problem, q_box, kv_box)

    def dtype_note(self) -> str:
        """Said after the dtypes the family runs, in messages."""
        return ""

    # Manifest ------------------------------------------------------------------------------

    def head_dims(self, rank: int, dtype: torch.dtype, backward: bool) -> List[int]:
        return sorted(self._index.get((_OPS[backward], rank, DTYPE_NAMES.get(dtype)), ()))

    def configs(self, problem: FusedProblem, backward: bool) -> List[Tuple[Tile, Tile]]:
        """(query box, key box) pairs instantiated for the problem's rank, dtype and head dim."""
        hd = self.instantiated_head_dim(problem, backward)
        by_dim = self._index.get((_OPS[backward], problem.rank, DTYPE_NAMES.get(problem.dtype)), {})
        return list(by_dim.get(hd, ()))

    def instantiated_head_dim(self, problem: FusedProblem, backward: bool) -> Optional[int]:
        return self._fitting_head_dim(problem.rank, problem.dtype, max(problem.dim, problem.dim_v), backward)

    @memoize  # the operators pad per call; sorting the head dims took longer than a small kernel runs
    def _fitting_head_dim(self, rank: int, dtype: torch.dtype, need: int, backward: bool) -> Optional[int]:
        """The smallest instantiated head dim holding `need` (head dims are padded up to it)."""
        fits = [d for d in self.head_dims(rank, dtype, backward) if d >= need]
        return fits[0] if fits else None

    # Backend -------------------------------------------------------------------------------

    def is_available(self) -> bool:
        try:
            return bool(extension().with_cuda) and bool(self._index) and torch.cuda.is_available()
        except ImportError:
            return False

    def _runs_on(self, capability: Tuple[int, int]) -> bool:
        """Whether a built target runs on the device: the same major version, no newer minor
        (9.0 is built as sm_90a, which runs on 9.0 alone)."""
        targets = [tuple(int(x) for x in t.split(".")) for t in self._targets]
        return any(major == capability[0] and minor <= capability[1] for major, minor in targets)

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        name = self.name
        if problem.device.type != "cuda":
            return f"inputs are on {problem.device}; {name} runs on CUDA GPUs"
        major, minor = torch.cuda.get_device_capability(problem.device)
        if not self._runs_on((major, minor)):
            return (f"compute capability {major}.{minor} ({problem.device}) is not supported by {name}, "
                    f"whose kernels this build compiled for {', '.join(self._targets) or 'no GPU'}")
        dtype = DTYPE_NAMES.get(problem.dtype, str(problem.dtype).replace("torch.", ""))
        if dtype not in self._dtypes:
            return (f"{dtype} is not supported by {name}, which runs {', '.join(self._dtypes)}"
                    f"{self.dtype_note()}")
        m = self.head_dim_multiple
        if problem.dim % m or problem.dim_v % m:
            return (f"head dims {problem.dim}/{problem.dim_v} are not supported by {name}, which needs "
                    f"multiples of {m}")
        if max(problem.batch, problem.heads) > 65535:
            return f"more than 65535 batch entries or heads are not supported by {name}"
        if math.prod(problem.spatial) > 2**31 - 1:
            return f"more than 2^31 - 1 tokens per batch entry are not supported by {name}"
        for backward in (False, True) if problem.requires_grad else (False,):
            if self.instantiated_head_dim(problem, backward) is None:
                dims = self.head_dims(problem.rank, problem.dtype, backward)
                what = "backward" if backward else "forward"
                return (f"head dim {max(problem.dim, problem.dim_v)} is not supported by this build's "
                        f"{name} {what} kernels for rank {problem.rank} and {dtype} "
                        f"(instantiated head dims: {dims or 'none'}; see NATTEN_KERNEL_FILTER)")
        return None

    def check_tiles(self, problem: FusedProblem, q_tile: Tile, kv_tile: Tile,
                    backward: bool = False) -> Optional[str]:
        available = self.configs(problem, backward)
        if (tuple(q_tile), tuple(kv_tile)) in available:
            return None
        listed = ", ".join(f"{q}/{kv}" for q, kv in available) or "none"
        return f"not an instantiated (query box, key box) pair; this problem has: {listed}"

    def default_tiles(self, problem: FusedProblem, backward: bool) -> Tuple[Tile, Tile]:
        """The rule: the instantiated pair of least tile_cost (ties: the larger query box, then
        the earlier pair of the registry)."""
        available = self.configs(problem, backward)
        if not available:
            return (1,) * problem.rank, (1,) * problem.rank  # check_tiles reports it
        return min(available, key=lambda c: (self.tile_cost(problem, *c), -math.prod(c[0])))

    def tile_configs(self, problem: FusedProblem, backward: bool) -> List[Tuple[Tile, Tile]]:
        return self.configs(problem, backward)

    def _kernel(self, op: str):
        return getattr(extension(), f"tiled_{op}")

    def _tile_args(self, rank, dtype, head_dim, q_tile: Tile, kv_tile: Tile, backward: bool) -> list:
        key = (self.family, _OPS[backward], rank, DTYPE_NAMES[dtype],
               self._fitting_head_dim(rank, dtype, head_dim, backward), tuple(q_tile), tuple(kv_tile))
        return [_find_kernel(key)]


@memoize  # one lookup per key: the kernel handle is what every call of a plan passes
def _find_kernel(key: tuple):
    """The binding's handle of a tiled instantiation, looked up by the manifest's key fields (a
    miss raises naming the key in words)."""
    from natten._manifest import Key

    fields = Key(*key)._asdict()
    return extension().find_tiled_kernel(fields.pop("family"), fields.pop("op"), fields)
