// Fused neighbourhood attention backward for SM80+ (mma.sync + cp.async), as three kernels:
//   delta: delta = rowsum(dO * O) - dLSE per (token, head): the row term of the softmax
//          gradient, computed once instead of in every CTA that needs it;
//   dQ:    query-box major like the forward (KeyWalk, then the additional keys); P is recomputed
//          from the forward's LSE, so no score matrix is ever stored;
//   dK/dV: key-box major (QueryWalk, over every query head of the GQA group), with the scores
//          transposed so that the CTA's keys are the MMA rows and dK, dV stay in registers.
// A call computing a query range (common/tile_geometry.cuh) tiles only its queries in the dQ
// kernel and walks only them in the dK/dV kernel; delta, like q, d_out and lse, holds the
// range's rows. Every gradient element has exactly one writer, so there are no atomics and the
// results are deterministic. With S the raw scores and lse the natural-log LSE:
//   P = exp(scale * S - lse),  dP = dO.V^T,  dS = P * (dP - delta)   (gradient of scale * S)
//   dQ = scale * dS.K,  dK = scale * dS^T.Q,  dV = P^T.dO.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <type_traits>

#include "sm80/launch.h"
#include "sm80/mainloop.cuh"

namespace natten::sm80 {

// The LSE is stored as a natural log; the kernels exponentiate with exp2.
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// delta
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }

// Sum of a * b over the elements of two 16-byte pieces of T, in float32.
template <typename T>
__device__ __forceinline__ float piece_dot(uint4 a, uint4 b, float sum) {
  if constexpr (std::is_same_v<T, float>) {
    float4 const u = *reinterpret_cast<float4 const*>(&a), v = *reinterpret_cast<float4 const*>(&b);
    return fmaf(u.x, v.x, fmaf(u.y, v.y, fmaf(u.z, v.z, fmaf(u.w, v.w, sum))));
  } else {
    using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    auto const* x = reinterpret_cast<Pair const*>(&a);
    auto const* y = reinterpret_cast<Pair const*>(&b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 const u = to_float2(x[i]), v = to_float2(y[i]);
      sum = fmaf(u.x, v.x, fmaf(u.y, v.y, sum));
    }
    return sum;
  }
}

// As kForwardMinBlocks: CTAs per SM the dQ and dK/dV kernels ask for (four at head dim 32, two
// for TF32).
template <int HeadDim, bool kTf32>
inline constexpr int kBackwardMinBlocks = HeadDim > 32 ? 1 : kTf32 ? 2 : 4;

constexpr int kDeltaWarps = 8;

// Lanes per (token, head) row of the delta kernel: enough for the row's 16-byte pieces (a power
// of two, at most a warp), so that small head dims do not leave most of each warp idle.
inline int delta_lanes_per_row(int pieces) {
  int lanes = 1;
  while (lanes < 32 && lanes < pieces) lanes *= 2;
  return lanes;
}

// `lanes` lanes per row of O and dO, taking 16-byte pieces (dim a multiple of a piece).
template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32)
    fna_backward_delta_kernel(T const* out, T const* d_out, float const* d_lse, float* delta,
                              int64_t rows, int dim, int lanes) {
  constexpr int kPiece = 16 / sizeof(T);
  int const lane = threadIdx.x % 32;
  int64_t const row = (int64_t(blockIdx.x) * kDeltaWarps + threadIdx.x / 32) * (32 / lanes) + lane / lanes;
  bool const real = row < rows;  // every lane stays for the shuffles
  float sum = 0.f;
  for (int c = (lane % lanes) * kPiece; real && c < dim; c += lanes * kPiece) {
    uint4 const o = *reinterpret_cast<uint4 const*>(out + row * dim + c);
    uint4 const d = *reinterpret_cast<uint4 const*>(d_out + row * dim + c);
    sum = piece_dot<T>(o, d, sum);
  }
  for (int m = lanes / 2; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffff, sum, m);
  // dLSE enters dS as + P * dLSE (d lse / d s_j = P_j), i.e. as a shift of delta.
  if (real && lane % lanes == 0) delta[row] = sum - (d_lse != nullptr ? d_lse[row] : 0.f);
}

