// The score mask of the SM90 forward: which of a consumer thread's score elements of a key box
// its query rows see. Applied only to key boxes that not every query of the box sees wholly
// (KeyWalk::full); additional keys have their own count mask (fwd_mainloop.cuh).
//
// A thread holds two query rows (row0 and row0 + 8) of a 64 x N score tile and, per row, N/4
// columns: element v is on row half (v >> 1) & 1, column col0 + (v & 1) + 8 * (v >> 2), with
// col0 = 2 * (lane % 4) (the wgmma accumulator layout; tests/cuda/sm90_layout_check.cu checks it
// against CuTe's partition, tests/cuda/sm90_forward_mask_check.cpp replays the mask against the
// windows of docs/semantics.md).
//
// BitMask: per row, one bit per column, built per key box from a few integer operations per axis,
// then one bit test and select per element. Key-box extents are powers of two, so a column's
// offset along an axis is a bit field of its index, and along each axis a thread's columns are
// visible exactly on an interval of that field; the interval's bits are a contiguous run,
// repeated with a fixed period over the row's word. (It replaced a per-element compare of each
// axis against the row's window, measured 13% or more slower on each of P1-P3 in two runs: benchmarks/NOTES.md.)
// CuTe-free and host-compilable (the check above includes it with the CUDA qualifiers defined
// away).
#pragma once

#include <cstdint>
#include <utility>

#include "common/tile_geometry.cuh"

namespace natten::sm90 {

// A thread's accumulators of a 64-row warpgroup tile cover two rows (r and r + 8): element v
// of the fragment is on row half (v / 2) % 2, whatever the tile width.
__host__ __device__ __forceinline__ constexpr int row_half(int v) { return (v >> 1) & 1; }
// Element v's column relative to the thread's first (col0) and its bit in the row's mask: the
// element-index bits of the column (bit 0 and bits 3..), packed.
__host__ __device__ __forceinline__ constexpr int column_step(int v) { return (v & 1) + 8 * (v >> 2); }
__host__ __device__ __forceinline__ constexpr int column_bit(int v) { return (v & 1) | ((v >> 2) << 1); }

__host__ __device__ constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }
__host__ __device__ constexpr int clamp_int(int x, int lo, int hi) { return x < lo ? lo : x > hi ? hi : x; }

// Calls f(std::integral_constant<int, a>) for a = 0..Rank-1: per-axis constants stay constants.
template <class F, int... A>
__device__ __forceinline__ void for_each_axis(F&& f, std::integer_sequence<int, A...>) {
  (f(std::integral_constant<int, A>{}), ...);
}
template <int Rank, class F>
__device__ __forceinline__ void for_axes(F&& f) {
  for_each_axis(f, std::make_integer_sequence<int, Rank>{});
}

// Axis a of a box seen from the thread's columns (or rows). Token j of the box has offset
// (j >> kShift) & (extent - 1) along a: a field of kBits bits of j.
template <class Tile, int A>
struct BoxAxis {
  static constexpr int kBits = ilog2(Tile::extent(A));
  static constexpr int kShift = A == 2 ? 0 : A == 1 ? ilog2(Tile::extent(2)) : ilog2(Tile::extent(1) * Tile::extent(2));
  static_assert((1 << kBits) == Tile::extent(A), "box extents are powers of two");

  // Columns: bits 1 and 2 of a column are the thread's (col0), the others the element's. In the
  // field those are bits [kLane0, kLane1); the element's field bits, in order, form the column's
  // index along the axis (kCount values), and they are bits [kPos, kPos + kWidth) of column_bit.
  static constexpr int kLane0 = clamp_int(1 - kShift, 0, kBits);
  static constexpr int kLane1 = clamp_int(3 - kShift, 0, kBits);
  static constexpr int kWidth = kLane0 + kBits - kLane1;
  static constexpr int kCount = 1 << kWidth;
  static constexpr int kPos = kWidth == 0 || kShift == 0 ? 0 : (kShift > 3 ? kShift : 3) - 2;
  static constexpr int kPeriod = 1 << (kPos + kWidth);  // the pattern repeats every kPeriod bits

  // Rows: the two rows of a thread differ by 8, and row0 has bit 3 clear, so their offsets along
  // the axis differ exactly when bit 3 lies in the field.
  static constexpr bool kRowsDiffer = kShift <= 3 && 3 < kShift + kBits;

  // The thread's field bits of its columns.
  __device__ __forceinline__ static int lane_bits(int col0) {
    return (col0 >> (kShift + kLane0)) & ((1 << (kLane1 - kLane0)) - 1);
  }
  // How many of the thread's columns along the axis have an offset below v: exact for
  // 0 <= v <= extent; outside, below 0 or above kCount, and moving v by the extent moves it by
  // kCount (so a key box k boxes further along the walk subtracts k * kCount).
  __device__ __forceinline__ static int below(int v, int lane) {
    return ((v >> kLane1) << kLane0) + clamp_int((v & ((1 << kLane1) - 1)) - (lane << kLane0), 0, 1 << kLane0);
  }
};

