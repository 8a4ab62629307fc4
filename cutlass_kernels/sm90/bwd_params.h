// Host side of the SM90 backward: its parameters, TMA descriptors and workspace.
//
// The backward reads what the forward reads (Q, K, V, additional keys/values) through the
// forward's descriptors, so make_forward_params does the validation and builds those; dO gets
// one more grid descriptor of the query box, like Q. dQ is summed over the key boxes that see a
// query, by many CTAs, so it is accumulated in float32 in the workspace and converted to the
// element type afterwards; the workspace (kernels.h: fna_backward_workspace_floats) also holds
// delta = rowsum(dO * O) - dLSE.
//
// Torch-free and CuTe-free; needs only the CUDA headers.
#pragma once

#include "sm90/fwd_params.h"
#include "sm90/kernels.h"

namespace natten::sm90 {

template <int Rank>
struct BackwardParams {
  ForwardParams<Rank> fwd;  // geometry, pointers (incl. delta and the gradients), Q/K/V maps
  CUtensorMap d_out_map;
  float* dq_accum;  // [B, *Sq, H, D] float32 (the query range's rows), zeroed before the main kernel
};

template <int Rank, class QTile, class KVTile>
BackwardParams<Rank> make_backward_params(NaProblem const& p, FnaTensors const& t, float* workspace,
                                          int head_dim, CUtensorMapDataType type, int elem_bytes) {
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
  P.dq_accum = workspace + fna_backward_delta_floats(p);
  if (g.batch == 0 || g.heads == 0 || g.tokens == 0) return P;
  P.d_out_map = grid_map<Rank, QTile>(op, type, elem_bytes, t.d_out, g, g.heads, g.dim_v, true);
  return P;
}

}  // namespace natten::sm90
