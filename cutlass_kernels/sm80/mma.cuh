// Tensor-core building blocks of the SM80 kernels (CuTe): shared-memory layouts, the tiled MMA,
// shared->register copies and the two GEMM shapes every kernel is made of:
//   gemm_ss: acc += A.B^T with both operands in shared memory (scores: Q.K^T, dO.V^T, K.Q^T);
//   gemm_rs: acc += A.B with A in registers (probabilities or score gradients straight from the
//            accumulators of a gemm_ss) and B read transposed from shared memory (P.V, dS.K).
// Plus gathers of token rows (global -> shared with cp.async) and the accumulator views used
// by the softmax and the masks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <type_traits>

// Device code of these kernels needs SM80 instructions (cp.async, bf16 mma.sync). A build that
// also targets older GPUs for other families compiles the kernels empty for those targets; the
// backend never launches them there (it checks the compute capability first).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define NATTEN_SM80_DEVICE_CODE 1
#else
#define NATTEN_SM80_DEVICE_CODE 0
#endif

namespace natten::sm80 {

using namespace cute;

// The CUDA storage type of the instantiation table -> the element type in global and shared
// memory, and the tensor-core instruction with its operand type. float runs on TF32 tensor cores
// (m16n8k8): operands are rounded to TF32 in registers, accumulation stays float32.
template <typename T> struct ElementOf;
template <> struct ElementOf<__half> {
  using type = cutlass::half_t;
  using Operand = cutlass::half_t;
  using Atom = SM80_16x8x16_F32F16F16F32_TN;
};
template <> struct ElementOf<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
  using Operand = cutlass::bfloat16_t;
  using Atom = SM80_16x8x16_F32BF16BF16F32_TN;
};
template <> struct ElementOf<float> {
  using type = float;
  using Operand = cutlass::tfloat32_t;
  using Atom = SM80_16x8x8_F32TF32TF32F32_TN;
};

template <typename T, int HeadDim, int kWarps>
struct MmaTraits {
  using Element = typename ElementOf<T>::type;
  using Operand = typename ElementOf<T>::Operand;
  static constexpr bool kTf32 = std::is_same_v<Element, float>;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kAtomK = kTf32 ? 8 : 16;
  static_assert(HeadDim % 32 == 0, "head dim must be a multiple of 32");

  // Warps stacked along M (16 rows each); N tiled by 16 (two 8-wide atoms); K by one atom.
  using TiledMma = TiledMMA<MMA_Atom<typename ElementOf<T>::Atom>, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, Int<kAtomK>>>;

  // Rows of 128 bytes (64 bytes for 16-bit head dim 32) with an XOR swizzle of their 16-byte
  // pieces: ldmatrix reads 8 rows x 16 bytes without bank conflicts, and 16-byte cp.async chunks
  // stay contiguous.
  static constexpr int kSmemK = kTf32 ? 32 : HeadDim % 64 == 0 ? 64 : 32;
  using SmemAtom = decltype(composition(Swizzle<kSmemK * sizeof(Element) == 128 ? 3 : 2, kTf32 ? 2 : 3, 3>{},
                                        Layout<Shape<_8, Int<kSmemK>>, Stride<Int<kSmemK>, _1>>{}));
  template <int Rows>
  using SmemRows = decltype(tile_to_shape(SmemAtom{}, Shape<Int<Rows>, Int<HeadDim>>{}));

  // The same rows seen transposed, (HeadDim, Rows): the B operand of gemm_rs. Its K mode
  // (Rows) is in the order gemm_rs's register A operand holds K (see acc_as_a): for TF32, the
  // accumulator columns (2t, 2t + 1) of lane t serve as K = (t, t + 4) of an m16n8k8 slice, so
  // within each 8 rows logical K = k0 + 4 k1 reads row 2 k0 + k1.
  template <int Rows>
  using SmemRowsT = decltype(composition(
      SmemRows<Rows>{},
      std::conditional_t<kTf32,
                         Layout<Shape<Int<HeadDim>, Shape<Shape<_4, _2>, Int<Rows / 8>>>,
                                Stride<Int<Rows>, Stride<Stride<_2, _1>, _8>>>,
                         Layout<Shape<Int<HeadDim>, Int<Rows>>, Stride<Int<Rows>, _1>>>{}));

  using CopyA = Copy_Atom<SM75_U32x4_LDSM_N, Operand>;
  // ldmatrix transposes 16-bit elements only: TF32 reads the transposed operand element-wise.
  using CopyBT = std::conditional_t<kTf32, Copy_Atom<UniversalCopy<Operand>, Operand>,
                                    Copy_Atom<SM75_U16x8_LDSM_T, Operand>>;
  using CopyC = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;
};

