// Host side of the SM90 backward: its parameters, TMA descriptors and workspace.
//
// The backward reads what the forward reads (Q, K, V, additional keys/values) through the
// forward's descriptors, so make_forward_params does the validation and builds those; dO gets
// one more grid descriptor of the query box, like Q. dQ is summed over the key boxes that see a
// query, by many CTAs, so it is accumulated in float32 in the workspace and converted to the
// element type afterwards (or, on the deterministic path, computed by a pass of its own: no
// buffer); the workspace (kernels.h: fna_backward_workspace_floats) also holds
// delta = rowsum(dO * O) - dLSE.
//
// Torch-free and CuTe-free; needs only the CUDA headers.
#pragma once

#include "sm90/fwd_params.h"
#include "sm90/kernels.h"

namespace natten::sm90 {

// How the main kernel's dQ partials (dS.K of its keys, per query box it visits) reach dQ:
//   kAtomic    added to a float32 buffer from registers, a pair of columns at a time;
//   kBulk      staged in shared memory and added to that buffer by bulk reductions, one per row:
//              on an H200 it measured 3-4% slower on P1-P3 (benchmarks/NOTES.md), since its
//              staging takes the shared memory a third query stage needs; the harness times it as
//              the family sm90bulk;
//   kSeparate  not at all: the main kernel computes dK and dV only, and a query-box-stationary
//              pass computes dQ with one writer per element, so that dQ is the same bit for bit
//              on every run (the deterministic backward; bwd_launch.cuh): the SM80 family's dQ
//              kernel;
//   kSeparateWgmma  the same with the Hopper dQ kernel (bwd_dq_kernel.cuh); the harness family
//              sm90detw, until it has been measured against kSeparate.
// The two buffered paths add partials in whatever order the CTAs reach them.
enum class DqPath { kAtomic, kBulk, kSeparate, kSeparateWgmma };

template <int Rank>
struct BackwardParams {
  ForwardParams<Rank> fwd;  // geometry, pointers (incl. delta and the gradients), Q/K/V maps
  CUtensorMap d_out_map;
  float* dq_accum;  // [B, *Sq, H, D] float32 (the query range's rows), zeroed before the main kernel; or null
};

template <int Rank, class QTile, class KVTile>
BackwardParams<Rank> make_backward_params(NaProblem const& p, FnaTensors const& t, float* workspace,
                                          bool dq_buffer, int head_dim, CUtensorMapDataType type,
                                          int elem_bytes) {
  char const* op = "fna_backward";
  auto aligned = [](void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (p.num_extra > 0 && (t.d_extra_k == nullptr || t.d_extra_v == nullptr)) {
    fail(op, "additional keys need their gradients");
  }
  bool const extra_aligned = p.num_extra == 0 || (aligned(t.d_extra_k) && aligned(t.d_extra_v));
  if (!aligned(t.d_out) || !aligned(t.d_q) || !aligned(t.d_k) || !aligned(t.d_v) || !extra_aligned ||
      !aligned(workspace)) {
    fail(op, "d_out, the gradients and the workspace must start on 16-byte boundaries");
  }
  BackwardParams<Rank> P{};
  P.fwd = make_forward_params<Rank, QTile, KVTile>(p, t, head_dim, type, elem_bytes, op);
  auto& g = P.fwd.geo;
  g.delta = workspace;
  P.dq_accum = dq_buffer ? workspace + fna_backward_delta_floats(p) : nullptr;
  if (g.batch == 0 || g.heads == 0 || g.tokens == 0) return P;
  P.d_out_map = grid_map<Rank, QTile>(op, type, elem_bytes, t.d_out, g, g.heads, g.dim_v, true);
  return P;
}

}  // namespace natten::sm90
