"""Which kernel instantiations exist: the single source of truth.

The generator writes one translation unit per entry, the C++ dispatch table and the
manifest that the Python runtime reads; setup.py compiles exactly the generated files.
"""

from __future__ import annotations

from dataclasses import dataclass

# dtype name -> (CPU storage type, natten::DType enumerator)
DTYPES = {
    "float32": ("float", "DType::kFloat32"),
    "float64": ("double", "DType::kFloat64"),
    "float16": ("Half", "DType::kFloat16"),
    "bfloat16": ("BFloat16", "DType::kBFloat16"),
}

# op name -> (C++ function template, header, kind). Fused kernels take a tile config.
CPU_OPS = {
    "fna_fwd": ("fna_forward", "cpu/fna_forward.h", "fused"),
    "fna_bwd": ("fna_backward", "cpu/fna_backward.h", "fused"),
    "na_qk_fwd": ("na_qk_forward", "cpu/na_unfused.h", "unfused"),
    "na_qk_bwd": ("na_qk_backward", "cpu/na_unfused.h", "unfused"),
    "na_av_fwd": ("na_av_forward", "cpu/na_unfused.h", "unfused"),
    "na_av_bwd": ("na_av_backward", "cpu/na_unfused.h", "unfused"),
}
CPU_RANKS = (1, 2, 3)
CPU_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class CpuKernel:
    op: str
    rank: int
    dtype: str
    family: str = "cpu"

    @property
    def name(self) -> str:
        return f"{self.op}_{self.rank}d_{self.dtype}_{self.family}"

    @property
    def function(self) -> str:
        return CPU_OPS[self.op][0]

    @property
    def header(self) -> str:
        return CPU_OPS[self.op][1]

    @property
    def kind(self) -> str:
        return CPU_OPS[self.op][2]

    @property
    def cpp_type(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def cpp_dtype(self) -> str:
        return DTYPES[self.dtype][1]


def cpu_kernels() -> list[CpuKernel]:
    return [CpuKernel(op, rank, dtype) for op in CPU_OPS for rank in CPU_RANKS for dtype in CPU_DTYPES]
