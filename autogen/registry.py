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
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

# dtype name -> (short name, CPU storage type, CUDA storage type, natten::DType enumerator)
DTYPES = {
    "float32": ("fp32", "float", "float", "DType::kFloat32"),
    "float64": ("fp64", "double", "double", "DType::kFloat64"),
    "float16": ("fp16", "Half", "__half", "DType::kFloat16"),
    "bfloat16": ("bf16", "BFloat16", "__nv_bfloat16", "DType::kBFloat16"),
}
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Op:
    name: str      # as in file names and the dispatch enum
    function: str  # C++ function template
    header: str    # header that defines it, relative to cutlass_kernels/
    signature: str  # parameter list of the instantiation
    # Tiled families: rank -> ((query box, key box), ...) instantiated per head dim. The
    # profiler may pick any of them; the family's backend picks a default by rule. A rank left
    # out has no instantiations of the op.
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


# Every tiled family has these two ops with these signatures, so that the binding's one pair of
# tiled entry points (binding/cuda_binding.cpp) serves all of them.
_TILED_FWD_SIG = "NaProblem const&, FnaTensors const&, cudaStream_t"
_TILED_BWD_SIG = "NaProblem const&, FnaTensors const&, float*, cudaStream_t"
TILED_OPS = (("fna_fwd", _TILED_FWD_SIG), ("fna_bwd", _TILED_BWD_SIG))

SM80_OPS = (
    Op("fna_fwd", "fna_forward", "sm80/fna_forward.cuh", _TILED_FWD_SIG, tiles={
        1: (((128,), (64,)), ((64,), (64,))),
        2: (((8, 16), (8, 8)), ((16, 8), (8, 8)), ((8, 8), (8, 8))),
        3: (((4, 4, 8), (4, 4, 4)), ((2, 8, 8), (2, 4, 8)), ((4, 4, 4), (4, 4, 4))),
    }),
    # The dK/dV kernel holds a 64-key box against query boxes of 64 (registers bound both).
    Op("fna_bwd", "fna_backward", "sm80/fna_backward.cuh", _TILED_BWD_SIG, tiles={
        1: (((64,), (64,)),),
        2: (((8, 8), (8, 8)),),
        3: (((4, 4, 4), (4, 4, 4)),),
    }),
)

# The Hopper family. Forward: one pair per rank, the fastest measured on an H200 at bf16 and head
# dim 128 (benchmarks/NOTES.md, SM90 forward kernel): 128 queries against 128 keys, two consumer
# warpgroups of 64 rows; the alternatives measured (2-D 16x8/8x8, 3-D 4x4x8/4x4x4) were 12-17%
# slower on P2 and P3. One instantiation takes about 45 s of nvcc.
# Backward: the kernel holds 64-query boxes against 128-key boxes (two consumer warpgroups of 64
# keys; bwd_mainloop.cuh). One pair per rank, all checked by its standalone harness
# (tests/cuda/sm90_backward_check.cu): 2-D keys in the forward's 16x8 boxes, 3-D the pair that
# computes fewer masked scores on P3 (2.04 against 2x4x8/2x8x8's 2.13 scores per visible pair;
# benchmarks/NOTES.md, hopper-fna backward; on an H200 it was also 4% faster on P3 than
# 2x4x8/2x8x8). One pair per rank keeps the build at 12 backward instantiations, about 40 s of
# nvcc each.
SM90_OPS = (
    Op("fna_fwd", "fna_forward", "sm90/fna_forward.cuh", _TILED_FWD_SIG, tiles={
        1: (((128,), (128,)),),
        2: (((16, 8), (16, 8)),),
        3: (((2, 8, 8), (2, 8, 8)),),
    }),
    Op("fna_bwd", "fna_backward", "sm90/fna_backward.cuh", _TILED_BWD_SIG, tiles={
        1: (((64,), (128,)),),
        2: (((8, 8), (16, 8)),),
        3: (((4, 4, 4), (4, 4, 8)),),
    }),
)


def _sm80_forward_smem(dtype: str, head_dim: int, q_tile: tuple, kv_tile: tuple) -> int:
    """Shared memory of one SM80 forward CTA in bytes (ForwardSmem in sm80/fna_forward.cuh): the
    query tile, the key/value stages (fewer as rows grow) and the row table."""
    row = head_dim * DTYPE_BYTES[dtype]
    stages = 4 if row <= 64 else 3 if row <= 128 else 2
    queries = math.prod(q_tile)
    return (queries + 2 * stages * math.prod(kv_tile)) * row + queries * (1 + 2 * len(q_tile)) * 4


