"""The fixed GPU benchmark problem set (bfloat16, heads-last [B, *S, H, D]) and tiny
stand-ins of the same geometry kinds for smoke runs on the CPU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Problem:
    name: str
    batch: int
    spatial: Tuple[int, ...]
    heads: int
    dim: int
    kernel: Tuple[int, ...]
    dilation: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    causal: Tuple[bool, ...] = ()

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def per_axis(self, field: str, default):
        value = getattr(self, field)
        return value if value else (default,) * self.rank

    def describe(self) -> str:
        s = "x".join(map(str, self.spatial))
        k = "x".join(map(str, self.kernel))
        extra = ""
        if self.dilation and any(d != 1 for d in self.dilation):
            extra += " dilation " + "x".join(map(str, self.dilation))
        return f"{self.name}: {self.rank}-D {self.batch}x{s}, H{self.heads}, D{self.dim}, kernel {k}{extra}"


PROBLEMS: Dict[str, Problem] = {p.name: p for p in (
    Problem("P1", 1, (32768,), 16, 128, (2048,)),
    Problem("P2", 1, (128, 128), 16, 128, (32, 32)),
    Problem("P3", 1, (16, 64, 64), 16, 128, (8, 16, 16)),
    Problem("P4", 32, (56, 56), 4, 32, (7, 7)),
    Problem("P5", 32, (56, 56), 4, 32, (7, 7), dilation=(8, 8)),
)}

# Same kinds of problems, small enough for the CPU smoke mode (--device cpu --tiny).
TINY: Dict[str, Problem] = {p.name: p for p in (
    Problem("P1", 1, (512,), 2, 32, (64,)),
    Problem("P2", 1, (24, 24), 2, 32, (8, 8)),
    Problem("P3", 1, (4, 12, 12), 2, 32, (2, 4, 4)),
    Problem("P4", 2, (14, 14), 2, 16, (7, 7)),
    Problem("P5", 2, (16, 16), 2, 16, (3, 3), dilation=(4, 4)),
)}
