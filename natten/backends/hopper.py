"""The hopper-fna backend: fused kernels on Hopper tensor cores (wgmma, TMA), sm_90a only, from
the `sm90` family of natten._C.

The family's kernels are not written yet: its entry points exist and decline every problem, so
this backend does too, with the reason, until they land."""

from __future__ import annotations

from typing import Optional

from natten._checks import FusedProblem
from natten.backends.tiled import TiledBackend


class HopperBackend(TiledBackend):
    name = "hopper-fna"
    family = "sm90"

    def unsupported(self, problem: FusedProblem) -> Optional[str]:
        return (super().unsupported(problem)
                or "hopper-fna has no kernels yet (its entry points decline every problem)")
