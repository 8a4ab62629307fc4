"""Host-side checks of the SM90 (hopper-fna) forward's score mask that need no GPU (tests/cuda/):

- sm90_forward_mask_check.cpp (any C++17 compiler): the walk and the score mask of
  sm90/fwd_mask.cuh, replayed on the host from the kernel's headers, keep exactly the (query,
  key) pairs of docs/semantics.md, each once, on random problems of ranks 1-3; with --mutate (a
  window bound moved by one key) the same check must fail. That the score accumulators lie where
  the masks assume is checked with the backward's layouts (sm90_layout_check.cu,
  test_sm90_backward_host.py).

Each compiles with the tools it needs (tests/host_build.py)."""

import subprocess

import pytest

from host_build import cxx_build, run


@pytest.fixture(scope="module")
def mask_check(tmp_path_factory):
    return cxx_build("sm90_forward_mask_check.cpp", tmp_path_factory.mktemp("mask") / "mask_check")


def test_masks_keep_exactly_the_visible_pairs(mask_check):
    assert "PASS" in run([mask_check]).stdout


def test_mask_check_catches_an_off_by_one(mask_check):
    result = subprocess.run([str(mask_check), "--mutate"], capture_output=True, text=True)
    assert result.returncode != 0 and "FAIL" in result.stdout

