// Pieces shared by the reference kernels: the device-side problem, element conversion,
// warp-wide rows (lanes split the head dim), warp reductions, window enumeration on top of
// common/na_window.h, and launch helpers.
//
// Work decomposition: one warp per output row (a query, or a key for key-side gradients),
// over a grid-stride loop, so any problem size fits a grid. A row of up to kMaxHeadDim
// elements lives in registers as kPer elements per lane, element c in lane c % 32, slot
// c / 32; slots past the head dim hold 0, so they add nothing and are never stored.
//
// Arithmetic runs in the accumulation type Acc<T>: float, and double for double elements
// (a float sum would cap double inputs at float precision, which gradchecks detect).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/na_params.h"
#include "common/na_window.h"
#include "reference/kernels.h"

namespace natten::reference::detail {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------
// Problem, as the kernels see it.

template <int Rank>
struct Problem {
  AxisSpec axis[Rank];
  int64_t token_stride[Rank];  // flat token index = sum(coord[a] * token_stride[a])
  int64_t batch, heads, heads_kv, group, dim, dim_v, num_extra, tokens, window, rpb_size;
  double scale;  // converted to the accumulation type where used
};

template <int Rank>
Problem<Rank> make_problem(NaProblem const& p, char const* op) {
  auto fail = [&](std::string const& what) {
    throw std::invalid_argument(std::string("natten reference ") + op + ": " + what);
  };
  if (p.rank != Rank) {
    fail("problem rank " + std::to_string(p.rank) + " != kernel rank " + std::to_string(Rank));
  }
  if (p.heads_kv <= 0 || p.heads % p.heads_kv != 0) {
    fail("heads " + std::to_string(p.heads) + " not a multiple of heads_kv " +
         std::to_string(p.heads_kv));
  }
  if (p.dim > kMaxHeadDim || p.dim_v > kMaxHeadDim) {
    fail("head dim " + std::to_string(std::max(p.dim, p.dim_v)) + " > " +
         std::to_string(kMaxHeadDim));
  }
  Problem<Rank> P{};
  int64_t stride = 1;
  for (int a = Rank - 1; a >= 0; --a) {
    AxisSpec const& ax = p.axis[a];
    if (!axis_is_valid(ax)) fail("invalid window on axis " + std::to_string(a));
    P.axis[a] = ax;
    P.token_stride[a] = stride;
    stride *= ax.extent;
  }
  P.batch = p.batch;
  P.heads = p.heads;
  P.heads_kv = p.heads_kv;
  P.group = p.heads / p.heads_kv;
  P.dim = p.dim;
  P.dim_v = p.dim_v;
  P.num_extra = p.num_extra;
  P.tokens = p.tokens();
  P.window = p.window_size();
  P.rpb_size = p.rpb_size();
  P.scale = p.scale;
  return P;
}

// ------------------------------------------------------------------------------------------
// Element conversion: elements load into and store from the accumulation type.

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

__device__ __forceinline__ void store_acc(float* dst, float x) { *dst = x; }
__device__ __forceinline__ void store_acc(__half* dst, float x) { *dst = __float2half_rn(x); }
__device__ __forceinline__ void store_acc(__nv_bfloat16* dst, float x) {
  *dst = __float2bfloat16_rn(x);
}
__device__ __forceinline__ void store_acc(double* dst, double x) { *dst = x; }

// Softmax arithmetic of the accumulation type (the float forms are the fast single-precision
// functions the kernels always used).
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

// ------------------------------------------------------------------------------------------
// Warp rows and reductions. Butterfly sums leave the same bits in every lane.

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarpSize; }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Two independent sums in one pass (their shuffles overlap).
template <typename A>
__device__ __forceinline__ void warp_sum2(A& a, A& b) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) {
    A const ra = __shfl_xor_sync(kFullMask, a, o);
    A const rb = __shfl_xor_sync(kFullMask, b, o);
    a += ra;
    b += rb;
  }
}

