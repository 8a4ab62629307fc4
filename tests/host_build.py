"""Builds the host-only programs of tests/cuda/ (checks of the SM90 kernels' host-replayable code
that need no GPU) with the tools each needs: skipped where a tool is missing, except under CI,
where missing tools fail."""

import os
import pathlib
import shutil
import subprocess

import pytest

from autogen import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_TESTS = ROOT / "tests" / "cuda"
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true")


def run(cmd, **kw):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def cxx_build(source: str, exe: pathlib.Path) -> pathlib.Path:
    """tests/cuda/<source> compiled by the system's C++17 compiler against cutlass_kernels/."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None and not REQUIRED:
        pytest.skip("needs a C++17 compiler")
    run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'cutlass_kernels'}", CUDA_TESTS / source, "-o", exe])
    return exe


def nvcc_build(source: str, exe: pathlib.Path, *flags: str) -> pathlib.Path:
    """tests/cuda/<source> compiled by nvcc (host code, CuTe from the nvidia-cutlass headers)."""
    nvcc, cutlass = shutil.which("nvcc"), registry.cutlass_include()
    if (nvcc is None or cutlass is None) and not REQUIRED:
        pytest.skip("needs nvcc and the nvidia-cutlass headers")
    assert nvcc is not None and cutlass is not None, "CI needs nvcc and nvidia-cutlass"
    run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", *flags, f"-I{ROOT / 'cutlass_kernels'}", f"-I{cutlass}",
         CUDA_TESTS / source, "-o", exe])
    return exe