// ---------------------------------------------------------------------------------------------
// dQ
// ---------------------------------------------------------------------------------------------

template <class Traits, int Rank, int M, int N>
struct DqSmem {
  using Element = typename Traits::Element;
  alignas(128) Element q[M * Traits::kHeadDim];  // also the dQ staging tile
  alignas(128) Element d_out[M * Traits::kHeadDim];
  // K is read by both the scores and dS.K, so step n+1's K gets its own buffer to stream into
  // during step n; V is done after dO.V^T and is reloaded in place.
  alignas(128) Element k[2][N * Traits::kHeadDim];
  alignas(128) Element v[N * Traits::kHeadDim];
  RowTable<Rank, M> rows;
  float lse_log2[M];  // 0 for rows past the group's end: their probabilities stay finite
  float delta[M];
};

template <int Rank, class Traits, class QBox, class KVBox>
__global__ void __launch_bounds__(Traits::kThreads, kBackwardMinBlocks<Traits::kHeadDim, Traits::kTf32>)
    fna_backward_dq_kernel(Params<Rank> const p) {
#if NATTEN_SM80_DEVICE_CODE
  using Element = typename Traits::Element;
  constexpr int M = QBox::kSize, N = KVBox::kSize, D = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  using Smem = DqSmem<Traits, Rank, M, N>;
  Smem& sm = shared_storage<Smem>();
  int const tid = threadIdx.x;
  QueryBoxCta<Rank, QBox, KVBox> cta;
  if (!cta.init(p)) return;
  auto const& g = cta.g;
  auto const& walk = cta.walk;
  int const b = cta.b, h = cta.h, hk = cta.hk, steps = cta.steps;

  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Traits::template SmemRows<M>{});
  Tensor sdO = make_tensor(make_smem_ptr(sm.d_out), typename Traits::template SmemRows<M>{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v), typename Traits::template SmemRows<N>{});

  build_row_table<Rank, QBox, kThreads>(p, g, cta.q_origin, sm.rows, tid);
  __syncthreads();

  auto row_token = [&](int r) { return sm.rows.token[r]; };
  gather_rows<M, D, kThreads>(sQ, head_rows(static_cast<Element const*>(p.q), p.q_tokens, p.heads, b, h, p.dim),
                              row_token, p.dim, tid);
  gather_rows<M, D, kThreads>(
      sdO, head_rows(static_cast<Element const*>(p.d_out), p.q_tokens, p.heads, b, h, p.dim_v), row_token,
      p.dim_v, tid);
  Tensor sK0 = make_tensor(make_smem_ptr(sm.k[0]), typename Traits::template SmemRows<N>{});
  typename KeyWalk<Rank, QBox, KVBox>::Cursor at, next;  // of steps n, n + 1
  auto const first_keys = key_slice<Rank, KVBox>(walk, 0, at);
  load_keys<Rank, Traits>(p, g, first_keys, b, hk, sK0, p.k, p.extra_k, p.dim, tid);
  load_keys<Rank, Traits>(p, g, first_keys, b, hk, sV, p.v, p.extra_v, p.dim_v, tid);
  walk.advance(next);
  cp_async_fence();
  for (int r = tid; r < M; r += kThreads) {
    int64_t const t = sm.rows.token[r];
    int64_t const i = (int64_t(b) * p.q_tokens + t) * p.heads + h;
    sm.lse_log2[r] = t < 0 ? 0.f : p.lse[i] * kLog2e;
    sm.delta[r] = t < 0 ? 0.f : p.delta[i];
  }

  typename Traits::TiledMma mma;
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<M>, Int<D>>{});
  clear(acc_dq);
  auto const coords = acc_coords<Traits, M, N>(tid);

  for (int n = 0; n < steps; ++n) {
    int const buf = n & 1;
    Tensor sK = make_tensor(make_smem_ptr(sm.k[buf]), typename Traits::template SmemRows<N>{});
    Tensor sKt = make_tensor(make_smem_ptr(sm.k[buf]), typename Traits::template SmemRowsT<N>{});
    cp_async_wait<0>();
    __syncthreads();  // K(n), V(n) (and Q, dO, lse, delta) landed; every warp is done with step
                      // n-1, so the other K buffer is free
    auto const next_keys = key_slice<Rank, KVBox>(walk, n + 1, next);
    if (n + 1 < steps) {
      Tensor sK_next =
          make_tensor(make_smem_ptr(sm.k[buf ^ 1]), typename Traits::template SmemRows<N>{});
      load_keys<Rank, Traits>(p, g, next_keys, b, hk, sK_next, p.k, p.extra_k, p.dim, tid);
      cp_async_fence();
    }

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<M>, Int<N>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<M>, Int<N>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss<Traits>(acc_s, sQ, sK, tid);
    gemm_ss<Traits>(acc_dp, sdO, sV, tid);
    __syncthreads();  // every warp is done reading V(n)
    if (n + 1 < steps) {
      load_keys<Rank, Traits>(p, g, next_keys, b, hk, sV, p.v, p.extra_v, p.dim_v, tid);
      cp_async_fence();
    }

    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s_rc); ++i) {
      float const lse = sm.lse_log2[get<0>(coords(i, 0))];
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s_rc); ++j) s_rc(i, j) = exp2_approx(fmaf(s_rc(i, j), p.scale_log2, -lse));
    }
    mask_scores<Rank, KVBox>(p, walk, n, at, s_rc, coords, sm.rows, 0.f);
    at = next;
    walk.advance(next);
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s_rc); ++i) {
      float const delta = sm.delta[get<0>(coords(i, 0))];
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s_rc); ++j) dp_rc(i, j) = s_rc(i, j) * (dp_rc(i, j) - delta);
    }
    Tensor ds = convert<typename Traits::Operand>(acc_dp);
    Tensor ds_a = make_tensor(ds.data(), acc_as_a<Traits>(ds.layout()));
    gemm_rs<Traits>(acc_dq, ds_a, sKt, tid);
  }

  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= p.scale;
  __syncthreads();  // every warp is done reading sQ
  store_acc<Traits>(acc_dq, sQ, tid);
  __syncthreads();
  scatter_rows<M, D, kThreads>(sQ, head_rows(static_cast<Element*>(p.d_q), p.q_tokens, p.heads, b, h, p.dim),
                               row_token, p.dim, tid);
