// Fused neighbourhood attention forward for SM80+ (mma.sync + cp.async).
//
// One CTA per (query box, head, batch); the query boxes tile only the call's query range, the
// rows q, out and lse hold (common/tile_geometry.cuh). Its mainloop walks the key boxes of
// KeyWalk and then the additional keys, FlashAttention-2 style: S = Q.K^T (tensor cores, fp32
// accumulators), the mask only on boxes that are not fully visible, an online softmax in
// registers, O += P.V with P taken straight from the accumulators. K(n+1) streams in while P.V(n) runs and V(n) while
// Q.K^T(n) runs. The epilogue writes O (through shared memory, as whole 16-byte pieces) and the
// natural-log LSE.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "sm80/launch.h"
#include "sm80/mainloop.cuh"

namespace natten::sm80 {

// Key/value stages in flight: short rows (small head dims) have short steps, so more of the
// walk is loaded ahead to cover memory latency (a 7x7 window's whole walk is four 8x8 boxes);
// rows of 256 bytes or more double-buffer, which is all their shared memory allows at two CTAs
// per SM (or, for float32 at head dim 128, at one CTA on an A100).
template <int RowBytes>
inline constexpr int kForwardStages = RowBytes <= 64 ? 4 : RowBytes <= 128 ? 3 : 2;

// Small head dims have short steps and need few registers: ask for enough CTAs per SM to hide
// their latency. At head dim 32, 64-query boxes of rank 1 and 2 fit five CTAs (96 registers)
// without spilling; larger boxes and rank 3 keep more state and fit four. TF32 operands take
// twice the registers of 16-bit ones: two CTAs at head dim 32 (more would spill).
template <int HeadDim, int Rank, int M, bool kTf32>
inline constexpr int kForwardMinBlocks = HeadDim > 32 ? 1 : kTf32 ? 2 : Rank <= 2 && M <= 64 ? 5 : 4;

template <class Traits, int Rank, int M, int N>
struct ForwardSmem {
  using Element = typename Traits::Element;
  static constexpr int kStages = kForwardStages<Traits::kHeadDim * int(sizeof(Element))>;
  alignas(128) Element q[M * Traits::kHeadDim];  // also the output staging tile
  alignas(128) Element k[kStages][N * Traits::kHeadDim];
  alignas(128) Element v[kStages][N * Traits::kHeadDim];
  RowTable<Rank, M> rows;
};

// Online softmax over one block of scores s (rowcol view, invisible ones -inf), which are
// `scale_log2` times too small (1 when the caller scaled them already): updates the running row
// max (log2 units) and partial row sums, rescales o, and turns s into unnormalised
// probabilities exp2(s * scale_log2 - max). Needs scale_log2 > 0.
template <int kRows, class S, class O>
__device__ __forceinline__ void online_softmax(S& s, O& o, float (&row_max)[kRows],
                                               float (&row_sum)[kRows], float scale_log2) {
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    float mx = -INFINITY;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) mx = fmaxf(mx, s(i, j));
    mx = fmaxf(row_max[i], quad_max(mx) * scale_log2);
    // A row with nothing visible yet keeps max -inf; use 0 so that exp2 gives 0, not NaN.
    float const m_use = mx == -INFINITY ? 0.f : mx;
    float const alpha = exp2_approx(row_max[i] - m_use);
    row_max[i] = mx;
    float sum = 0.f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      float const e = exp2_approx(fmaf(s(i, j), scale_log2, -m_use));
      s(i, j) = e;
      sum += e;
    }
    row_sum[i] = row_sum[i] * alpha + sum;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o); ++j) o(i, j) *= alpha;
  }
}

