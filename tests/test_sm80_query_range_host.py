"""Host-side check of the SM80 (cutlass-fna) tiling of a query range, needing no GPU
(tests/cuda/sm80_query_range_walk_check.cpp, any C++17 compiler): the shared tile geometry the
kernels decide with, replayed on the host, computes every range query once and adds every visible
(query, key) pair of docs/semantics.md exactly once in the forward/dQ walks and the dK/dV walks,
on random problems and ranges of ranks 1-3."""

from host_build import cxx_build, run


def test_range_walks_add_every_visible_pair_once(tmp_path):
    assert "PASS" in run([cxx_build("sm80_query_range_walk_check.cpp", tmp_path / "range_check")]).stdout