#endif
}

// ---------------------------------------------------------------------------------------------
// dK/dV
// ---------------------------------------------------------------------------------------------

// The dK/dV kernel's query boxes: QBox cut along its leading axes to at most kMax tokens, so
// that a step's transposed scores fit in registers beside the dK and dV accumulators (64: a
// few spilled registers at head dim 128 on SM80; 32 spills none but doubles the steps). Each cut
// is a contiguous run of QBox's row-major tokens, so cut c of a QBox tile starts at
// QBox::offset(c * type::kSize, a).
template <class QBox, int kMax>
struct QueryCut {
  static constexpr int kCuts = QBox::kSize > kMax ? QBox::kSize / kMax : 1;
  static constexpr int f0 = QBox::extent(0) < kCuts ? QBox::extent(0) : kCuts;
  static constexpr int f1 = QBox::extent(1) < kCuts / f0 ? QBox::extent(1) : kCuts / f0;
  static constexpr int f2 = kCuts / (f0 * f1);
  using type = Box<QBox::extent(0) / f0, QBox::extent(1) / f1, QBox::extent(2) / f2>;
  static_assert(type::kSize * kCuts == QBox::kSize, "box extents must be powers of two");
};
// float32 at head dim 128 cuts to 32 queries: 64 would need 192 KiB of shared memory.
template <class QBox, class Traits>
using DkDvCut = QueryCut<QBox, Traits::kTf32 && Traits::kHeadDim >= 128 ? 32 : 64>;

