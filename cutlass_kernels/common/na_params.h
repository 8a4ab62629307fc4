// Problem description shared by every backend's kernels: shapes, window parameters and the
// raw tensor pointers. Tensors are dense and heads-last (the binding makes them so):
//   q [B, *S, H, D]   k [B, *S, Hkv, D]   v [B, *S, Hkv, Dv]   out [B, *S, H, Dv]
//   lse [B, *S, H]    extra_k [B, E, Hkv, D]   extra_v [B, E, Hkv, Dv]
// where q, out and lse (and their gradients) have the query range's extents in place of S when
// a call computes only part of the queries (NaProblem::q_offset).
//   attn (unfused) [B, *S, H, prod(kernel)]   rpb [H, 2k_1-1, ..., 2k_r-1]
// Floating-point buffers are of the problem's element type, except lse, which is of the
// accumulation type (float32, float64 for float64 inputs).
#pragma once

#include <cstdint>

#include "na_window.h"

namespace natten {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct NaProblem {
  int rank = 1;
  AxisSpec axis[3] = {};
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t heads_kv = 0;
  int64_t dim = 0;      // D, head dim of q and k
  int64_t dim_v = 0;    // Dv, head dim of v and the output
  int64_t num_extra = 0;  // E, additional keys/values every query sees
  double scale = 1.0;

  // The queries a call computes, per axis: coordinates [q_offset, q_offset + q_extent) of the
  // grid above, which is the key grid. Context parallelism needs this: a rank's keys are its own
  // rows plus halo rows of its neighbours, but only its own rows are its queries, and computing
  // the halo rows' queries too would waste a large part of its work. A query keeps the window,
  // stride and dilation groups and causal mask of its key-grid coordinate; q, out, lse, d_out,
  // d_lse and d_q hold only the range ([B, *query extents, H, *]), k, v, d_k and d_v the whole
  // grid. kWholeAxis, the default, is the whole axis. The CPU, sm80 and sm90 families serve ranges;
  // the other GPU families compute whole grids only.
  static constexpr int64_t kWholeAxis = -1;
  int64_t q_offset[3] = {0, 0, 0};
  int64_t q_extent[3] = {kWholeAxis, kWholeAxis, kWholeAxis};

  // The backward must give the same gradients, bit for bit, on every run (torch's
  // use_deterministic_algorithms): a family that adds partial sums from several CTAs in an order
  // that varies from run to run takes a path with one writer per element instead.
  bool deterministic = false;

  int64_t tokens() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= axis[i].extent;
    return n;
  }
  int64_t query_extent(int a) const {
    return q_extent[a] == kWholeAxis ? axis[a].extent - q_offset[a] : q_extent[a];
  }
  int64_t query_tokens() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= query_extent(i);
    return n;
  }
  bool whole_queries() const {
    for (int i = 0; i < rank; ++i) {
      if (q_offset[i] != 0 || query_extent(i) != axis[i].extent) return false;
    }
    return true;
  }
  int64_t window_size() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= axis[i].kernel;
    return n;
  }
  int64_t rpb_size() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= 2 * axis[i].kernel - 1;
    return n;
  }
};

// Fused attention: forward reads q/k/v(/extra) and writes out and lse; backward also reads
// d_out (and d_lse when the logsumexp was used) and writes the five gradients (extra ones only
// when num_extra > 0).
struct FnaTensors {
  void const* q = nullptr;
  void const* k = nullptr;
  void const* v = nullptr;
  void const* extra_k = nullptr;
  void const* extra_v = nullptr;
  void* out = nullptr;
  void* lse = nullptr;
  void const* d_out = nullptr;
  void const* d_lse = nullptr;  // optional gradient of lse (accumulation type)
  void* d_q = nullptr;
  void* d_k = nullptr;
  void* d_v = nullptr;
  void* d_extra_k = nullptr;
  void* d_extra_v = nullptr;
};

// Unfused ops: attn = qk(q, k) (+ rpb), out = av(attn, v), and their gradients.
// Pointers an op does not use stay null; rpb and d_rpb are optional.
struct NaUnfusedTensors {
  void const* q = nullptr;
  void const* k = nullptr;
  void const* v = nullptr;
  void const* rpb = nullptr;
  void const* attn = nullptr;
  void* out = nullptr;  // attn for qk, the output for av
  void const* d_out = nullptr;
  void* d_q = nullptr;
  void* d_k = nullptr;
  void* d_v = nullptr;
  void* d_rpb = nullptr;
  void* d_attn = nullptr;
};

}  // namespace natten
