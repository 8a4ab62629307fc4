"""The hopper-fna backend: fused kernels on Hopper tensor cores (wgmma, TMA), sm_90a only, from
the `sm90` family of natten._C. The family's kernels are not written yet: its entry points exist
and decline every problem, and so does this backend, saying why."""

from natten.backends.tiled import TiledBackend


class HopperBackend(TiledBackend):
    name = "hopper-fna"
    family = "sm90"
    has_kernels = False
