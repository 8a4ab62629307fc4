// Problem parameters of the tiled (tensor-core) families, built on the host from NaProblem and
// passed to every kernel by value: per axis the 32-bit window spec, the tile counts of each
// dilation group and the query range (NaProblem::q_offset). Torch-free and CuTe-free so that host code can include it.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/na_params.h"

namespace natten {

// Query/key tile shapes are boxes of the token grid with compile-time extents; tokens of a box
// are numbered row-major (the last axis varies fastest), like the grid itself.
template <int E0, int E1 = 1, int E2 = 1>
struct Box {
  static constexpr int kSize = E0 * E1 * E2;
  NA_HOST_DEVICE static constexpr int extent(int a) { return a == 0 ? E0 : a == 1 ? E1 : E2; }
  // Offset along axis `a` of the box's token `j`. Extents are powers of two, so this is shifts.
  NA_HOST_DEVICE static constexpr int offset(int j, int a) {
    unsigned const u = static_cast<unsigned>(j);
    return static_cast<int>(a == 0   ? u / unsigned(E1 * E2)
                            : a == 1 ? (u / unsigned(E2)) % unsigned(E1)
                                     : u % unsigned(E2));
  }
};

struct AxisParams {
  BasicAxisSpec<int> spec;  // 32-bit: cheap window arithmetic in the kernels' prologues
  int group_max;         // ceil(extent / dilation): length of the longest dilation group
  // Query tiles per dilation group: of the range's members, of which a group has at most
  // ceil(q_extent / dilation) (ceil(group_max / query box extent) for the whole axis).
  int q_tiles;
  int kv_tiles;          // key tiles per dilation group (ceil(group_max / key box extent))
  int token_stride;        // flat token index = sum over axes of coordinate * token_stride
  int group_token_stride;  // dilation * token_stride: one step along the axis inside a group
  // The queries computed: key-grid coordinates [q_offset, q_offset + q_extent). q, out, lse and
  // their gradients hold only those, as a grid of their own with these token strides (the key
  // grid's for the whole axis).
  int q_offset;
  int q_extent;
  int q_token_stride;
  int q_group_token_stride;  // dilation * q_token_stride
};

template <int Rank>
struct Params {
  AxisParams axis[Rank];
  int64_t tokens;
  int64_t q_tokens;  // tokens of the query range's grid (tokens for the whole grid)
  int batch, heads, heads_kv, group, dim, dim_v, num_extra;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): exponentials are exp2
  // [B, *S, H, D] etc., as described in common/na_params.h (q, out, lse, d_out, d_lse, delta
  // and d_q with q_tokens tokens per batch entry).
  void const* q;
  void const* k;
  void const* v;
  void const* extra_k;
  void const* extra_v;
  void* out;
  float* lse;
  // Backward only.
  void const* d_out;
  float const* d_lse;
  float* delta;  // [B, *Sq, H]: rowsum(dO * O) - dLSE
  void* d_q;
  void* d_k;
  void* d_v;
  void* d_extra_k;
  void* d_extra_v;
};

// Validates what tiled kernels need beyond the generic checks and fills the parameters.
// `head_dim` is the instantiation's head dim: D and Dv may be smaller (zero-padded in shared
// memory) when they are multiples of 8 (rows are moved in 16-byte pieces). `what` names the
// family and op in error messages ("sm80 fna_forward").
template <int Rank>
Params<Rank> make_params(NaProblem const& p, FnaTensors const& t, int head_dim,
                         int const* q_box, int const* kv_box, char const* what) {
  auto fail = [&](std::string const& why) {
    throw std::invalid_argument(std::string("natten ") + what + ": " + why);
  };
  if (p.rank != Rank) fail("problem rank " + std::to_string(p.rank) + " != kernel rank");
  if (p.heads_kv <= 0 || p.heads % p.heads_kv != 0) fail("heads not a multiple of heads_kv");
  if (p.dim > head_dim || p.dim_v > head_dim || p.dim % 8 != 0 || p.dim_v % 8 != 0) {
    fail("head dims " + std::to_string(p.dim) + "/" + std::to_string(p.dim_v) +
         " must be multiples of 8 and at most " + std::to_string(head_dim));
  }
  Params<Rank> P{};
  int64_t stride = 1, q_stride = 1;
  for (int a = Rank - 1; a >= 0; --a) {
    AxisSpec const& ax = p.axis[a];
    if (!axis_is_valid(ax)) fail("invalid window on axis " + std::to_string(a));
    int64_t const q_extent = p.query_extent(a);
    if (p.q_offset[a] < 0 || q_extent < 0 || p.q_offset[a] + q_extent > ax.extent) {
      fail("query range leaves the key grid on axis " + std::to_string(a));
    }
    AxisParams& A = P.axis[a];
    A.spec = {static_cast<int>(ax.extent), static_cast<int>(ax.kernel), static_cast<int>(ax.stride),
              static_cast<int>(ax.dilation), ax.causal};
    A.group_max = static_cast<int>((ax.extent + ax.dilation - 1) / ax.dilation);
    int const q_group_max = static_cast<int>((q_extent + ax.dilation - 1) / ax.dilation);
    A.q_tiles = (q_group_max + q_box[a] - 1) / q_box[a];
    A.kv_tiles = (A.group_max + kv_box[a] - 1) / kv_box[a];
    A.token_stride = static_cast<int>(stride);
    A.group_token_stride = static_cast<int>(stride * ax.dilation);
    A.q_offset = static_cast<int>(p.q_offset[a]);
    A.q_extent = static_cast<int>(q_extent);
    A.q_token_stride = static_cast<int>(q_stride);
    A.q_group_token_stride = static_cast<int>(q_stride * ax.dilation);
    stride *= ax.extent;
    q_stride *= q_extent;
  }
  if (stride > INT32_MAX) fail("more than 2^31 - 1 tokens per batch entry");
  P.tokens = stride;
  P.q_tokens = q_stride;
  P.batch = static_cast<int>(p.batch);
  P.heads = static_cast<int>(p.heads);
  P.heads_kv = static_cast<int>(p.heads_kv);
  P.group = static_cast<int>(p.heads / p.heads_kv);
  P.dim = static_cast<int>(p.dim);
  P.dim_v = static_cast<int>(p.dim_v);
  P.num_extra = static_cast<int>(p.num_extra);
  P.scale = static_cast<float>(p.scale);
  P.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  P.q = t.q;
  P.k = t.k;
  P.v = t.v;
  P.extra_k = t.extra_k;
  P.extra_v = t.extra_v;
  P.out = t.out;
  P.lse = static_cast<float*>(t.lse);
  P.d_out = t.d_out;
  P.d_lse = static_cast<float const*>(t.d_lse);
  P.d_q = t.d_q;
  P.d_k = t.d_k;
  P.d_v = t.d_v;
  P.d_extra_k = t.d_extra_k;
  P.d_extra_v = t.d_extra_v;
  return P;
}

// make_params for an instantiation's compile-time boxes.
template <int Rank, class QBox, class KVBox>
Params<Rank> make_box_params(NaProblem const& p, FnaTensors const& t, int head_dim,
                             char const* what) {
  int const q_box[3] = {QBox::extent(0), QBox::extent(1), QBox::extent(2)};
  int const kv_box[3] = {KVBox::extent(0), KVBox::extent(1), KVBox::extent(2)};
  return make_params<Rank>(p, t, head_dim, q_box, kv_box, what);
}

}  // namespace natten
