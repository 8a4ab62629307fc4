"""Which kernel instantiations exist: the single source of truth.

The generator turns these tables into one translation unit per instantiation, the C++
dispatch tables and the manifest that the Python runtime reads; setup.py compiles exactly
the generated translation units. A build may narrow the GPU instantiations with a filter
(NATTEN_KERNEL_FILTER); tables and manifest then list exactly what was compiled.
"""

from __future__ import annotations

import fnmatch
import math
import pathlib
from dataclasses import dataclass
from typing import Optional

# dtype name -> (short name, CPU storage type, CUDA storage type, natten::DType enumerator)
DTYPES = {
    "float32": ("fp32", "float", "float", "DType::kFloat32"),
    "float64": ("fp64", "double", "double", "DType::kFloat64"),
    "float16": ("fp16", "Half", "__half", "DType::kFloat16"),
    "bfloat16": ("bf16", "BFloat16", "__nv_bfloat16", "DType::kBFloat16"),
}


@dataclass(frozen=True)
class Op:
    name: str      # as in file names and the dispatch enum
    function: str  # C++ function template
    header: str    # header that defines it, relative to cutlass_kernels/
    signature: str  # parameter list of the instantiation
    # Tiled families: rank -> ((query box, key box), ...) instantiated per head dim. The
    # profiler may pick any of them; natten/backends/sm80.py picks a default by rule.
    tiles: Optional[dict] = None


_CPU_FUSED = "NaProblem const&, FnaTensors const&, CpuTileConfig const&, HostServices const&"
_CPU_UNFUSED = "NaProblem const&, NaUnfusedTensors const&, HostServices const&"
CPU_OPS = (
    Op("fna_fwd", "fna_forward", "cpu/fna_forward.h", _CPU_FUSED),
    Op("fna_bwd", "fna_backward", "cpu/fna_backward.h", _CPU_FUSED),
    Op("na_qk_fwd", "na_qk_forward", "cpu/na_unfused.h", _CPU_UNFUSED),
    Op("na_qk_bwd", "na_qk_backward", "cpu/na_unfused.h", _CPU_UNFUSED),
    Op("na_av_fwd", "na_av_forward", "cpu/na_unfused.h", _CPU_UNFUSED),
    Op("na_av_bwd", "na_av_backward", "cpu/na_unfused.h", _CPU_UNFUSED),
)

REFERENCE_OPS = (
    Op("fna_fwd", "fna_forward", "reference/fna_forward.cuh", "NaProblem const&, FnaTensors const&, cudaStream_t"),
    Op("fna_bwd", "fna_backward", "reference/fna_backward.cuh",
       "NaProblem const&, FnaTensors const&, float*, cudaStream_t"),
    Op("na_qk_fwd", "na_qk_forward", "reference/na_unfused.cuh",
       "NaProblem const&, NaUnfusedTensors const&, cudaStream_t"),
    Op("na_qk_bwd", "na_qk_backward", "reference/na_unfused.cuh",
       "NaProblem const&, NaUnfusedTensors const&, float*, cudaStream_t"),
    Op("na_av_fwd", "na_av_forward", "reference/na_unfused.cuh",
       "NaProblem const&, NaUnfusedTensors const&, cudaStream_t"),
    Op("na_av_bwd", "na_av_backward", "reference/na_unfused.cuh",
       "NaProblem const&, NaUnfusedTensors const&, cudaStream_t"),
)


_SM80_SIG = "NaProblem const&, FnaTensors const&, cudaStream_t"
SM80_OPS = (
    Op("fna_fwd", "fna_forward", "sm80/fna_forward.cuh", _SM80_SIG, tiles={
        1: (((128,), (64,)), ((64,), (64,))),
        2: (((8, 16), (8, 8)), ((16, 8), (8, 8)), ((8, 8), (8, 8))),
        3: (((4, 4, 8), (4, 4, 4)), ((2, 8, 8), (2, 4, 8)), ((4, 4, 4), (4, 4, 4))),
    }),
    # The dK/dV kernel holds a 64-key box against query boxes of 64 (registers bound both).
    Op("fna_bwd", "fna_backward", "sm80/fna_backward.cuh",
       "NaProblem const&, FnaTensors const&, float*, cudaStream_t", tiles={
           1: (((64,), (64,)),),
           2: (((8, 8), (8, 8)),),
           3: (((4, 4, 4), (4, 4, 4)),),
       }),
)


@dataclass(frozen=True)
class Family:
    name: str
    ops: tuple
    ranks: tuple
    dtypes: tuple
    cuda: bool
    namespace: str
    head_dims: Optional[tuple] = None  # None: any head dim
    archs: tuple = ()  # CUDA targets the family must compile for (the nvcc compile check)
    decl_header: str = ""  # declares the op templates (for the dispatch table)
    cutlass: bool = False  # needs the CUTLASS/CuTe headers of the nvidia-cutlass package


