// Consumer side of the SM90 forward: shared-memory layouts, the two warpgroup GEMMs (wgmma),
// the score mask and the online softmax.
//
// Each consumer warpgroup owns 64 query rows of the CTA's query box. S = Q.K^T reads both
// operands from shared memory; O += P.V takes P straight from S's accumulators (converted to
// the element type in registers) and V from shared memory, read MN-major (V lies token-major
// there, as TMA loaded it). Accumulators are float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "sm80/mainloop.cuh"
#include "sm90/fwd_mask.cuh"
#include "sm90/fwd_params.h"

// wgmma, setmaxnreg and the TMA are arch-conditional: device code exists for sm_90a only, and
// the kernels compile empty for every other target (the backend never launches them there).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NATTEN_SM90_DEVICE_CODE 1
#else
#define NATTEN_SM90_DEVICE_CODE 0
#endif

namespace natten::sm90 {

using namespace cute;

// Registers per thread after the producer warpgroup of a two-consumer CTA (the forward's and the
// backward's) gives its own away: the CTA stays inside the register file
// (128 * 40 + 256 * 232 <= 65536). A forward with one consumer has 240 from the start.
constexpr uint32_t kProducerRegs = 40;
constexpr uint32_t kConsumerRegs = 232;

// Compile-time shape of one forward instantiation.
// kPingPong: the two consumer warpgroups take turns issuing their GEMMs, so that one's softmax
// runs while the other's GEMMs occupy the tensor cores.
template <int Rank_, class Element_, int HeadDim, class QTile_, class KVTile_, bool kPingPong_ = false>
struct ForwardConfig {
  static constexpr int Rank = Rank_;
  static constexpr bool kPingPong = kPingPong_;
  using QTile = QTile_;
  using KVTile = KVTile_;
  using Mask = BitMask<Rank, QTile, KVTile>;  // of partial key boxes (fwd_mask.cuh)
  using Element = typename sm80::ElementOf<Element_>::type;  // cutlass::half_t / bfloat16_t
  static constexpr int M = QTile::kSize;
  static constexpr int N = KVTile::kSize;
  static constexpr int D = HeadDim;
  static constexpr int kConsumers = M / 64;  // warpgroups, 64 query rows each
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kChunks = D / kChunkCols;
  static_assert(sizeof(Element) == 2, "16-bit elements only (a 128-byte swizzle span is 64 columns)");
  static_assert(M % 64 == 0 && M <= 128, "query tiles of 64 or 128 tokens");
  static_assert(!kPingPong || kConsumers == 2, "ping-pong needs two consumer warpgroups");
  static_assert(N % 16 == 0 && N <= 256, "key tiles of 16..256 tokens, a multiple of 16");
  static_assert(D % kChunkCols == 0 && D <= 256, "head dims of 64, 128, 192 or 256");

  // Key/value stages: as many as shared memory holds next to Q (227 KiB per CTA), at most 4.
  static constexpr int kSmemLimit = 227 * 1024;
  static constexpr int kStageBytes = 2 * N * D * int(sizeof(Element));
  static constexpr int kStages =
      (kSmemLimit - M * D * int(sizeof(Element)) - 2048) / kStageBytes > 4
          ? 4
          : (kSmemLimit - M * D * int(sizeof(Element)) - 2048) / kStageBytes;
  static_assert(kStages >= 2, "tile shapes too large for two key/value stages");

  // K-major, 128-byte swizzled rows: exactly what a TMA box with SWIZZLE_128B writes, one
  // 64-column chunk after the other.
  using Atom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(Atom{}, Shape<Int<M>, Int<D>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(Atom{}, Shape<Int<N>, Int<D>, Int<kStages>>{}));
  // The same V bytes as the (D, N) B operand of P.V.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<D>, Int<N>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using WarpgroupLayout = Layout<Shape<Int<kConsumers>, _1, _1>>;
  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<N>, Int<D>>>(), WarpgroupLayout{}));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<D>, Int<N>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupLayout{}));

  // P as P.V's A operand: a thread's S accumulators of one row pair hold columns
  // (2 adjacent, 2 rows, N/8 blocks of 8); the A fragment of one k16 step wants
  // (2 adjacent, 2 rows, 2 blocks of 8), so blocks 2k and 2k+1 form k step k.
  using PLayout = Layout<Shape<Shape<_2, _2, _2>, _1, Int<N / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>;
};

// One asynchronous warpgroup GEMM, committed as one batch: c (+)= a.b over every k step.
// The caller waits for it (warpgroup_wait) before reading c or changing register operands.
template <bool kZeroInit, class Mma, class A, class B, class C>
__device__ __forceinline__ void warpgroup_gemm(Mma& mma, A const& a, B const& b, C& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Online softmax over one tile of scores s (invisible ones -inf) that are `scale_log2` times
// too small (1 when the caller scaled them): updates the running row maxima (log2 units) and
// partial sums, turns s into unnormalised probabilities and returns in alpha the factor the
// output rows must be rescaled by. Needs scale_log2 > 0.
template <class S>
__device__ __forceinline__ void online_softmax(S& s, float (&row_max)[2], float (&row_sum)[2],
                                               float (&alpha)[2], float scale_log2) {
  float mx[2] = {-INFINITY, -INFINITY};
  CUTE_UNROLL
  for (int v = 0; v < size(s); ++v) mx[row_half(v)] = fmaxf(mx[row_half(v)], s(v));
  float m_use[2];
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    float const m = fmaxf(row_max[i], quad_max(mx[i]) * scale_log2);
    // A row with nothing visible yet keeps max -inf; use 0 so that exp2 gives 0, not NaN.
    m_use[i] = m == -INFINITY ? 0.f : m;
    alpha[i] = fast_exp2(row_max[i] - m_use[i]);
    row_max[i] = m;
  }
  float sum[2] = {0.f, 0.f};
  CUTE_UNROLL
  for (int v = 0; v < size(s); ++v) {
    float const e = fast_exp2(fmaf(s(v), scale_log2, -m_use[row_half(v)]));
    s(v) = e;
    sum[row_half(v)] += e;
  }
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) row_sum[i] = row_sum[i] * alpha[i] + sum[i];
}

template <class O>
__device__ __forceinline__ void rescale(O& o, float const (&alpha)[2]) {
  CUTE_UNROLL
  for (int v = 0; v < size(o); ++v) o(v) *= alpha[row_half(v)];
}

// Additional keys: columns past the last one (zero-filled by the load) are masked.
template <class S, class Cols>
__device__ __forceinline__ void mask_extra(S& s, Cols const& cols, int keys_left, float masked) {
  CUTE_UNROLL
  for (int v = 0; v < size(s); ++v) s(v) = get<1>(cols(v)) < keys_left ? s(v) : masked;
}

// Probabilities in the element type, packed two per register into p (N/2 elements, viewed
// through Config::PLayout as P.V's A operand).
template <class S, class P>
__device__ __forceinline__ void to_operand(S const& s, P& p) {
  using Element = typename P::value_type;
  Tensor p32 = recast<uint32_t>(p);
  CUTE_UNROLL
  for (int i = 0; i < size(p32); ++i) {
    uint32_t packed;
    if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
      __nv_bfloat162 const h = __floats2bfloat162_rn(s(2 * i), s(2 * i + 1));
      packed = reinterpret_cast<uint32_t const&>(h);
    } else {
      __half2 const h = __floats2half2_rn(s(2 * i), s(2 * i + 1));
      packed = reinterpret_cast<uint32_t const&>(h);
    }
    p32(i) = packed;
  }
}

}  // namespace natten::sm90
