"""Host-side checks of the SM90 (hopper-fna) forward's score mask that need no GPU (tests/cuda/):

- sm90_forward_mask_check.cpp (any C++17 compiler): the walk and both mask policies of
  sm90/fwd_mask.cuh, replayed on the host from the kernel's headers, keep exactly the (query,
  key) pairs of SPEC section 1, each once, on random problems of ranks 1-3; with --mutate (a
  window bound moved by one key) the same check must fail;
- sm90_forward_fragment_check.cu (nvcc + CuTe, host code only): the score accumulators lie where
  the masks assume.

Each compiles with the tools it needs and is skipped where they are missing, except under CI."""

import os
import shutil
import subprocess

import pytest

from test_sm90_backward_host import CUDA_TESTS, REQUIRED, ROOT, _nvcc_and_cutlass, _run


@pytest.fixture(scope="module")
def mask_check(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None and not REQUIRED:
        pytest.skip("needs a C++17 compiler")
    exe = tmp_path_factory.mktemp("mask") / "mask_check"
    _run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'cutlass_kernels'}", CUDA_TESTS / "sm90_forward_mask_check.cpp",
          "-o", exe])
    return exe


def test_masks_keep_exactly_the_visible_pairs(mask_check):
    assert "PASS" in _run([mask_check]).stdout


def test_mask_check_catches_an_off_by_one(mask_check):
    result = subprocess.run([str(mask_check), "--mutate"], capture_output=True, text=True)
    assert result.returncode != 0 and "FAIL" in result.stdout


def test_score_fragment_positions(tmp_path):
    nvcc, cutlass = _nvcc_and_cutlass()
    exe = tmp_path / "fragment_check"
    _run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{ROOT / 'cutlass_kernels'}", f"-I{cutlass}",
          CUDA_TESTS / "sm90_forward_fragment_check.cu", "-o", exe])
    assert "PASS" in _run([exe]).stdout