// TF32 operands loaded raw from shared memory (float bits) are rounded to nearest in registers;
// the tensor cores would otherwise truncate them, which biases every product towards zero.
template <class Traits, class Frag>
__device__ __forceinline__ void round_operands(Frag& f) {
  if constexpr (Traits::kTf32) {
    auto bits = recast<uint32_t>(f);
    CUTE_UNROLL
    for (int i = 0; i < size(bits); ++i) {
      uint32_t r;
      asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(bits(i))));
      bits(i) = r;
    }
  }
}

// The kernel's dynamic shared memory, laid out as Smem (the launch sizes it as sizeof(Smem)).
template <class Smem>
__device__ __forceinline__ Smem& shared_storage() {
  extern __shared__ __align__(128) char smem_raw[];
  return *reinterpret_cast<Smem*>(smem_raw);
}

// ---------------------------------------------------------------------------------------------
// GEMMs
// ---------------------------------------------------------------------------------------------

// acc += A.B^T over the K mode of the shared-memory tiles sA (M, K) and sB (N, K); loads of
// K-slice i+1 overlap the MMAs of slice i.
template <class Traits, class Acc, class SA, class SB>
__device__ __forceinline__ void gemm_ss(Acc& acc, SA const& sA, SB const& sB, int tid) {
  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor rA = thr.partition_fragment_A(sA);
  Tensor rB = thr.partition_fragment_B(sB);
  auto copy_a = make_tiled_copy_A(typename Traits::CopyA{}, mma);
  auto copy_b = make_tiled_copy_B(typename Traits::CopyA{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tsA = thr_a.partition_S(sA);
  Tensor trA = thr_a.retile_D(rA);
  Tensor tsB = thr_b.partition_S(sB);
  Tensor trB = thr_b.retile_D(rB);
  copy(copy_a, tsA(_, _, _0{}), trA(_, _, _0{}));
  copy(copy_b, tsB(_, _, _0{}), trB(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) {
      copy(copy_a, tsA(_, _, i + 1), trA(_, _, i + 1));
      copy(copy_b, tsB(_, _, i + 1), trB(_, _, i + 1));
    }
    Tensor a = rA(_, _, i);
    Tensor b = rB(_, _, i);
    round_operands<Traits>(a);
    round_operands<Traits>(b);
    cute::gemm(mma, a, b, acc);
  }
}

// acc += A.B with A already in registers (in the A-operand layout) and sBt the (N, K) view of a
// shared-memory tile stored (K, N) row by row, read with transposing ldmatrix.
template <class Traits, class Acc, class RA, class SBt>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& rA, SBt const& sBt, int tid) {
  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor rB = thr.partition_fragment_B(sBt);
  auto copy_b = make_tiled_copy_B(typename Traits::CopyBT{}, mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tsB = thr_b.partition_S(sBt);
  Tensor trB = thr_b.retile_D(rB);
  copy(copy_b, tsB(_, _, _0{}), trB(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) copy(copy_b, tsB(_, _, i + 1), trB(_, _, i + 1));
    Tensor b = rB(_, _, i);
    round_operands<Traits>(b);
    cute::gemm(mma, rA(_, _, i), b, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Accumulator views
// ---------------------------------------------------------------------------------------------

// ((2, 2), M, N) accumulator layout of m16n8 atoms -> (rows (2, M), cols (2, N)): a thread holds
// two rows (lane/4 and lane/4 + 8) and two adjacent columns of each atom.
template <class L>
__device__ __forceinline__ auto rowcol(L const& acc) {
  auto l = logical_divide(acc, Shape<_2>{});
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Accumulators of an (M, N) product reused as the A operand of a product over N (their values
// converted to Traits::Operand). m16n8k16 takes A as ((2, 2, 2), M, N / 2): two neighbouring n8
// atoms make one k16 slice. m16n8k8 (TF32) takes A as ((2, 2), M, N) with the value modes
// swapped: lane t's columns (2t, 2t + 1) become K = (t, t + 4), an order SmemRowsT matches.
template <class Traits, class L>
__host__ __device__ __forceinline__ auto acc_as_a(L const& acc) {
  if constexpr (Traits::kTf32) {
    return make_layout(make_layout(get<0, 1>(acc), get<0, 0>(acc)), get<1>(acc), get<2>(acc));
  } else {
    auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});
    return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
  }
}

template <class To, class Engine, class Layout>
__device__ __forceinline__ auto convert(Tensor<Engine, Layout> const& t) {
  Tensor out = make_tensor<To>(t.layout());
  CUTE_UNROLL
  for (int i = 0; i < size(t); ++i) out(i) = To(t(i));
  return out;
}

// Coordinates (row, col) of every accumulator element of this thread, viewed like rowcol().
template <class Traits, int M, int N>
__device__ __forceinline__ auto acc_coords(int tid) {
  typename Traits::TiledMma mma;
  Tensor c = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
  return make_tensor(c.data(), rowcol(c.layout()));
}

// ---------------------------------------------------------------------------------------------
// Global <-> shared
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem, void const* gmem, bool valid) {
  uint32_t const dst = cast_smem_ptr_to_uint(smem);
  int const bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_fence() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The rows of one (batch, head) of a [B, T, H, dim] tensor: token t's row starts at
// first + t * pitch. The pitch is 32-bit and tokens are non-negative, so a row address is one
// wide unsigned multiply-add (a signed 64-bit product costs five instructions).
template <class Element>
struct HeadRows {
  Element* first;
  int pitch;  // H * dim

  __device__ __forceinline__ Element* row(int t) const {
    return first + static_cast<uint64_t>(static_cast<unsigned>(t)) * static_cast<unsigned>(pitch);
  }
};

template <class Element>
__device__ __forceinline__ HeadRows<Element> head_rows(Element* base, int64_t tokens, int heads,
                                                       int b, int head, int dim) {
  return {base + (int64_t(b) * tokens * heads + head) * dim, heads * dim};
}

// Rows each thread moves in gather_rows/scatter_rows: a compile-time trip count (the loop over
// a thread's rows unrolls, and row offsets fold into constants), so rows are visited as
// tid / kPerRow + i * kRowStep rather than by a loop bounded at run time.
template <int Rows, int kRowStep>
__device__ __forceinline__ constexpr int ceil_rows() {
  return (Rows + kRowStep - 1) / kRowStep;
}

// Gathers `Rows` rows into the swizzled tile s (Rows, HeadDim): tile row r is token token(r)
// of `rows`, or zero-filled where token(r) < 0; columns at or past `dim` are zero-filled too
// (head dims padded up to the instantiation's).
template <int Rows, int HeadDim, int kThreads, class Element, class S, class TokenFn>
__device__ __forceinline__ void gather_rows(S& s, HeadRows<Element const> const& rows,
                                            TokenFn const& token, int dim, int tid) {
  constexpr int kChunk = 16 / sizeof(Element);
  constexpr int kPerRow = HeadDim / kChunk;
  static_assert(kThreads % kPerRow == 0, "threads must cover whole rows");
  constexpr int kRowStep = kThreads / kPerRow;
  int const col = (tid % kPerRow) * kChunk;
  bool const col_ok = col < dim;
  CUTE_UNROLL
  for (int i = 0; i < ceil_rows<Rows, kRowStep>(); ++i) {
    int const r = tid / kPerRow + i * kRowStep;
    if (Rows % kRowStep != 0 && r >= Rows) break;
    int const t = token(r);
    bool const ok = col_ok && t >= 0;
    cp_async_16(&s(r, col), ok ? static_cast<void const*>(rows.row(t) + col) : rows.first, ok);
  }
}

// Writes the tile s (Rows, HeadDim) to global memory: tile row r to token token(r) of `rows`
// (not written where token(r) < 0), only the first `dim` columns.
template <int Rows, int HeadDim, int kThreads, class Element, class S, class TokenFn>
__device__ __forceinline__ void scatter_rows(S const& s, HeadRows<Element> const& rows,
                                             TokenFn const& token, int dim, int tid) {
  constexpr int kChunk = 16 / sizeof(Element);
  constexpr int kPerRow = HeadDim / kChunk;
  constexpr int kRowStep = kThreads / kPerRow;
  int const col = (tid % kPerRow) * kChunk;
  if (col >= dim) return;
  CUTE_UNROLL
  for (int i = 0; i < ceil_rows<Rows, kRowStep>(); ++i) {
    int const r = tid / kPerRow + i * kRowStep;
    if (Rows % kRowStep != 0 && r >= Rows) break;
    int const t = token(r);
    if (t >= 0) *reinterpret_cast<uint4*>(rows.row(t) + col) = *reinterpret_cast<uint4 const*>(&s(r, col));
  }
}

// Accumulators (converted to Element) -> the shared tile s, through the MMA's C layout.
template <class Traits, class Acc, class S>
__device__ __forceinline__ void store_acc(Acc const& acc, S& s, int tid) {
  using Element = typename Traits::Element;
  typename Traits::TiledMma mma;
  Tensor r = convert<Element>(acc);
  auto copy_c = make_tiled_copy_C(typename Traits::CopyC{}, mma);
  auto thr_c = copy_c.get_thread_slice(tid);
  copy(copy_c, thr_c.retile_S(r), thr_c.partition_D(s));
}

// 2^x as one MUFU.EX2; results below 2^-126 flush to zero, and exp2(-inf) is 0. exp2f adds a
// three-instruction range fix-up per element for those tiny results, which a softmax does not
// need: that fix-up was a sixth of a head-dim-32 forward step.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Sum / max over the four lanes of a quad (the threads sharing an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace natten::sm80