FAMILIES = (
    Family("cpu", CPU_OPS, (1, 2, 3), ("float32", "float64", "float16", "bfloat16"), False, "natten::cpu",
           decl_header="cpu/kernels.h"),
    # Plain CUDA: every GPU CUDA 13 targets, from Turing (sm_75) on.
    Family("reference", REFERENCE_OPS, (1, 2, 3), ("float32", "float16", "bfloat16", "float64"), True,
           "natten::reference", archs=("75", "80", "90a"), decl_header="reference/kernels.h"),
    # Tensor cores through CuTe (mma.sync, cp.async): Ampere and every later GPU; float32 on
    # TF32 tensor cores.
    Family("sm80", SM80_OPS, (1, 2, 3), ("float16", "bfloat16", "float32"), True, "natten::sm80",
           head_dims=(32, 64, 128, 256), archs=("80", "90a"), decl_header="sm80/kernels.h", cutlass=True),
)


def _dims(box) -> str:
    return "x".join(map(str, box))


@dataclass(frozen=True)
class Kernel:
    family: Family
    op: Op
    rank: int
    dtype: str
    head_dim: Optional[int] = None  # tiled families: the instantiation's (padded) head dim
    q_tile: Optional[tuple] = None
    kv_tile: Optional[tuple] = None

    @property
    def name(self) -> str:
        tiled = ""
        if self.head_dim is not None:
            tiled = f"_hd{self.head_dim}_q{_dims(self.q_tile)}_kv{_dims(self.kv_tile)}"
        return f"{self.op.name}_{self.rank}d_{DTYPES[self.dtype][0]}{tiled}_{self.family.name}"

    @property
    def template_args(self) -> str:
        args = [str(self.rank), self.cpp_type]
        if self.head_dim is not None:
            box = lambda t: f"Box<{', '.join(map(str, t))}>"  # noqa: E731
            args += [str(self.head_dim), box(self.q_tile), box(self.kv_tile)]
        return ", ".join(args)

    @property
    def cpp_type(self) -> str:
        return DTYPES[self.dtype][2 if self.family.cuda else 1]

    @property
    def cpp_dtype(self) -> str:
        return DTYPES[self.dtype][3]

    @property
    def suffix(self) -> str:
        return ".cu" if self.family.cuda else ".cpp"

    def matches(self, pattern: str) -> bool:
        """pattern: family:dtype:head_dim:rank, each field a glob (head_dim is '*' for the
        families that serve any head dim); missing trailing fields match anything."""
        fields = (pattern.split(":") + ["*"] * 4)[:4]
        values = (self.family.name, self.dtype, "*" if self.head_dim is None else str(self.head_dim),
                  str(self.rank))
        return all(fnmatch.fnmatch(v, f) or (f in DTYPES and DTYPES[f][0] == v) or
                   (v in DTYPES and DTYPES[v][0] == f) for v, f in zip(values, fields))


def kernels(with_cuda: bool, kernel_filter: str = "", with_cutlass: bool = True) -> list:
    """Instantiations of a build: every CPU kernel, and the CUDA ones the filter admits
    (comma-separated patterns, see Kernel.matches; empty admits all); families that need the
    CUTLASS headers only `with_cutlass`."""
    patterns = [p for p in kernel_filter.split(",") if p.strip()]
    out = []
    for family in FAMILIES:
        if (family.cuda and not with_cuda) or (family.cutlass and not with_cutlass):
            continue
        for op in family.ops:
            for rank in family.ranks:
                for dtype in family.dtypes:
                    for k in _variants(family, op, rank, dtype):
                        if family.cuda and patterns and not any(k.matches(p.strip()) for p in patterns):
                            continue
                        out.append(k)
    return out


def _fits(op: Op, dtype: str, head_dim: int, q_tile: tuple) -> bool:
    """Whether a tiled instantiation fits every GPU of its family (registers, and shared memory
    of an A100: 163 KiB per block).
    - Head dim 256: the forward with 64-query boxes only (a 128-query box would hold 256 output
      accumulators per thread); no backward, whose dK/dV kernel would hold 256 accumulators per
      thread. Problems that need its gradients run on another backend.
    - float32 (4-byte rows): at head dim 128 a 128-query forward box needs 192 KiB; head dim 256
      does not fit at all."""
    size = math.prod(q_tile)
    if head_dim >= 256:
        return op.name == "fna_fwd" and size <= 64 and dtype != "float32"
    return not (dtype == "float32" and head_dim >= 128 and size > 64)


def _variants(family: Family, op: Op, rank: int, dtype: str):
    if op.tiles is None:
        yield Kernel(family, op, rank, dtype)
        return
    for head_dim in family.head_dims:
        for q_tile, kv_tile in op.tiles[rank]:
            if _fits(op, dtype, head_dim, q_tile):
                yield Kernel(family, op, rank, dtype, head_dim, q_tile, kv_tile)


def cutlass_include() -> Optional[str]:
    """CUTLASS/CuTe headers of the installed nvidia-cutlass package (None when absent)."""
    try:
        import cutlass_library
    except ImportError:
        return None
    path = pathlib.Path(cutlass_library.__file__).parent / "source" / "include"
    return str(path) if (path / "cute").is_dir() else None
