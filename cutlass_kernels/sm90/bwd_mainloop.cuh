// Consumer side of the SM90 backward: shared-memory layouts, the five warpgroup GEMMs of a step
// and the elementwise work between them.
//
// The CTA's N = 128 keys are split over the two consumer warpgroups, 64 each, and every step
// brings M = 64 queries. All scores are kept transposed (keys are the rows), so that dK and dV,
// which live in registers for the whole walk, are plain accumulators of the warpgroup's rows:
//   S^T  = K.Q^T    dP^T = V.dO^T                     (SS: K, V, Q, dO from shared memory)
//   P^T  = exp2(S^T * scale log2(e) - lse log2(e))    dS^T = P^T * (dP^T - delta)
//   dV  += P^T.dO   dK  += dS^T.Q                     (RS: P^T, dS^T from registers; dO, Q read
//                                                      MN-major from the same stages)
//   dQ   = dS.K                                       (SS: dS^T staged in shared memory)
// dQ sums over every key box that sees a query, so each step's partial is added to a float32
// buffer in global memory (bwd_kernel.cuh). How the two warpgroups share the dQ GEMM depends on
// the head dim, because an MN-major operand must span whole 64-column swizzle atoms: at head dim
// 128 each warpgroup takes 64 of dQ's columns over all 128 keys (both halves of dS^T, so the
// warpgroups meet at a barrier); at head dim 64 each takes all columns over its own 64 keys, and
// the two partials are both added to the buffer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/tile_geometry.cuh"
#include "sm90/bwd_mask.cuh"
#include "sm90/bwd_params.h"
#include "sm90/fwd_mainloop.cuh"

namespace natten::sm90 {

using namespace cute;

// kDq: how dQ's partials reach dQ (DqPath, bwd_params.h).
template <int Rank_, class Element_, int HeadDim, class QTile_, class KVTile_, DqPath kDq_ = DqPath::kAtomic>
struct BackwardConfig {
  static constexpr DqPath kDq = kDq_;
  static constexpr bool kWithDq = kDq == DqPath::kAtomic || kDq == DqPath::kBulk;
  static constexpr int Rank = Rank_;
  using QTile = QTile_;
  using KVTile = KVTile_;
  using Element = typename sm80::ElementOf<Element_>::type;  // cutlass::half_t / bfloat16_t
  static constexpr int M = QTile::kSize;
  static constexpr int N = KVTile::kSize;
  static constexpr int D = HeadDim;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kChunks = D / kChunkCols;
  static_assert(sizeof(Element) == 2, "16-bit elements only (a 128-byte swizzle span is 64 columns)");
  // 64 queries: S^T, dP^T, dK and dV of one warpgroup's 64 keys then take 192 registers a thread.
  static_assert(M == 64, "query boxes of 64 tokens");
  static_assert(N == 64 * kConsumers, "key boxes of 128 tokens, 64 per consumer warpgroup");
  static_assert(D == 64 || D == 128, "head dims of 64 or 128");

  // The dQ GEMM of one warpgroup: 64 query rows x kDqN columns over kDqK keys.
  static constexpr bool kDqSplitsKeys = D == kChunkCols;
  static constexpr int kDqN = kDqSplitsKeys ? D : D / 2;
  static constexpr int kDqK = kDqSplitsKeys ? N / 2 : N;
  static constexpr int kDsParts = N / kDqK;  // pieces of dS^T in shared memory, one per dQ GEMM
  // dQ staging rows (float32), padded by 32 bytes so that a quad's rows fall in distinct banks.
  static constexpr int kDqPitch = kDqN + 8;

  // Query stages: as many as shared memory holds (227 KiB per CTA), at most 4.
  static constexpr int kSmemLimit = 227 * 1024;
  static constexpr int kFixedBytes = 2 * N * D * 2                                // K, V
                                     + (kWithDq ? 2 * M * N * 2 : 0)              // dS^T, double-buffered
                                     + (kDq == DqPath::kBulk ? kConsumers * 64 * kDqPitch * 4 : 0)  // dQ staging
                                     + 4096;                                      // barriers, key table, walk
  static constexpr int kStageBytes = 2 * M * D * 2 + M * 4 * 4 + 64;  // Q, dO, StepTable
  static constexpr int kStages = (kSmemLimit - kFixedBytes) / kStageBytes > 4
                                     ? 4
                                     : (kSmemLimit - kFixedBytes) / kStageBytes;
  static_assert(kStages >= 2, "tile shapes too large for two query stages");

