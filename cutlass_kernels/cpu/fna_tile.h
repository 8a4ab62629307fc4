// Tiling of the fused CPU kernels: a query tile is a box of one dilation group's sub-grid;
// its keys are the union of its queries' windows, another box (na_window.h says why that
// union is a box). Forward and backward walk the same tiles with the same key chunks.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "common/na_params.h"

namespace natten::cpu {

// One tile of one axis: queries [q_begin, q_end) of the dilation group `residue`.
struct AxisTile {
  int64_t residue;
  int64_t group_len;
  int64_t q_begin;
  int64_t q_end;
};

template <int Rank>
class TileGrid {
 public:
  // Tiles cover only the problem's query range (NaProblem::q_offset): its members of each
  // dilation group are one run of group coordinates, tiled like a whole group.
  TileGrid(NaProblem const& p, std::array<int64_t, Rank> const& tile_shape) {
    int64_t token_stride = 1, q_token_stride = 1;
    for (int a = Rank - 1; a >= 0; --a) {
      axis_[a] = p.axis[a];
      token_stride_[a] = token_stride;
      token_stride *= axis_[a].extent;
      q_offset_[a] = p.q_offset[a];
      q_token_stride_[a] = q_token_stride;
      q_token_stride *= p.query_extent(a);
      int64_t const d = axis_[a].dilation;
      for (int64_t r = 0; r < d; ++r) {
        int64_t const lg = group_length(axis_[a], r);
        int64_t const first = group_members_below(p.q_offset[a], r, d);
        int64_t const end = group_members_below(p.q_offset[a] + p.query_extent(a), r, d);
        for (int64_t q = first; q < end; q += tile_shape[a]) {
          tiles_[a].push_back({r, lg, q, std::min(q + tile_shape[a], end)});
        }
      }
    }
  }

  int64_t num_tiles() const {
    int64_t n = 1;
    for (int a = 0; a < Rank; ++a) n *= static_cast<int64_t>(tiles_[a].size());
    return n;
  }

  AxisSpec const& axis(int a) const { return axis_[a]; }
  int64_t token_stride(int a) const { return token_stride_[a]; }
  // Query rows are addressed in the query range's own grid.
  int64_t q_offset(int a) const { return q_offset_[a]; }
  int64_t q_token_stride(int a) const { return q_token_stride_[a]; }

  // Per-axis tiles of flat tile index `t` (last axis fastest).
  std::array<AxisTile, Rank> tile(int64_t t) const {
    std::array<AxisTile, Rank> out;
    for (int a = Rank - 1; a >= 0; --a) {
      int64_t const n = static_cast<int64_t>(tiles_[a].size());
      out[a] = tiles_[a][t % n];
      t /= n;
    }
    return out;
  }

 private:
  AxisSpec axis_[Rank];
  int64_t token_stride_[Rank];
  int64_t q_offset_[Rank];
  int64_t q_token_stride_[Rank];
  std::vector<AxisTile> tiles_[Rank];
};

// Everything about one query tile that the kernels need: token indices of its queries and of
// its key box, and each query's visible key range along each axis, relative to the key box.
template <int Rank>
struct TileView {
  std::array<int64_t, Rank> q_extent{};
  std::array<int64_t, Rank> k_extent{};
  int64_t num_q = 1;
  int64_t num_k = 1;
  std::vector<int64_t> q_token;  // [num_q], rows of the query range's grid
  std::vector<int64_t> k_token;  // [num_k], rows of the key grid
  std::array<std::vector<int64_t>, Rank> lo, hi;  // [q_extent[a]] visible key box range

  void build(TileGrid<Rank> const& grid, std::array<AxisTile, Rank> const& t) {
    std::array<int64_t, Rank> k_first{};
    for (int a = 0; a < Rank; ++a) {
      AxisSpec const& ax = grid.axis(a);
      q_extent[a] = t[a].q_end - t[a].q_begin;
      TileKeyRange const keys = tile_key_range(ax, t[a].group_len, t[a].q_begin, t[a].q_end - 1);
      k_first[a] = keys.first;
      k_extent[a] = keys.last - keys.first + 1;
      lo[a].resize(q_extent[a]);
      hi[a].resize(q_extent[a]);
      for (int64_t i = 0; i < q_extent[a]; ++i) {
        AxisWindow const w = axis_window(ax, t[a].group_len, t[a].q_begin + i);
        lo[a][i] = w.first - k_first[a];
        hi[a][i] = w.last - k_first[a];
      }
    }
    num_q = 1;
    num_k = 1;
    for (int a = 0; a < Rank; ++a) {
      num_q *= q_extent[a];
      num_k *= k_extent[a];
    }
    q_token.resize(num_q);
    k_token.resize(num_k);
    auto coord = [&](int a, int64_t group_coord) {
      return group_coord * grid.axis(a).dilation + t[a].residue;
    };
    for (int64_t i = 0; i < num_q; ++i) {
      int64_t rem = i, tok = 0;
      for (int a = Rank - 1; a >= 0; --a) {
        tok += (coord(a, t[a].q_begin + rem % q_extent[a]) - grid.q_offset(a)) *
               grid.q_token_stride(a);
        rem /= q_extent[a];
      }
      q_token[i] = tok;
    }
    for (int64_t j = 0; j < num_k; ++j) {
      int64_t rem = j, tok = 0;
      for (int a = Rank - 1; a >= 0; --a) {
        tok += coord(a, k_first[a] + rem % k_extent[a]) * grid.token_stride(a);
        rem /= k_extent[a];
      }
      k_token[j] = tok;
    }
  }

  // Per-axis coordinate of query row i inside the tile.
  std::array<int64_t, Rank> q_coord(int64_t i) const {
    std::array<int64_t, Rank> c;
    for (int a = Rank - 1; a >= 0; --a) {
      c[a] = i % q_extent[a];
      i /= q_extent[a];
    }
    return c;
  }

  // Calls fn(begin, end) for each run of keys in [k_begin, k_end) that query row i sees, in
  // increasing order. A query's visible keys are a sub-box of the key box, so they come in
  // runs along the last axis: one per box row (all other axes fixed) that the query sees.
  template <typename Fn>
  void for_each_visible_run(int64_t i, int64_t k_begin, int64_t k_end, Fn fn) const {
    std::array<int64_t, Rank> const qc = q_coord(i);
    int64_t const row_len = k_extent[Rank - 1];
    int64_t const first = lo[Rank - 1][qc[Rank - 1]], last = hi[Rank - 1][qc[Rank - 1]];
    for (int64_t r = k_begin / row_len; r * row_len < k_end; ++r) {
      bool visible = true;
      int64_t rem = r;
      for (int a = Rank - 2; a >= 0; --a) {
        int64_t const c = rem % k_extent[a];
        rem /= k_extent[a];
        visible = visible && c >= lo[a][qc[a]] && c <= hi[a][qc[a]];
      }
      int64_t const begin = std::max(k_begin, r * row_len + first);
      int64_t const end = std::min(k_end, r * row_len + last + 1);
      if (visible && begin < end) fn(begin, end);
    }
  }
};

// Splits n keys into near-equal chunks of at most max_chunk.
inline int64_t chunk_length(int64_t n, int64_t max_chunk) {
  int64_t const chunks = (n + max_chunk - 1) / max_chunk;
  return (n + chunks - 1) / chunks;
}

}  // namespace natten::cpu
