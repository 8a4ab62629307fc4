"""Host-side checks of the SM90 (hopper-fna) backward that need no GPU (tests/cuda/):

- sm90_backward_walk_check.cpp (any C++17 compiler): the kernel's walk, TMA box rows and
  per-element mask, replayed on the host from its own headers, add every visible (head, query,
  key) pair of SPEC section 1 exactly once, on random problems of ranks 1-3;
- sm90_backward_layout_check.cu (nvcc + CuTe, host code only): every shared-memory operand's
  writer (TMA, stage_ds, the epilogue) meets the swizzled view its wgmma reads, and the register
  fragments (P^T / dS^T as RS operands, accumulator ownership) are the elements they claim;
- the float64 reference of tests/cuda/sm90_backward_check.cu: its self-test (SPEC windows,
  finite differences of its forward), built without the kernels.

Each compiles with the tools it needs and is skipped where they are missing, except under CI."""

import os
import pathlib
import shutil
import subprocess

import pytest

from autogen import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_TESTS = ROOT / "tests" / "cuda"
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true")


def _run(cmd, **kw):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _nvcc_and_cutlass():
    nvcc, cutlass = shutil.which("nvcc"), registry.cutlass_include()
    if (nvcc is None or cutlass is None) and not REQUIRED:
        pytest.skip("needs nvcc and the nvidia-cutlass headers")
    assert nvcc is not None and cutlass is not None, "CI needs nvcc and nvidia-cutlass"
    return nvcc, cutlass


def test_walk_and_mask_add_every_visible_pair_once(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None and not REQUIRED:
        pytest.skip("needs a C++17 compiler")
    exe = tmp_path / "walk_check"
    _run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'cutlass_kernels'}", CUDA_TESTS / "sm90_backward_walk_check.cpp",
          "-o", exe])
    assert "PASS" in _run([exe]).stdout


def test_smem_layouts_and_fragments_match(tmp_path):
    nvcc, cutlass = _nvcc_and_cutlass()
    exe = tmp_path / "layout_check"
    _run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{ROOT / 'cutlass_kernels'}", f"-I{cutlass}",
          CUDA_TESTS / "sm90_backward_layout_check.cu", "-o", exe])
    assert "PASS" in _run([exe]).stdout


def test_harness_reference_self_test(tmp_path):
    nvcc, cutlass = _nvcc_and_cutlass()
    exe = tmp_path / "reference_self_test"
    _run([nvcc, "-std=c++17", "-O2", "--expt-relaxed-constexpr", "-DNATTEN_PART=0", "-DNATTEN_NO_INSTANCES",
          f"-I{ROOT / 'cutlass_kernels'}", f"-I{cutlass}", CUDA_TESTS / "sm90_backward_check.cu", "-o", exe])
    assert "reference self-test: PASS" in _run([exe, "--self-test"]).stdout
