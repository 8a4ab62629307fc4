// The score mask of the SM90 backward: which of a consumer thread's elements of S^T (key rows,
// query columns) are visible pairs. Applied only on steps whose query box not every query of
// sees wholly (QueryStep::full).
//
// The forward's BitMask turned around. There a row is a query and its window is an interval of
// keys per axis; here a row is a key, and the queries that see it are an interval per axis too
// (common/na_window.h's axis_inverse_window: window bounds never decrease along an axis). The
// key table holds those intervals, found once per CTA; per step and axis the thread's query
// columns inside an interval are a run of bits repeated with a fixed period (fwd_mask.cuh's
// BoxAxis, with the query box as the columns), so an element costs one bit test, whatever the
// rank. CuTe-free and host-compilable (tests/cuda/sm90_backward_walk_check.cpp replays it).
#pragma once

#include <cstdint>

#include "common/tile_geometry.cuh"
#include "sm90/fwd_mask.cuh"

namespace natten::sm90 {

// Per key of the CTA, written once by the consumers: the queries that see it, per axis an
// interval [first, last] of group coordinates (KeyBoxCta::key_queries), and its gradient row
// (KeyBoxCta::key_row). Kept in shared memory rather than registers, which the accumulators need.
template <int Rank, int N>
struct KeyTable {
  int first[Rank][N];
  int last[Rank][N];
  int64_t row[N];
  int extra;  // the keys are additional keys: rows of d_extra_k, d_extra_v
};

// Bits of the thread's query columns (column_bit of its elements) that its key rows key0 and
// key0 + 8 see, one word per row, for the query box at `origin` (group coordinates) whose queries
// end at `end` per axis (the query range's run of the group): queries at or past the end are not
// computed and see nothing (additional keys' intervals reach past every end).
template <int Rank, class QTile, class KVTile>
__device__ __forceinline__ void key_row_masks(KeyTable<Rank, KVTile::kSize> const& keys, int const* origin,
                                              int const* end, int key0, int col0, uint32_t (&w)[2]) {
  constexpr int kRowBits = QTile::kSize / 4;  // query columns of one row in a thread
  static_assert(kRowBits <= 32, "one word per row: query boxes of up to 128 tokens");
  w[0] = w[1] = ~0u;
  for_axes<Rank>([&](auto a_) {
    constexpr int a = decltype(a_)::value;
    using Col = BoxAxis<QTile, a>;
    static_assert(Col::kPeriod <= 32, "the pattern of an axis repeats within a word");
    constexpr uint32_t kRepeat = repeat_every(Col::kPeriod, kRowBits);
    constexpr bool kDiffer = BoxAxis<KVTile, a>::kRowsDiffer;  // the two key rows differ along a
    int const lane = Col::lane_bits(col0);
    uint32_t m[2];
    #pragma unroll
    for (int i = 0; i < (kDiffer ? 2 : 1); ++i) {
      int const key = key0 + 8 * i;
      int const stop = keys.last[a][key] + 1 < end[a] ? keys.last[a][key] + 1 : end[a];
      int const from = clamp_int(Col::below(keys.first[a][key] - origin[a], lane), 0, Col::kCount) << Col::kPos;
      int const to = clamp_int(Col::below(stop - origin[a], lane), 0, Col::kCount) << Col::kPos;
      m[i] = to > from ? bit_run(from, to - from) * kRepeat : 0u;
    }
    w[0] &= m[0];
    w[1] &= m[kDiffer ? 1 : 0];
  });
}

}  // namespace natten::sm90