// Register row of a warp in accumulation type A: element c = lane + 32 * j in slot j.
template <int kPer, typename A>
struct Row {
  A v[kPer];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < kPer; ++j) v[j] = A(0);
  }

  // this = scale * src[0, n); slots past n are 0.
  template <typename T>
  __device__ __forceinline__ void load(T const* src, int64_t n, int lane, A scale) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      int64_t const c = lane + int64_t{kWarpSize} * j;
      v[j] = c < n ? to_acc(src[c]) * scale : A(0);
    }
  }

  // dst[0, n) = scale * this.
  template <typename T>
  __device__ __forceinline__ void store(T* dst, int64_t n, int lane, A scale) const {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      int64_t const c = lane + int64_t{kWarpSize} * j;
      if (c < n) store_acc(dst + c, v[j] * scale);
    }
  }

  // This lane's part of this . src[0, n) (not reduced over the warp).
  template <typename T>
  __device__ __forceinline__ A partial_dot(T const* src, int64_t n, int lane) const {
    A s = A(0);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      int64_t const c = lane + int64_t{kWarpSize} * j;
      if (c < n) s += v[j] * to_acc(src[c]);
    }
    return s;
  }

  // This lane's part of this . other.
  __device__ __forceinline__ A partial_dot(Row const& o) const {
    A s = A(0);
#pragma unroll
    for (int j = 0; j < kPer; ++j) s += v[j] * o.v[j];
    return s;
  }

  // this += alpha * src[0, n).
  template <typename T>
  __device__ __forceinline__ void axpy(A alpha, T const* src, int64_t n, int lane) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      int64_t const c = lane + int64_t{kWarpSize} * j;
      if (c < n) v[j] += alpha * to_acc(src[c]);
    }
  }

  // this += alpha * other.
  __device__ __forceinline__ void axpy(A alpha, Row const& o) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) v[j] += alpha * o.v[j];
  }
};

// ------------------------------------------------------------------------------------------
// Windows on the token grid (all arithmetic from common/na_window.h).

// One coordinate of the token grid, split into its dilation group and group coordinate.
struct AxisPos {
  int64_t residue;
  int64_t group_len;
  int64_t gi;
};

__device__ __forceinline__ AxisPos axis_pos(AxisSpec const& a, int64_t coord) {
  int64_t const r = coord % a.dilation;
  return {r, group_length(a, r), coord / a.dilation};
}

template <int Rank>
__device__ __forceinline__ void token_coords(Problem<Rank> const& P, int64_t token,
                                             int64_t (&c)[Rank]) {
#pragma unroll
  for (int a = Rank - 1; a >= 0; --a) {
    c[a] = token % P.axis[a].extent;
    token /= P.axis[a].extent;
  }
}

// An arithmetic run of tokens along one axis: base + i * step, i < count.
struct Run {
  int64_t base;
  int64_t step;
  int64_t count;
};

// Run of group coordinates [first, last] of dilation group `residue` along axis a.
template <int Rank>
__device__ __forceinline__ Run group_run(Problem<Rank> const& P, int a, int64_t residue,
                                         int64_t first, int64_t last) {
  int64_t const d = P.axis[a].dilation, ts = P.token_stride[a];
  return {(first * d + residue) * ts, d * ts, last >= first ? last - first + 1 : 0};
}

// Keys that query token x sees, one run per axis.
template <int Rank>
__device__ __forceinline__ void window_runs(Problem<Rank> const& P, int64_t x, Run (&runs)[Rank]) {
  int64_t c[Rank];
  token_coords(P, x, c);
#pragma unroll
  for (int a = 0; a < Rank; ++a) {
    AxisPos const q = axis_pos(P.axis[a], c[a]);
    AxisWindow const w = axis_window(P.axis[a], q.group_len, q.gi);
    runs[a] = group_run(P, a, q.residue, w.first, w.last);
  }
}

// Queries that see key token y, one run per axis (some run is empty when none does).
template <int Rank>
__device__ __forceinline__ void inverse_runs(Problem<Rank> const& P, int64_t y,
                                             Run (&runs)[Rank]) {
  int64_t c[Rank];
  token_coords(P, y, c);
#pragma unroll
  for (int a = 0; a < Rank; ++a) {
    AxisPos const k = axis_pos(P.axis[a], c[a]);
    AxisRange const r = axis_inverse_window(P.axis[a], k.group_len, k.gi);
    runs[a] = group_run(P, a, k.residue, r.first, r.last);
  }
}

template <int A, int Rank, typename F>
__device__ __forceinline__ void for_each_token_impl(Run const* runs, int64_t token, F& f) {
  if constexpr (A == Rank) {
    f(token);
  } else {
    int64_t t = token + runs[A].base;
    for (int64_t i = 0; i < runs[A].count; ++i, t += runs[A].step) {
      for_each_token_impl<A + 1, Rank>(runs, t, f);
    }
  }
}

// f(token) for every token of the product of the runs, row-major.
template <int Rank, typename F>
__device__ __forceinline__ void for_each_token(Run const (&runs)[Rank], F&& f) {
  for_each_token_impl<0, Rank>(runs, 0, f);
}

// ------------------------------------------------------------------------------------------
// Window offsets (unfused ops): attn[..., j] with j row-major over per-axis offsets
// i in [0, k), offset i standing for key group coordinate window.start + i.

struct OffsetAxis {
  AxisWindow w;
  int64_t gi, residue, kernel, dilation, token_stride;
};