  // K-major, 128-byte swizzled rows: what a TMA box with SWIZZLE_128B writes, one 64-column
  // chunk after the other. Read MN-major through a transposed view where a GEMM reduces over
  // tokens.
  using AtomK = GMMA::Layout_K_SW128_Atom<Element>;
  using AtomMN = GMMA::Layout_MN_SW128_Atom<Element>;
  using SmemLayoutKV = decltype(tile_to_shape(AtomK{}, Shape<Int<N>, Int<D>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(AtomK{}, Shape<Int<M>, Int<D>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<D>, Int<M>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // dS^T as dQ's (queries x keys) A operand, queries contiguous: piece j of buffer u is index
  // u * kDsParts + j of the last mode, keys j * kDqK onwards.
  using SmemLayoutDs = decltype(tile_to_shape(AtomMN{}, Shape<Int<M>, Int<kDqK>, Int<2 * kDsParts>>{}));
  // K as dQ's (columns x keys) B operand: piece w (the warpgroup's) is 64 head-dim columns of all
  // keys (a chunk) or all columns of 64 keys (head dim 64); either way contiguous.
  using SmemLayoutKtPiece = decltype(composition(
      tile_to_shape(AtomK{}, Shape<Int<kDqK>, Int<kDqN>, _2>{}),
      make_ordered_layout(Shape<Int<kDqN>, Int<kDqK>, _2>{}, Step<_2, _1, _3>{})));

  using KeysLayout = Layout<Shape<Int<kConsumers>, _1, _1>>;  // warpgroups stacked over the keys
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<M>, Int<D>>>(), KeysLayout{}));
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<D>, Int<M>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      KeysLayout{}));
  using MmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDqN>, Int<kDqK>>, GMMA::Major::MN,
                           GMMA::Major::MN>()));

  // P^T (and dS^T) as the A operand of the RS GEMMs, as in the forward: blocks 2k and 2k+1 of a
  // thread's 8-column accumulator blocks form k step k.
  using PLayout = Layout<Shape<Shape<_2, _2, _2>, _1, Int<M / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>;
};

// Per stage, what the producer's second warp tells the consumers about the step's queries:
// their rows of [B, *Sq, H] (lse, delta, dQ; -1 past the range's run of their group), per query
// log2(e) * lse and delta (0 for queries past that run, whose probabilities are masked), and for
// the mask the box's origin and the run's end (GroupCoords::q_end; the group's length for the
// whole axis).
template <int Rank, int M>
struct StepTable {
  int64_t row[M];
  float lse_log2[M];
  float delta[M];
  int origin[Rank];
  int q_end[Rank];
  int full;  // QueryStep::full
};

// P^T = exp2(S^T scale log2(e) - lse log2(e)), in place; with `masked`, elements whose query
// does not see the key become 0 (bwd_mask.cuh).
template <class QTile, class KVTile, int Rank, int M, int N, class S, class Cols>
__device__ __forceinline__ void probabilities(S& s, Cols const& cols, StepTable<Rank, M> const& tab,
                                              KeyTable<Rank, N> const& keys, float scale_log2, bool masked) {
  CUTE_UNROLL
  for (int v = 0; v < size(s); ++v) {
    int const q = get<1>(cols(v));
    s(v) = fast_exp2(fmaf(s(v), scale_log2, -tab.lse_log2[q]));
  }
  if (!masked) return;
  uint32_t w[2];
  key_row_masks<Rank, QTile, KVTile>(keys, tab.origin, tab.q_end, get<0>(cols(0)), get<1>(cols(0)), w);
  CUTE_UNROLL
  for (int v = 0; v < size(s); ++v) {
    s(v) = (w[row_half(v)] >> column_bit(v)) & 1u ? s(v) : 0.f;
  }
}

// dS^T = P^T * (dP^T - delta), into dp.
template <int Rank, int M, class P, class DP, class Cols>
__device__ __forceinline__ void score_gradients(P const& p, DP& dp, Cols const& cols, StepTable<Rank, M> const& tab) {
  CUTE_UNROLL
  for (int v = 0; v < size(dp); ++v) dp(v) = p(v) * (dp(v) - tab.delta[get<1>(cols(v))]);
}