template <class Traits, int Rank, int M, int C>
struct DkDvSmem {
  using Element = typename Traits::Element;
  alignas(128) Element k[M * Traits::kHeadDim];  // also the dK staging tile
  alignas(128) Element v[M * Traits::kHeadDim];  // also the dV staging tile
  // Double-buffered: step s+1's queries stream in while step s computes.
  alignas(128) Element q[2][C * Traits::kHeadDim];
  alignas(128) Element d_out[2][C * Traits::kHeadDim];
  RowTable<Rank, C> cols[2];
  float lse_log2[2][C];  // 0 for queries past the group's end: their probabilities stay finite
  float delta[2][C];
};

// One step of the dK/dV kernel: a query box of one query head.
template <int Rank>
struct QueryStep {
  int h;
  GroupCoords<Rank> g;  // the query box's group (for additional keys, not the CTA's)
  int origin[Rank];
  bool full;  // every query of the box is real and sees every (real) key of the CTA: no mask
};

// Sets invisible transposed probabilities (rows: the CTA's keys, columns: the step's queries)
// to `masked`. Keys past the group's end are in no window, so the query windows mask them too;
// queries past their group's end have a window no key is in. Branch-free, one unsigned compare
// per axis, like mask_scores.
template <int Rank, class KVBox, class Scores, class Coords, class Cols>
__device__ __forceinline__ void mask_scores_t(Params<Rank> const& p,
                                              KeySlice<Rank, KVBox> const& keys, Scores& s,
                                              Coords const& coords, Cols const& cols,
                                              float masked) {
  constexpr int kRows = decltype(size<0>(s))::value;
  if (keys.extra_first < 0) {
    int kc[kRows][Rank];
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int a = 0; a < Rank; ++a) {
        kc[i][a] = keys.origin[a] + KVBox::offset(get<0>(coords(i, 0)), a);
      }
    }
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      int const q = get<1>(coords(0, j));
      int first[Rank];
      unsigned span[Rank];
#pragma unroll
      for (int a = 0; a < Rank; ++a) {
        first[a] = cols.first[a][q];
        span[a] = static_cast<unsigned>(cols.last[a][q] - first[a]);
      }
      CUTE_UNROLL
      for (int i = 0; i < kRows; ++i) {
        bool visible = true;
#pragma unroll
        for (int a = 0; a < Rank; ++a) {
          visible = visible & (static_cast<unsigned>(kc[i][a] - first[a]) <= span[a]);
        }
        s(i, j) = visible ? s(i, j) : masked;
      }
    }
  } else {
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      bool const query_ok = cols.token[get<1>(coords(0, j))] >= 0;
      CUTE_UNROLL
      for (int i = 0; i < kRows; ++i) {
        bool const key_ok = keys.extra_first + get<0>(coords(i, 0)) < p.num_extra;
        s(i, j) = (query_ok & key_ok) ? s(i, j) : masked;
      }
    }
  }
}

