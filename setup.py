"""Build of the `natten` distribution: the Python package and the natten._C extension.

Environment:
  NATTEN_N_WORKERS  parallel compile jobs (default: all cores)
  NATTEN_CPU_ARCH   gcc -march for the CPU kernels (default: native; e.g. x86-64-v3 for a
                    portable build)
"""

import os
import pathlib
import sys

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from autogen import generate  # noqa: E402  (the registry lives in the source tree)


def extension():
    from torch.utils.cpp_extension import CppExtension

    generate.write(generate.render())
    arch = os.environ.get("NATTEN_CPU_ARCH", "native")
    return CppExtension(
        name="natten._C",
        sources=["cutlass_kernels/binding/torch_binding.cpp", *generate.sources()],
        include_dirs=[str(ROOT / "cutlass_kernels")],
        # -fopenmp: at::parallel_for is inline header code that is serial without it.
        extra_compile_args={"cxx": ["-O3", f"-march={arch}", "-fno-math-errno", "-fopenmp", "-std=c++17"]},
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
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["natten-profiler = natten.profiler.cli:main"]},
)
