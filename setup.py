"""Build of the `natten` distribution: the Python package and the natten._C extension.

Environment:
  NATTEN_N_WORKERS      parallel compile jobs (default: all cores)
  NATTEN_CPU_ARCH       gcc -march for the CPU kernels (default: native; e.g. x86-64-v3 for a
                        portable build)
  NATTEN_CUDA_ARCH      CUDA compute capabilities to build, e.g. "8.0;9.0" (9.0 means sm_90a);
                        default: those of the visible GPUs when torch has CUDA, else none
  NATTEN_KERNEL_FILTER  which GPU instantiations to build, family:dtype:head_dim:rank globs,
                        comma-separated (e.g. "reference:bf16:*:2"); default: all
"""

import os
import pathlib
import sys

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from autogen import generate, registry  # noqa: E402  (the registry lives in the source tree)


def cuda_archs(torch) -> list:
    env = os.environ.get("NATTEN_CUDA_ARCH")
    if env is not None:
        archs = [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
        if archs and torch.version.cuda is None:
            sys.exit("NATTEN_CUDA_ARCH is set but this torch has no CUDA; `make cuda-compile-check` "
                     "compiles the CUDA kernels with nvcc alone")
        return archs
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(f"{major}.{minor}" for major, minor in caps)


def gencode(arch: str) -> str:
    """'9.0' -> sm_90a (wgmma and TMA need the arch-specific target); others as named."""
    major, minor = arch.split(".")
    target = f"{major}{minor}" + ("a" if arch == "9.0" else "")
    return f"-gencode=arch=compute_{target},code=sm_{target}"


def extension():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    archs = cuda_archs(torch)
    cutlass = registry.cutlass_include()
    if archs and cutlass is None:
        print("natten: nvidia-cutlass is not installed, so the CUTLASS kernel families are left out "
              "(pip install --no-deps nvidia-cutlass)", file=sys.stderr)
    files = generate.render(registry.kernels(bool(archs), os.environ.get("NATTEN_KERNEL_FILTER", ""),
                                             with_cutlass=cutlass is not None))
    generate.write(files)
    cpu_arch = os.environ.get("NATTEN_CPU_ARCH", "native")
    # -fopenmp: at::parallel_for is inline header code that is serial without it.
    cxx = ["-O3", f"-march={cpu_arch}", "-fno-math-errno", "-fopenmp", "-std=c++17"]
    sources = ["cutlass_kernels/binding/torch_binding.cpp", *generate.sources(files)]
    include_dirs = [str(ROOT / "cutlass_kernels"), str(generate.OUT_DIR)]
    if not archs:
        return CppExtension(name="natten._C", sources=sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"natten: building CUDA kernels for {', '.join(archs)}", file=sys.stderr)
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNATTEN_WITH_CUDA",
            *(gencode(a) for a in archs)]
    return CUDAExtension(
        name="natten._C",
        sources=[*sources, "cutlass_kernels/binding/cuda_binding.cpp"],
        include_dirs=include_dirs + ([cutlass] if cutlass else []),
        extra_compile_args={"cxx": cxx + ["-DNATTEN_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", os.environ.get("NATTEN_N_WORKERS", str(os.cpu_count() or 1)))
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="natten",
    version="0.1.0",
    description="Neighborhood attention: fused sliding-window attention over 1-D, 2-D and 3-D token grids",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["natten", "natten.backends", "natten.profiler"],
    package_dir={"natten.profiler": "profiler"},
    ext_modules=[extension()],
    cmdclass={"build_ext": build_ext_class()},
    install_requires=["torch>=2.4", "fvcore"],
    extras_require={"test": ["pytest"], "cuda": ["nvidia-cutlass"]},
    entry_points={"console_scripts": ["natten-profiler = natten.profiler.cli:main"]},
)
