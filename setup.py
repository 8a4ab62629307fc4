"""Build of the `natten` distribution: the Python package and the natten._C extension.

Environment:
  NATTEN_N_WORKERS      parallel compile jobs (default: all cores)
  NATTEN_CPU_ARCH       gcc -march for the CPU kernels (default: native; e.g. x86-64-v3 for a
                        portable build)
  NATTEN_CUDA_ARCH      CUDA compute capabilities to build, e.g. "8.0;9.0" (9.0 means sm_90a);
                        default: those of the visible GPUs when torch has CUDA, else none. Each
                        kernel family is compiled only for those it runs on (autogen/registry.py)
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


# Absolute path of each generated CUDA source -> the -gencode flags of its family's targets
# (filled by extension(), read by the build command).
GENCODES = {}


def extension():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    archs = cuda_archs(torch)
    cutlass = registry.cutlass_include()
    if archs and cutlass is None:
        print("natten: nvidia-cutlass is not installed, so the CUTLASS kernel families are left out "
              "(pip install --no-deps nvidia-cutlass)", file=sys.stderr)
    kernels = registry.kernels(bool(archs), os.environ.get("NATTEN_KERNEL_FILTER", ""),
                               with_cutlass=cutlass is not None, capabilities=archs)
    files = generate.render(kernels, tuple(archs))
    generate.write(files)
    cpu_arch = os.environ.get("NATTEN_CPU_ARCH", "native")
    # -fopenmp: at::parallel_for is inline header code that is serial without it.
    cxx = ["-O3", f"-march={cpu_arch}", "-fno-math-errno", "-fopenmp", "-std=c++17"]
    sources = ["cutlass_kernels/binding/torch_binding.cpp", *generate.sources(files)]
    include_dirs = [str(ROOT / "cutlass_kernels"), str(generate.OUT_DIR)]
    if not archs:
        return CppExtension(name="natten._C", sources=sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if not any(k.family.name == "reference" for k in kernels):
        sys.exit("natten: a CUDA build needs reference kernels (the GPU fallback, and the unfused ops): "
                 "check NATTEN_KERNEL_FILTER and NATTEN_CUDA_ARCH (the reference family needs 7.5 or newer)")
    for k in kernels:
        if k.family.cuda:
            targets = k.family.targets(archs)
            GENCODES[str(generate.OUT_DIR / f"{k.name}{k.suffix}")] = [gencode(a) for a in targets]
    built = sorted({k.family.name: k.family.targets(archs) for k in kernels if k.family.cuda}.items())
    print("natten: building CUDA kernels: " + "; ".join(f"{name} for {', '.join(t)}" for name, t in built),
          file=sys.stderr)
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNATTEN_WITH_CUDA"]
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

    class Build(BuildExtension):
        """Compiles each CUDA family only for its own targets: the sources are compiled in
        groups that share their -gencode flags (torch's build gives one set to every source)."""

        def build_extension(self, ext):
            compile_all = self.compiler.compile

            def compile_by_targets(sources, *args, extra_postargs=None, **kwargs):
                groups = {}
                for source in sources:
                    groups.setdefault(tuple(GENCODES.get(os.path.abspath(source), ())), []).append(source)
                objects = []
                for gencodes, group in groups.items():
                    flags = dict(extra_postargs or {})
                    if "nvcc" in flags:
                        flags["nvcc"] = [*flags["nvcc"], *gencodes]
                    objects += compile_all(group, *args, extra_postargs=flags, **kwargs)
                return objects

            self.compiler.compile = compile_by_targets
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_all

    return Build.with_options(use_ninja=True)


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