// Bits [lo, lo + n) of a word (lo + n <= 32).
__device__ __forceinline__ uint32_t bit_run(int lo, int n) {
#if defined(__CUDA_ARCH__)
  uint32_t m;
  asm("bmsk.clamp.b32 %0, %1, %2;" : "=r"(m) : "r"(lo), "r"(n));
  return m;
#else
  return static_cast<uint32_t>(((uint64_t(1) << n) - 1) << lo);
#endif
}

// Bit 0 repeated every `period` bits over the first `bits` bits of a word (bits <= 32): times a
// run of one period, the run repeated (no carries: the run is below 2^period).
__host__ __device__ constexpr uint32_t repeat_every(int period, int bits) {
  uint32_t r = 0;
  for (int j = 0; j < bits; j += period) r |= 1u << j;
  return r;
}

template <int Rank, class QTile, class KVTile>
struct BitMask {
  static constexpr int N = KVTile::kSize;
  static constexpr int kRowBits = N / 4;  // columns of one row in a thread
  static constexpr int kWords = (kRowBits + 31) / 32;
  static_assert(N % 16 == 0 && N <= 256, "key boxes of 16..256 tokens");

  // Per row (row 1 only on axes where the rows differ) and axis: BoxAxis::below of the row's
  // window start and of its end + 1, relative to the walk's first key.
  int lo[2][Rank];
  int hi[2][Rank];

  __device__ __forceinline__ void init(Params<Rank> const& p, GroupCoords<Rank> const& g, int const* q_origin,
                                       int const* walk_first, int row0, int col0) {
    for_axes<Rank>([&](auto a_) {
      constexpr int a = decltype(a_)::value;
      using Col = BoxAxis<KVTile, a>;
      int const lane = Col::lane_bits(col0);
      #pragma unroll
      for (int i = 0; i < (BoxAxis<QTile, a>::kRowsDiffer ? 2 : 1); ++i) {
        int const x = q_origin[a] + QTile::offset(row0 + 8 * i, a);
        int first = 0, end = 0;  // a row past the range's run of its group sees nothing
        if (x < g.q_end[a]) {
          auto const w = g.window(p, a, x);
          first = w.first;
          end = w.last + 1;
        }
        lo[i][a] = Col::below(first - walk_first[a], lane);
        hi[i][a] = Col::below(end - walk_first[a], lane);
      }
    });
  }

  // Sets the invisible elements of the scores s of the key box at walk position `index` (per-axis
  // box indices) to `masked`.
  template <class S>
  __device__ __forceinline__ void apply(S& s, int const* index, float masked) const {
    uint32_t w[2][kWords];
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
      #pragma unroll
      for (int k = 0; k < kWords; ++k) w[i][k] = ~0u;
    }
    for_axes<Rank>([&](auto a_) {
      constexpr int a = decltype(a_)::value;
      using Col = BoxAxis<KVTile, a>;
      constexpr bool kDiffer = BoxAxis<QTile, a>::kRowsDiffer;
      int const step = index[a] * Col::kCount;
      uint32_t m[2][kWords];
      #pragma unroll
      for (int i = 0; i < (kDiffer ? 2 : 1); ++i) {
        int const from = clamp_int(lo[i][a] - step, 0, Col::kCount) << Col::kPos;
        int const to = clamp_int(hi[i][a] - step, 0, Col::kCount) << Col::kPos;
        if constexpr (Col::kPeriod <= 32) {
          // One period of the pattern, repeated over the row's bits (no carries: it is below 2^period).
          constexpr uint32_t kRepeat = repeat_every(Col::kPeriod, kRowBits < 32 ? kRowBits : 32);
          uint32_t const run = bit_run(from, to - from) * kRepeat;
          #pragma unroll
          for (int k = 0; k < kWords; ++k) m[i][k] = run;
        } else {  // the axis spans both words of a 64-column row
          #pragma unroll
          for (int k = 0; k < kWords; ++k) {
            int const f = clamp_int(from - 32 * k, 0, 32), t = clamp_int(to - 32 * k, 0, 32);
            m[i][k] = bit_run(f, t - f);
          }
        }
      }
      #pragma unroll
      for (int i = 0; i < 2; ++i) {
        #pragma unroll
        for (int k = 0; k < kWords; ++k) w[i][k] &= m[kDiffer ? i : 0][k];
      }
    });
    #pragma unroll
    for (int v = 0; v < N / 2; ++v) {
      int const b = column_bit(v);
      s(v) = (w[row_half(v)][b / 32] >> (b % 32)) & 1u ? s(v) : masked;
    }
  }

};

}  // namespace natten::sm90