template <int Rank>
__device__ __forceinline__ void offset_axes(Problem<Rank> const& P, int64_t x,
                                            OffsetAxis (&ax)[Rank]) {
  int64_t c[Rank];
  token_coords(P, x, c);
#pragma unroll
  for (int a = 0; a < Rank; ++a) {
    AxisSpec const& s = P.axis[a];
    AxisPos const q = axis_pos(s, c[a]);
    ax[a] = {axis_window(s, q.group_len, q.gi), q.gi, q.residue, s.kernel, s.dilation,
             P.token_stride[a]};
  }
}

template <int A, int Rank, typename F>
__device__ __forceinline__ void for_each_offset_impl(OffsetAxis const* ax, int64_t j,
                                                     int64_t token, int64_t ri, bool visible,
                                                     F& f) {
  if constexpr (A == Rank) {
    f(j, token, ri, visible);
  } else {
    OffsetAxis const& o = ax[A];
    for (int64_t i = 0; i < o.kernel; ++i) {
      int64_t const yi = o.w.start + i;
      for_each_offset_impl<A + 1, Rank>(
          ax, j * o.kernel + i, token + (yi * o.dilation + o.residue) * o.token_stride,
          ri * (2 * o.kernel - 1) + (yi - o.gi) + o.kernel - 1,
          visible && yi >= o.w.first && yi <= o.w.last, f);
    }
  }
}

// f(j, key_token, rpb_index, visible) for every window offset j of query token x. The key
// token of an invisible offset is not to be read.
template <int Rank, typename F>
__device__ __forceinline__ void for_each_offset(Problem<Rank> const& P, int64_t x, F&& f) {
  OffsetAxis ax[Rank];
  offset_axes(P, x, ax);
  for_each_offset_impl<0, Rank>(ax, 0, 0, 0, true, f);
}

// Queries that see key token y, with the window offset at which each sees it.
struct InverseAxis {
  AxisSpec spec;
  int64_t group_len, yi, residue, x_first, x_last, token_stride;
};

template <int A, int Rank, typename F>
__device__ __forceinline__ void for_each_query_impl(InverseAxis const* ax, int64_t token,
                                                    int64_t j, F& f) {
  if constexpr (A == Rank) {
    f(token, j);
  } else {
    InverseAxis const& o = ax[A];
    for (int64_t xi = o.x_first; xi <= o.x_last; ++xi) {
      AxisWindow const w = axis_window(o.spec, o.group_len, xi);
      for_each_query_impl<A + 1, Rank>(
          ax, token + (xi * o.spec.dilation + o.residue) * o.token_stride,
          j * o.spec.kernel + (o.yi - w.start), f);
    }
  }
}

// f(query_token, j) for every query that sees key token y, j the offset of y in its window.
template <int Rank, typename F>
__device__ __forceinline__ void for_each_query_of_key(Problem<Rank> const& P, int64_t y, F&& f) {
  int64_t c[Rank];
  token_coords(P, y, c);
  InverseAxis ax[Rank];
#pragma unroll
  for (int a = 0; a < Rank; ++a) {
    AxisSpec const& s = P.axis[a];
    AxisPos const k = axis_pos(s, c[a]);
    AxisRange const r = axis_inverse_window(s, k.group_len, k.gi);
    ax[a] = {s, k.group_len, k.gi, k.residue, r.first, r.last, P.token_stride[a]};
  }
  for_each_query_impl<0, Rank>(ax, 0, 0, f);
}

// ------------------------------------------------------------------------------------------
// Launching.

// Grid-stride loop over warps: for (w = first_warp(); w < total; w += warp_stride()).
__device__ __forceinline__ int64_t first_warp() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t warp_stride() {
  return static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
}

// Blocks for `items` work items of one warp (or `per_block` items per block); capped, the
// kernels loop over the rest.
inline unsigned grid_blocks(int64_t items, int64_t per_block = kWarpsPerBlock) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  int64_t const blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

inline void check_launch(char const* what) {
  cudaError_t const e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("natten reference: launch of ") + what +
                             " failed: " + cudaGetErrorString(e));
  }
}

// Calls f(std::integral_constant<int, kPer>) with the fewest register slots per lane that
// hold a row of `dim` elements.
template <typename F>
void with_row_slots(int64_t dim, F&& f) {
  if (dim <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (dim <= 128) {
    f(std::integral_constant<int, 4>{});
  } else if (dim <= 256) {
    f(std::integral_constant<int, 8>{});
  } else if (dim <= kMaxHeadDim) {
    f(std::integral_constant<int, 16>{});
  } else {
    throw std::invalid_argument("natten reference: head dim " + std::to_string(dim) + " > " +
                                std::to_string(kMaxHeadDim));
  }
}

}  // namespace natten::reference::detail