template <int Rank, class Traits, class QBox, class KVBox>
__global__ void __launch_bounds__(Traits::kThreads, kBackwardMinBlocks<Traits::kHeadDim, Traits::kTf32>)
    fna_backward_dkdv_kernel(Params<Rank> const p) {
#if NATTEN_SM80_DEVICE_CODE
  using Element = typename Traits::Element;
  using Cut = DkDvCut<QBox, Traits>;
  using CBox = typename Cut::type;
  constexpr int M = KVBox::kSize, C = CBox::kSize, D = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  using Smem = DkDvSmem<Traits, Rank, M, C>;
  Smem& sm = shared_storage<Smem>();
  int const tid = threadIdx.x;
  int const b = blockIdx.z, hk = blockIdx.y;

  // CTAs past the key boxes of the grid own slices of M additional keys. Those are seen by
  // every query, so their steps are every query box of every dilation group.
  int kv_tiles = 1, q_tiles = 1;
#pragma unroll
  for (int a = 0; a < Rank; ++a) {
    kv_tiles *= p.axis[a].kv_tiles * int(p.axis[a].spec.dilation);
    q_tiles *= p.axis[a].q_tiles * int(p.axis[a].spec.dilation);
  }
  GroupCoords<Rank> g;
  KeySlice<Rank, KVBox> keys;
  QueryWalk<Rank, CBox, KVBox> walk;
  int per_head;
  if (int(blockIdx.x) < kv_tiles) {
    if (!decompose_tile<Rank, KVBox>(p, blockIdx.x, false, g, keys.origin)) return;
    keys.extra_first = -1;
    walk.init(p, g, keys.origin);
    per_head = walk.tiles;
  } else {
    keys.extra_first = (int(blockIdx.x) - kv_tiles) * M;
    per_head = q_tiles * Cut::kCuts;
  }
  // No step at all (no query sees the box) still writes the zero gradients.
  int const steps = p.group * per_head;

  auto step = [&](int s) {
    QueryStep<Rank> q;
    q.h = hk * p.group + s / per_head;
    int const n = s % per_head;
    if (keys.extra_first < 0) {
      q.g = g;
      walk.origin(n, q.origin);
      q.full = walk.full(p, g, q.origin, keys.origin);
    } else {
      // A tile or cut past its group's end just has no real queries (decompose_tile still
      // fills the coordinates), so it contributes nothing.
      decompose_tile<Rank, QBox>(p, n / Cut::kCuts, true, q.g, q.origin);
      bool whole = keys.extra_first + M <= p.num_extra;
#pragma unroll
      for (int a = 0; a < Rank; ++a) {
        q.origin[a] += QBox::offset((n % Cut::kCuts) * C, a);
        whole = whole && q.origin[a] + CBox::extent(a) <= q.g.q_end[a];
      }
      q.full = whole;
    }
    return q;
  };

  auto const* q_ptr = static_cast<Element const*>(p.q);
  auto const* d_out_ptr = static_cast<Element const*>(p.d_out);
  // Needs the row table of `buf` complete and visible.
  auto load_queries = [&](QueryStep<Rank> const& qs, int buf) {
    auto const& cols = sm.cols[buf];
    auto col_token = [&](int r) { return cols.token[r]; };
    Tensor sQ = make_tensor(make_smem_ptr(sm.q[buf]), typename Traits::template SmemRows<C>{});
    Tensor sdO =
        make_tensor(make_smem_ptr(sm.d_out[buf]), typename Traits::template SmemRows<C>{});
    gather_rows<C, D, kThreads>(sQ, head_rows(q_ptr, p.q_tokens, p.heads, b, qs.h, p.dim), col_token,
                                p.dim, tid);
    gather_rows<C, D, kThreads>(sdO, head_rows(d_out_ptr, p.q_tokens, p.heads, b, qs.h, p.dim_v),
                                col_token, p.dim_v, tid);
    cp_async_fence();
    for (int r = tid; r < C; r += kThreads) {
      int64_t const t = cols.token[r];
      int64_t const i = (int64_t(b) * p.q_tokens + t) * p.heads + qs.h;
      sm.lse_log2[buf][r] = t < 0 ? 0.f : p.lse[i] * kLog2e;
      sm.delta[buf][r] = t < 0 ? 0.f : p.delta[i];
    }
  };

  Tensor sK = make_tensor(make_smem_ptr(sm.k), typename Traits::template SmemRows<M>{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v), typename Traits::template SmemRows<M>{});
  QueryStep<Rank> next;
  if (steps > 0) {
    load_keys<Rank, Traits>(p, g, keys, b, hk, sK, p.k, p.extra_k, p.dim, tid);
    load_keys<Rank, Traits>(p, g, keys, b, hk, sV, p.v, p.extra_v, p.dim_v, tid);
    next = step(0);
    build_row_table<Rank, CBox, kThreads>(p, next.g, next.origin, sm.cols[0], tid);
  }
  __syncthreads();
  if (steps > 0) load_queries(next, 0);

  typename Traits::TiledMma mma;
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<M>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<M>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);
  auto const coords = acc_coords<Traits, M, C>(tid);

  for (int s = 0; s < steps; ++s) {
    int const buf = s & 1;
    bool const full = next.full;
    cp_async_wait<0>();
    __syncthreads();  // step s's queries (and at s = 0 the keys) landed; every warp is done
                      // with step s-1, whose buffers step s+1 reuses
    if (s + 1 < steps) {
      next = step(s + 1);
      build_row_table<Rank, CBox, kThreads>(p, next.g, next.origin, sm.cols[buf ^ 1], tid);
    }
    __syncthreads();  // the gathers below read the whole table
    if (s + 1 < steps) load_queries(next, buf ^ 1);

    Tensor sQ = make_tensor(make_smem_ptr(sm.q[buf]), typename Traits::template SmemRows<C>{});
    Tensor sQt = make_tensor(make_smem_ptr(sm.q[buf]), typename Traits::template SmemRowsT<C>{});
    Tensor sdO =
        make_tensor(make_smem_ptr(sm.d_out[buf]), typename Traits::template SmemRows<C>{});
    Tensor sdOt =
        make_tensor(make_smem_ptr(sm.d_out[buf]), typename Traits::template SmemRowsT<C>{});
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<M>, Int<C>>{});   // S^T = K.Q^T
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<M>, Int<C>>{});  // dP^T = V.dO^T
    clear(acc_s);
    clear(acc_dp);
    gemm_ss<Traits>(acc_s, sK, sQ, tid);
    gemm_ss<Traits>(acc_dp, sV, sdO, tid);

    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s_rc); ++j) {
      float const lse = sm.lse_log2[buf][get<1>(coords(0, j))];
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s_rc); ++i) s_rc(i, j) = exp2_approx(fmaf(s_rc(i, j), p.scale_log2, -lse));
    }
    if (!full) mask_scores_t<Rank, KVBox>(p, keys, s_rc, coords, sm.cols[buf], 0.f);
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s_rc); ++j) {
      float const delta = sm.delta[buf][get<1>(coords(0, j))];
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s_rc); ++i) dp_rc(i, j) = s_rc(i, j) * (dp_rc(i, j) - delta);
    }
    Tensor pt = convert<typename Traits::Operand>(acc_s);
    Tensor pt_a = make_tensor(pt.data(), acc_as_a<Traits>(pt.layout()));
    Tensor dst = convert<typename Traits::Operand>(acc_dp);
    Tensor dst_a = make_tensor(dst.data(), acc_as_a<Traits>(dst.layout()));
    gemm_rs<Traits>(acc_dv, pt_a, sdOt, tid);
    gemm_rs<Traits>(acc_dk, dst_a, sQt, tid);
  }

  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.scale;
  __syncthreads();  // every warp is done reading sK and sV
  store_acc<Traits>(acc_dk, sK, tid);
  store_acc<Traits>(acc_dv, sV, tid);
  __syncthreads();
  auto key_token = [&](int r) { return keys.token(p, g, r); };
  scatter_rows<M, D, kThreads>(sK, keys.rows(p, static_cast<Element*>(p.d_k), static_cast<Element*>(p.d_extra_k), b, hk, p.dim),
                               key_token, p.dim, tid);
  scatter_rows<M, D, kThreads>(sV, keys.rows(p, static_cast<Element*>(p.d_v), static_cast<Element*>(p.d_extra_v), b, hk, p.dim_v),
                               key_token, p.dim_v, tid);
