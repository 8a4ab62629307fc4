// Pieces shared by the fused CPU forward and backward kernels: tile configuration, tensor
// addressing and row gathers.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/na_params.h"
#include "cpu/fast_math.h"
#include "cpu/fna_tile.h"
#include "cpu/host_services.h"
#include "cpu/numeric.h"

namespace natten::cpu {

// Tile configuration of the fused CPU kernels: the query tile is a box of the (dilation
// group) grid; keys are processed in chunks of at most `kv_chunk` keys.
struct CpuTileConfig {
  int64_t q_tile[3] = {1, 1, 1};
  int64_t kv_chunk = 512;
};

template <int Rank>
std::array<int64_t, Rank> tile_shape(CpuTileConfig const& c) {
  std::array<int64_t, Rank> s;
  for (int a = 0; a < Rank; ++a) s[a] = c.q_tile[a];
  return s;
}

// Row addressing of a heads-last tensor [B, tokens, heads, width].
struct RowLayout {
  int64_t tokens;
  int64_t heads;
  int64_t width;
  int64_t offset(int64_t b, int64_t token, int64_t h) const {
    return ((b * tokens + token) * heads + h) * width;
  }
};

template <typename T, typename A>
inline void load_row(T const* src, int64_t n, A scale, A* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_accum<A>(src[i]) * scale;
}

template <typename T, typename A>
inline void store_row(A const* src, int64_t n, A scale, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_accum<T>(src[i] * scale);
}

// Key and value rows of one chunk, as matrices with leading dimensions.
template <typename A>
struct KeyChunk {
  A const* k;
  int64_t ldk;
  A const* v;
  int64_t ldv;
};

// Walks `count` keys in chunks of at most `max_chunk` and calls fn(j0, c, chunk) with the rows
// of keys [j0, j0 + c) (row_of(j) -> {key row, value row}). Rows are read in place when they
// need no conversion and lie evenly spaced in memory (any run along one grid axis, so every
// 1-D chunk), otherwise gathered into kc [c, D] / vc [c, Dv].
template <typename A, typename T, typename RowOf, typename Fn>
void for_each_key_chunk(int64_t count, int64_t max_chunk, int64_t D, int64_t Dv, RowOf row_of,
                        std::vector<A>& kc, std::vector<A>& vc, Fn fn) {
  if (count == 0) return;
  int64_t const chunk = chunk_length(count, max_chunk);
  for (int64_t j0 = 0; j0 < count; j0 += chunk) {
    int64_t const c = std::min(chunk, count - j0);
    if constexpr (std::is_same_v<T, A>) {
      auto const first = row_of(j0);
      int64_t const ldk = c > 1 ? row_of(j0 + 1).first - first.first : D;
      int64_t const ldv = c > 1 ? row_of(j0 + 1).second - first.second : Dv;
      bool even = ldk >= D && ldv >= Dv;
      for (int64_t j = 2; even && j < c; ++j) {
        auto const rows = row_of(j0 + j);
        even = rows.first - first.first == j * ldk && rows.second - first.second == j * ldv;
      }
      if (even) {
        fn(j0, c, KeyChunk<A>{first.first, ldk, first.second, ldv});
        continue;
      }
    }
    kc.resize(c * D);
    vc.resize(c * Dv);
    for (int64_t j = 0; j < c; ++j) {
      auto const rows = row_of(j0 + j);
      load_row(rows.first, D, A(1), kc.data() + j * D);
      load_row(rows.second, Dv, A(1), vc.data() + j * Dv);
    }
    fn(j0, c, KeyChunk<A>{kc.data(), D, vc.data(), Dv});
  }
}

// Visits the runs of keys [j0, j0 + c) that query row i sees: all of them for additional keys
// (view == nullptr), the visible runs of the tile's key box otherwise. Offsets are relative
// to j0.
template <int Rank, typename Fn>
void for_each_run(TileView<Rank> const* view, int64_t i, int64_t j0, int64_t c, Fn fn) {
  if (view == nullptr) {
    fn(int64_t(0), c);
    return;
  }
  view->for_each_visible_run(i, j0, j0 + c, [&](int64_t b, int64_t e) { fn(b - j0, e - j0); });
}

// row[j] = exp(row[j] - shift) on the runs, 0 between them; returns the sum. The exponential
// runs over the whole row, where it vectorises (runs can be a few keys long); what it makes of
// keys outside the runs, overflow included, is then overwritten.
template <int Rank, typename A>
A exp_runs(TileView<Rank> const* view, int64_t i, int64_t j0, int64_t c, A shift, A* row) {
  for (int64_t j = 0; j < c; ++j) row[j] = softmax_exp(row[j] - shift);
  int64_t done = 0;
  for_each_run(view, i, j0, c, [&](int64_t b, int64_t e) {
    std::fill(row + done, row + b, A(0));
    done = e;
  });
  std::fill(row + done, row + c, A(0));
  return row_sum(row, c);
}

template <typename A>
inline void add_row(A const* src, int64_t n, A* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace natten::cpu
