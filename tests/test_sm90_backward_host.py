"""Host-side checks of the SM90 (hopper-fna) backward, and of both SM90 kernels' CuTe layouts, that
need no GPU (tests/cuda/):

- sm90_backward_walk_check.cpp (any C++17 compiler): the kernel's walk, TMA box rows and
  per-element mask, replayed on the host from its own headers, add every visible (head, query,
  key) pair of docs/semantics.md exactly once, on random problems of ranks 1-3;
- sm90_layout_check.cu (nvcc + CuTe, host code only): in the backward every shared-memory
  operand's writer (TMA, stage_ds, the epilogue) meets the swizzled view its wgmma reads, and the
  register fragments (P^T / dS^T as RS operands, accumulator ownership) are the elements they
  claim; in the forward the score accumulators lie where its mask assumes;
- the float64 reference of tests/cuda/sm90_backward_check.cu: its self-test (the windows of docs/semantics.md,
  finite differences of its forward), built without the kernels.

Each compiles with the tools it needs (tests/host_build.py)."""

from host_build import cxx_build, nvcc_build, run


def test_walk_and_mask_add_every_visible_pair_once(tmp_path):
    assert "PASS" in run([cxx_build("sm90_backward_walk_check.cpp", tmp_path / "walk_check")]).stdout


def test_smem_layouts_and_fragments_match(tmp_path):
    assert "PASS" in run([nvcc_build("sm90_layout_check.cu", tmp_path / "layout_check")]).stdout


def test_harness_reference_self_test(tmp_path):
    exe = nvcc_build("sm90_backward_check.cu", tmp_path / "reference_self_test", "-O2", "-DNATTEN_PART=0",
                     "-DNATTEN_NO_INSTANCES")
    assert "reference self-test: PASS" in run([exe, "--self-test"]).stdout