#endif
}

// ---------------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------------

inline size_t fna_backward_workspace_floats(NaProblem const& p) {
  return static_cast<size_t>(p.batch * p.query_tokens() * p.heads);
}

// delta = rowsum(O * dO) - dLSE of every (query of the range, head) row, into `delta`.
template <typename T>
void launch_backward_delta(void const* out, void const* d_out, float const* d_lse, float* delta,
                           int64_t rows, int dim_v, cudaStream_t stream, char const* what) {
  int const lanes = delta_lanes_per_row(dim_v * int(sizeof(T)) / 16);
  int64_t const rows_per_block = int64_t(kDeltaWarps) * (32 / lanes);
  launch(fna_backward_delta_kernel<T>, dim3(grid_x((rows + rows_per_block - 1) / rows_per_block)),
         kDeltaWarps * 32, 0, stream, what, static_cast<T const*>(out), static_cast<T const*>(d_out),
         d_lse, delta, rows, dim_v, lanes);
}

// The dQ kernel over every query box of p (p.delta filled): each dQ element is written once, by
// the CTA of its query box, which sums over the box's keys in a fixed order. The Hopper family's
// deterministic backward runs it too (sm90/bwd_launch.cuh).
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void launch_backward_dq(Params<Rank> const& p, cudaStream_t stream, char const* what) {
  // dQ keeps a (query box x head dim) accumulator plus two score tiles per thread: 8 warps for
  // 128-token query boxes keep that at 16 rows a warp, as for 64-token boxes with 4 warps.
  using DqTraits = MmaTraits<T, HeadDim, (QBox::kSize >= 128 ? 8 : 4)>;
  static_assert(QBox::kSize % (16 * (QBox::kSize >= 128 ? 8 : 4)) == 0,
                "query box must fill the dQ warps");
  int64_t q_tiles = 1;
  for (int a = 0; a < Rank; ++a) q_tiles *= int64_t(p.axis[a].q_tiles) * p.axis[a].spec.dilation;
  launch(fna_backward_dq_kernel<Rank, DqTraits, QBox, KVBox>, dim3(grid_x(q_tiles), p.heads, p.batch),
         DqTraits::kThreads, sizeof(DqSmem<DqTraits, Rank, QBox::kSize, KVBox::kSize>), stream, what, p);
}