def _sm80_fits(family, op, dtype: str, head_dim: int, q_tile: tuple, kv_tile: tuple) -> bool:
    """Whether an SM80 instantiation fits the registers and shared memory of every GPU of the
    family.
    - Head dim 256: the forward with 64-query boxes only (a 128-query box would hold 256 output
      accumulators per thread); no backward, whose dK/dV kernel would hold 256 accumulators per
      thread. Problems that need its gradients run on another backend.
    - The forward's shared memory within the family's limit (float32 at head dim 128 with a
      128-query box needs 192 KiB)."""
    if head_dim >= 256 and (op.name != "fna_fwd" or math.prod(q_tile) > 64):
        return False
    smem = _sm80_forward_smem(dtype, head_dim, q_tile, kv_tile)
    return op.name != "fna_fwd" or smem <= family.smem_kib * 1024


@dataclass(frozen=True)
class Family:
    """A kernel family. A tiled family (one whose ops have tiles: exactly TILED_OPS) plugs into
    natten through this entry, its folder under cutlass_kernels/ and its backend class in
    natten/backends/; the generator, setup.py and the binding need nothing else."""
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
    backend: str = ""  # the natten backend that runs it
    # Compute capabilities it runs on: from min_capability on, or only that one when its kernels
    # use arch-specific instructions (sm_90a: wgmma, TMA).
    min_capability: tuple = (7, 5)
    arch_specific: bool = False
    smem_kib: int = 48  # shared memory per block of the smallest GPU it runs on
    fits: Optional[Callable] = None  # (family, op, dtype, head dim, q tile, kv tile) -> bool
    # Whether its fused kernels compute a query range (NaProblem::q_offset) as well as the whole
    # grid; the binding refuses ranges for a family that does not.
    query_range: bool = False

    @property
    def tiled(self) -> bool:
        return any(op.tiles is not None for op in self.ops)

    def targets(self, capabilities) -> list:
        """Those of the build's compute capabilities ("8.0", "9.0") the family is compiled for."""
        def runs(capability: str) -> bool:
            cc = tuple(int(x) for x in capability.split("."))
            return cc == self.min_capability if self.arch_specific else cc >= self.min_capability
        return [c for c in capabilities if runs(c)]


FAMILIES = (
    Family("cpu", CPU_OPS, (1, 2, 3), ("float32", "float64", "float16", "bfloat16"), False, "natten::cpu",
           decl_header="cpu/kernels.h", backend="cpu"),
    # Plain CUDA: every GPU CUDA 13 targets, from Turing (sm_75) on.
    Family("reference", REFERENCE_OPS, (1, 2, 3), ("float32", "float16", "bfloat16", "float64"), True,
           "natten::reference", archs=("75", "80", "90a"), decl_header="reference/kernels.h",
           backend="reference"),
    # Tensor cores through CuTe (mma.sync, cp.async): Ampere and every later GPU; float32 on
    # TF32 tensor cores. An A100 offers 163 KiB of shared memory per block.
    Family("sm80", SM80_OPS, (1, 2, 3), ("float16", "bfloat16", "float32"), True, "natten::sm80",
           head_dims=(32, 64, 128, 256), archs=("80", "90a"), decl_header="sm80/kernels.h", cutlass=True,
           backend="cutlass-fna", min_capability=(8, 0), smem_kib=163, fits=_sm80_fits,
           query_range=True),
    # Hopper tensor cores (wgmma, TMA): sm_90a only; 227 KiB of shared memory per block. The
    # kernels hold 16-bit elements in 64-column swizzle spans: head dims are multiples of 64.
    Family("sm90", SM90_OPS, (1, 2, 3), ("float16", "bfloat16"), True, "natten::sm90",
           head_dims=(64, 128), archs=("90a",), decl_header="sm90/kernels.h", cutlass=True,
           backend="hopper-fna", min_capability=(9, 0), arch_specific=True, smem_kib=227,
           query_range=True),
)


def _dims(box) -> str:
    return "x".join(map(str, box))


