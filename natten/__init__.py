"""natten: neighborhood attention over 1-D, 2-D and 3-D token grids."""

from natten import flops
from natten.functional import fused_na1d, fused_na2d, fused_na3d, na1d, na2d, na3d
from natten.merge import merge_attentions
from natten.modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from natten.tuning import autotune
from natten import distributed  # noqa: E402  (needs the ops above)

__version__ = "0.1.0"

__all__ = [
    "na1d", "na2d", "na3d", "fused_na1d", "fused_na2d", "fused_na3d", "merge_attentions",
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D", "flops",
    "autotune",
]