template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_backward(NaProblem const& problem, FnaTensors const& t, float* workspace,
                  cudaStream_t stream) {
  using DkDvTraits = MmaTraits<T, HeadDim, 4>;
  static_assert(KVBox::kSize % 64 == 0, "key box must fill the dK/dV warps");
  constexpr int kCut = DkDvCut<QBox, DkDvTraits>::type::kSize;
  static_assert(kCut % DkDvTraits::kAtomK == 0, "query cut must be whole MMA K slices");

  Params<Rank> p = make_box_params<Rank, QBox, KVBox>(problem, t, HeadDim, "sm80 fna_backward");
  if (p.batch == 0 || p.heads == 0 || p.tokens == 0) return;
  if (p.num_extra > 0 && (t.d_extra_k == nullptr || t.d_extra_v == nullptr)) {
    throw std::invalid_argument("natten sm80 fna_backward: additional keys need their gradients");
  }
  p.delta = workspace;
  launch_backward_delta<T>(t.out, t.d_out, p.d_lse, p.delta, int64_t(p.batch) * p.q_tokens * p.heads,
                           p.dim_v, stream, "fna_backward (delta)");
  launch_backward_dq<Rank, T, HeadDim, QBox, KVBox>(p, stream, "fna_backward (dQ)");
  int64_t kv_tiles = 1;
  for (int a = 0; a < Rank; ++a) kv_tiles *= int64_t(p.axis[a].kv_tiles) * p.axis[a].spec.dilation;
  int64_t const extra_slices = (int64_t(p.num_extra) + KVBox::kSize - 1) / KVBox::kSize;
  launch(fna_backward_dkdv_kernel<Rank, DkDvTraits, QBox, KVBox>,
         dim3(grid_x(kv_tiles + extra_slices), p.heads_kv, p.batch), DkDvTraits::kThreads,
         sizeof(DkDvSmem<DkDvTraits, Rank, KVBox::kSize, kCut>), stream, "fna_backward (dK/dV)",
         p);
}

}  // namespace natten::sm80