@dataclass(frozen=True)
class Key:
    """What names one instantiation. The generator carries it by name, field by field, into the
    manifest's rows (natten/_manifest.py: Key) and into the key of the C++ dispatch tables
    (kernel_key.h: KernelKey, every field but family and op, which choose the table). A new axis
    of instantiation (a schedule, a cluster shape) is one field here, with its C++ form in
    `cpp` ("int", "dtype" or "extents") and its name in lookup errors in `words`; a field a
    family does not use is None here and 0 in C++."""
    family: str
    op: str
    rank: int = field(metadata={"cpp": "int", "words": "rank"})
    dtype: str = field(metadata={"cpp": "dtype", "words": "dtype"})
    head_dim: Optional[int] = field(default=None, metadata={"cpp": "int", "words": "head dim"})
    q_tile: Optional[tuple] = field(default=None, metadata={"cpp": "extents", "words": "query box"})
    kv_tile: Optional[tuple] = field(default=None, metadata={"cpp": "extents", "words": "key box"})


KEY_FIELDS = tuple(f.name for f in fields(Key))
TABLE_KEY_FIELDS = tuple(f for f in fields(Key) if "cpp" in f.metadata)


@dataclass(frozen=True)
class Kernel:
    """One instantiation: its key, and the family and op that key names."""
    family: Family
    op: Op
    key: Key

    @property
    def name(self) -> str:
        k = self.key
        tiled = ""
        if k.head_dim is not None:
            tiled = f"_hd{k.head_dim}_q{_dims(k.q_tile)}_kv{_dims(k.kv_tile)}"
        return f"{k.op}_{k.rank}d_{DTYPES[k.dtype][0]}{tiled}_{k.family}"

    @property
    def template_args(self) -> str:
        k = self.key
        args = [str(k.rank), self.cpp_type]
        if k.head_dim is not None:
            box = lambda t: f"Box<{', '.join(map(str, t))}>"  # noqa: E731
            args += [str(k.head_dim), box(k.q_tile), box(k.kv_tile)]
        return ", ".join(args)

    @property
    def cpp_type(self) -> str:
        return DTYPES[self.key.dtype][2 if self.family.cuda else 1]

    @property
    def suffix(self) -> str:
        return ".cu" if self.family.cuda else ".cpp"

    def matches(self, pattern: str) -> bool:
        """pattern: family:dtype:head_dim:rank, each field a glob (head_dim is '*' for the
        families that serve any head dim); missing trailing fields match anything."""
        globs = (pattern.split(":") + ["*"] * 4)[:4]
        k = self.key
        values = (k.family, k.dtype, "*" if k.head_dim is None else str(k.head_dim), str(k.rank))
        return all(fnmatch.fnmatch(v, f) or (f in DTYPES and DTYPES[f][0] == v) or
                   (v in DTYPES and DTYPES[v][0] == f) for v, f in zip(values, globs))


def kernels(with_cuda: bool, kernel_filter: str = "", with_cutlass: bool = True,
            capabilities: Optional[list] = None) -> list:
    """Instantiations of a build: every CPU kernel, and the CUDA ones the filter admits
    (comma-separated patterns, see Kernel.matches; empty admits all); families that need the
    CUTLASS headers only `with_cutlass`; given the build's compute capabilities, only the CUDA
    families that run on one of them."""
    patterns = [p for p in kernel_filter.split(",") if p.strip()]
    out = []
    for family in FAMILIES:
        if (family.cuda and not with_cuda) or (family.cutlass and not with_cutlass):
            continue
        if family.cuda and capabilities is not None and not family.targets(capabilities):
            continue
        for op in family.ops:
            for rank in family.ranks:
                for dtype in family.dtypes:
                    for k in _variants(family, op, rank, dtype):
                        if family.cuda and patterns and not any(k.matches(p.strip()) for p in patterns):
                            continue
                        out.append(k)
    return out


def _variants(family: Family, op: Op, rank: int, dtype: str):
    if op.tiles is None:
        yield Kernel(family, op, Key(family.name, op.name, rank, dtype))
        return
    for head_dim in family.head_dims:
        for q_tile, kv_tile in op.tiles.get(rank, ()):
            if family.fits is None or family.fits(family, op, dtype, head_dim, q_tile, kv_tile):
                yield Kernel(family, op, Key(family.name, op.name, rank, dtype, head_dim, q_tile, kv_tile))


for _family in FAMILIES:
    if _family.tiled and tuple((op.name, op.signature) for op in _family.ops) != TILED_OPS:
        raise AssertionError(f"tiled family {_family.name} must have exactly the ops {TILED_OPS}")


def cutlass_include() -> Optional[str]:
    """CUTLASS/CuTe headers of the installed nvidia-cutlass package (None when absent)."""
    try:
        import cutlass_library
    except ImportError:
        return None
    path = pathlib.Path(cutlass_library.__file__).parent / "source" / "include"
    return str(path) if (path / "cute").is_dir() else None