template <int Rank, class Traits, class QBox, class KVBox>
__global__ void __launch_bounds__(Traits::kThreads, kForwardMinBlocks<Traits::kHeadDim, Rank, QBox::kSize, Traits::kTf32>)
    fna_forward_kernel(Params<Rank> const p) {
#if NATTEN_SM80_DEVICE_CODE
  using Element = typename Traits::Element;
  constexpr int M = QBox::kSize, N = KVBox::kSize, D = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  using Smem = ForwardSmem<Traits, Rank, M, N>;
  Smem& sm = shared_storage<Smem>();
  int const tid = threadIdx.x;
  QueryBoxCta<Rank, QBox, KVBox> cta;
  if (!cta.init(p)) return;
  auto const& g = cta.g;
  auto const& walk = cta.walk;
  int const b = cta.b, h = cta.h, hk = cta.hk, steps = cta.steps;

  constexpr int kStages = Smem::kStages;
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Traits::template SmemRows<M>{});
  auto stage_k = [&](int s) { return make_tensor(make_smem_ptr(sm.k[s]), typename Traits::template SmemRows<N>{}); };
  auto stage_v = [&](int s) { return make_tensor(make_smem_ptr(sm.v[s]), typename Traits::template SmemRows<N>{}); };

  // One cp.async group per step (keys and values together), committed even when empty so that
  // "group n complete" is always "at most kStages - 2 groups pending". Q rides in group 0.
  typename KeyWalk<Rank, QBox, KVBox>::Cursor load_at, mask_at;  // of steps n + kStages - 1, n
  auto load_step = [&](int n) {
    if (n < steps) {
      int const s = n % kStages;
      auto const keys = key_slice<Rank, KVBox>(walk, n, load_at);
      walk.advance(load_at);
      Tensor sK = stage_k(s);
      Tensor sV = stage_v(s);
      load_keys<Rank, Traits>(p, g, keys, b, hk, sK, p.k, p.extra_k, p.dim, tid);
      load_keys<Rank, Traits>(p, g, keys, b, hk, sV, p.v, p.extra_v, p.dim_v, tid);
    }
    cp_async_fence();
  };
  // The loads go out first; the row table, which only the masks and the epilogue read, is built
  // while they are in flight and published by the mainloop's first barrier.
  auto q_token = [&](int r) { return box_query_token<Rank, QBox>(p, g, cta.q_origin, r); };
  gather_rows<M, D, kThreads>(sQ, head_rows(static_cast<Element const*>(p.q), p.q_tokens, p.heads, b, h, p.dim),
                              q_token, p.dim, tid);
  CUTE_UNROLL
  for (int n = 0; n < kStages - 1; ++n) load_step(n);
  build_row_table<Rank, QBox, kThreads>(p, g, cta.q_origin, sm.rows, tid);

  typename Traits::TiledMma mma;
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<M>, Int<D>>{});
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(o_rc))::value;
  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  auto const coords = acc_coords<Traits, M, N>(tid);

  for (int n = 0; n < steps; ++n) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step n (and at first the row table) landed; every warp is done with step
                      // n - 1's stage
    load_step(n + kStages - 1);  // into the stage step n - 1 used

    int const s = n % kStages;
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<M>, Int<N>>{});
    clear(acc_s);
    gemm_ss<Traits>(acc_s, sQ, stage_k(s), tid);
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    if (p.scale_log2 > 0.f) {  // the usual case: the scale folds into the exponent's FMA
      mask_scores<Rank, KVBox>(p, walk, n, mask_at, s_rc, coords, sm.rows, -INFINITY);
      online_softmax(s_rc, o_rc, row_max, row_sum, p.scale_log2);
    } else {  // scale <= 0 reorders or flattens scores: scale before masking with -inf
      CUTE_UNROLL
      for (int i = 0; i < size(s_rc); ++i) s_rc(i) *= p.scale_log2;
      mask_scores<Rank, KVBox>(p, walk, n, mask_at, s_rc, coords, sm.rows, -INFINITY);
      online_softmax(s_rc, o_rc, row_max, row_sum, 1.f);
    }
    walk.advance(mask_at);
    Tensor probs = convert<typename Traits::Operand>(acc_s);
    Tensor probs_a = make_tensor(probs.data(), acc_as_a<Traits>(probs.layout()));
    gemm_rs<Traits>(acc_o, probs_a,
                    make_tensor(make_smem_ptr(sm.v[s]), typename Traits::template SmemRowsT<N>{}), tid);
  }

  // Epilogue: normalise, stage O in shared memory, write whole rows; LSE from lane 0 of a quad.
  float lse[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    float const l = quad_sum(row_sum[i]);
    float const inv = l > 0.f ? 1.f / l : 0.f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= inv;
    lse[i] = l > 0.f ? row_max[i] * 0.6931471805599453f + logf(l) : -INFINITY;  // log2 -> ln
  }
  cp_async_wait<0>();  // the trailing (empty) groups
  __syncthreads();     // every warp is done reading sQ and the stages
  store_acc<Traits>(acc_o, sQ, tid);
  __syncthreads();
  auto row_token = [&](int r) { return sm.rows.token[r]; };
  scatter_rows<M, D, kThreads>(sQ, head_rows(static_cast<Element*>(p.out), p.q_tokens, p.heads, b, h, p.dim_v),
                               row_token, p.dim_v, tid);
  if (tid % 4 == 0) {
    auto const o_coords = acc_coords<Traits, M, D>(tid);
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      int64_t const t = sm.rows.token[get<0>(o_coords(i, 0))];
      if (t >= 0) p.lse[(int64_t(b) * p.q_tokens + t) * p.heads + h] = lse[i];
    }
  }
#endif
}

template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_forward(NaProblem const& problem, FnaTensors const& t, cudaStream_t stream) {
  using Traits = MmaTraits<T, HeadDim, 4>;
  Params<Rank> const p = make_box_params<Rank, QBox, KVBox>(problem, t, HeadDim, "sm80 fna_forward");
  if (p.batch == 0 || p.heads == 0 || p.tokens == 0) return;
  int64_t q_tiles = 1;
  for (int a = 0; a < Rank; ++a) q_tiles *= int64_t(p.axis[a].q_tiles) * p.axis[a].spec.dilation;
  launch(fna_forward_kernel<Rank, Traits, QBox, KVBox>, dim3(grid_x(q_tiles), p.heads, p.batch),
         Traits::kThreads, sizeof(ForwardSmem<Traits, Rank, QBox::kSize, KVBox::kSize>), stream,
         "fna_forward", p);
}

}  // namespace natten::sm80