// Stores the thread's dS^T (packed pairs of adjacent queries, as to_operand left them) into
// buffer u of dQ's A operand. A pair is adjacent in the queries-contiguous layout, so each is
// one 32-bit store; a warp's eight key rows are distinct 16-byte units of the swizzle, so the
// stores do not conflict.
// The offsets are written out instead of calling SmemLayoutDs on coordinates: its swizzle acts on
// byte addresses (a tensor over a shared-memory pointer applies it so, as the GEMM reads), which
// the layout called directly would apply to element offsets. Query q of key k sits at
// 64 k + (q ^ 8 (k % 8)) within a piece (the 16-byte units of a 128-byte row permuted by the row
// within its 8). The thread's values share k % 8 and lie 8 queries or 8 keys apart, so each
// offset is one base XOR a constant: one live register across the step loop, not one per value.
// The two offset steps are host-callable so that tests/cuda/sm90_layout_check.cu checks
// these very expressions against the swizzled tensor the dQ GEMM reads.
template <class Config>
CUTE_HOST_DEVICE constexpr int ds_base_offset(int key0, int q0, int u) {
  constexpr int kDqK = Config::kDqK;
  // q0 < 8: bits 3-5 of the result are k % 8
  return (u * Config::kDsParts + key0 / kDqK) * Config::M * kDqK + 64 * (key0 % kDqK) + (q0 ^ ((key0 & 7) << 3));
}
CUTE_HOST_DEVICE constexpr int ds_value_offset(int base, int dk, int dq) { return (base ^ dq) + 64 * dk; }

template <class Config, class Regs, class Cols>
__device__ __forceinline__ void stage_ds(Regs const& ds, Cols const& cols, typename Config::Element* base, int u) {
  static_assert(Config::M == 64, "a query row of dS^T is one 128-byte swizzle row");
  auto const packed = recast<uint32_t>(ds);
  int const key0 = get<0>(cols(0)), q0 = get<1>(cols(0));
  int const row = ds_base_offset<Config>(key0, q0, u);
  CUTE_UNROLL
  for (int i = 0; i < size(packed); ++i) {
    int const dk = get<0>(cols(2 * i)) - key0, dq = get<1>(cols(2 * i)) - q0;  // multiples of 8
    *reinterpret_cast<uint32_t*>(base + ds_value_offset(row, dk, dq)) = packed(i);
  }
}

// Element offset of (row r, column c) in a K-major SW128 tile of `Rows` rows (SmemLayoutKV: what
// the TMA writes, 64-column chunks one after the other): the 16-byte units of a 128-byte row
// permuted by the row within its 8. The epilogue stages dK, dV with it; host-callable for
// tests/cuda/sm90_layout_check.cu.
template <int Rows>
CUTE_HOST_DEVICE constexpr int kv_tile_offset(int r, int c) {
  int const off = (c / kChunkCols) * Rows * kChunkCols + r * kChunkCols + c % kChunkCols;
  return off ^ ((off >> 3) & 0x38);
}

// Two floats as a packed pair of the element type.
template <class Element>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
    __nv_bfloat162 const h = __floats2bfloat162_rn(a, b);
    return reinterpret_cast<uint32_t const&>(h);
  } else {
    __half2 const h = __floats2half2_rn(a, b);
    return reinterpret_cast<uint32_t const&>(h);
  }
}

// Stages a warpgroup's dQ partial (64 rows x kDqN columns, float32) row by row for the bulk
// reductions.
template <class Config, class Acc, class Cols>
__device__ __forceinline__ void stage_dq(Acc const& acc, Cols const& cols, float* staging) {
  CUTE_UNROLL
  for (int v = 0; v < size(acc); v += 2) {
    int const r = get<0>(cols(v)), c = get<1>(cols(v));
    *reinterpret_cast<float2*>(staging + r * Config::kDqPitch + c) = make_float2(acc(v), acc(v + 1));
  }
}

// Bulk reductions of shared memory into global memory (float32 add, performed at L2): the TMA
// engine's counterpart of per-element atomics for a whole row.
__device__ __forceinline__ void bulk_reduce_add(float* dst, float const* src, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst),
               "r"(cute::cast_smem_ptr_to_uint(src)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Until this thread's bulk reductions have read their shared memory (which may then be reused).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// Until they are complete.
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads (wgmma
// operands, bulk copies) of other threads, once they have met at a barrier.
__device__ __forceinline__ void fence_shared_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

}  // namespace natten::sm90
