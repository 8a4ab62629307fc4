// Which tiles a CTA of a tiled family works on and which of their score elements are visible.
//
// A tile is a box of one dilation group (a sub-grid whose neighbourhood is a plain window, see
// common/na_window.h), so dilation costs nothing. The forward (and dQ) kernels own a query box
// and walk the key boxes covering the union of its queries' windows, starting at the union's
// first key (not at a global grid of boxes: that would add a partial box per axis). The dK/dV
// kernel owns a key box and walks the query boxes whose windows reach it. Both bounds of a
// window are non-decreasing in the query coordinate, so a box's union and intersection of
// windows come from its two end queries per axis.
//
// A call may compute only a range of the queries (Params: q_offset, q_extent). Its members of a
// dilation group are one run of group coordinates, [q_begin, q_end), which query boxes tile like
// a whole group; windows stay those of the key grid's groups, and query rows are addressed in
// the range's own grid. For the whole grid the run is the whole group and both grids are one.
#pragma once

#include "common/tile_params.h"

namespace natten {

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// One dilation group's part of the grid a tile lives in.
template <int Rank>
struct GroupCoords {
  int first_token;   // flat token of the group's first coordinates (its dilation residues)
  int length[Rank];  // tokens of the group per axis
  // The query range's members of the group: group coordinates [q_begin, q_end) per axis, and
  // the flat token in the range's grid that group coordinates 0 would have (negative when the
  // range starts past them; members' tokens are not).
  int q_begin[Rank];
  int q_end[Rank];
  int q_first_token;

  // Flat token of group coordinates g (each < length); tokens of a batch entry fit an int.
  __device__ int token(Params<Rank> const& p, int const* g) const {
    int t = first_token;
#pragma unroll
    for (int a = 0; a < Rank; ++a) t += g[a] * p.axis[a].group_token_stride;
    return t;
  }

  // Flat token in the query range's grid of group coordinates g (each in [q_begin, q_end)).
  __device__ int q_token(Params<Rank> const& p, int const* g) const {
    int t = q_first_token;
#pragma unroll
    for (int a = 0; a < Rank; ++a) t += g[a] * p.axis[a].q_group_token_stride;
    return t;
  }

  __device__ BasicAxisWindow<int> window(Params<Rank> const& p, int a, int x) const {
    return axis_window(p.axis[a].spec, length[a], x);
  }
};

// Splits a linear tile index over the axes (row-major; per axis residue-major, then tile) into
// a dilation group and the tile's origin: query tiles tile the range's members of the group,
// key tiles the whole group. False when the tile starts past the end of what it tiles (groups
// of a non-divisible extent, and their runs in a range, differ in length by one).
template <int Rank, class Box>
__device__ bool decompose_tile(Params<Rank> const& p, int index, bool query_tiles,
                               GroupCoords<Rank>& g, int* origin) {
  bool inside = true;
  g.first_token = 0;
  g.q_first_token = 0;
#pragma unroll
  for (int a = Rank - 1; a >= 0; --a) {
    AxisParams const& A = p.axis[a];
    int const per_group = query_tiles ? A.q_tiles : A.kv_tiles;
    int const n = per_group * int(A.spec.dilation);
    int const u = index % n;
    index /= n;
    int const residue = u / per_group;
    g.first_token += residue * A.token_stride;
    g.q_first_token += (residue - A.q_offset) * A.q_token_stride;
    g.length[a] = group_length(A.spec, residue);
    g.q_begin[a] = group_members_below(A.q_offset, residue, A.spec.dilation);
    g.q_end[a] = group_members_below(A.q_offset + A.q_extent, residue, A.spec.dilation);
    origin[a] = (query_tiles ? g.q_begin[a] : 0) + (u % per_group) * Box::extent(a);
    inside = inside && origin[a] < (query_tiles ? g.q_end[a] : g.length[a]);
  }
  return inside;
}

// Group coordinates c of token r of the box at `origin`; false when one is at or past `end`.
template <int Rank, class Box>
__device__ __forceinline__ bool box_coords(int const* origin, int r, int const* end, int* c) {
  bool ok = true;
#pragma unroll
  for (int a = 0; a < Rank; ++a) {
    c[a] = origin[a] + Box::offset(r, a);
    ok = ok && c[a] < end[a];
  }
  return ok;
}

// Flat token of token r of the box at `origin` in group g, or -1 past the group's end.
template <int Rank, class Box>
__device__ __forceinline__ int box_token(Params<Rank> const& p, GroupCoords<Rank> const& g,
                                         int const* origin, int r) {
  int c[Rank];
  return box_coords<Rank, Box>(origin, r, g.length, c) ? g.token(p, c) : -1;
}

// Flat token in the query range's grid of query r of the box at `origin` (which starts inside
// the range's run of group g), or -1 past the run's end.
template <int Rank, class Box>
__device__ __forceinline__ int box_query_token(Params<Rank> const& p, GroupCoords<Rank> const& g,
                                               int const* origin, int r) {
  int c[Rank];
  return box_coords<Rank, Box>(origin, r, g.q_end, c) ? g.q_token(p, c) : -1;
}

// Coordinate along axis a, in the query range's grid, of the first query of the box at `origin`
// of group g: where a TMA load of the box starts (sm90). The load steps by the dilation, so the
// box's queries past the range's run of the group lie past the range's grid (zero-filled).
template <int Rank>
__device__ __forceinline__ int query_box_position(Params<Rank> const& p, GroupCoords<Rank> const& g, int a,
                                                  int origin) {
  AxisParams const& A = p.axis[a];
  int const residue = g.first_token / A.token_stride % A.spec.extent;
  return residue + origin * A.spec.dilation - A.q_offset;
}

// Per query of a box: its flat token in the query range's grid (-1 past the range's run of the
// group) and, per axis, its window ([first, last]; [kNoKey, kNoKey] for a query past the end).
// Lives in shared memory; one table per query box visited.
constexpr int kNoKey = -(1 << 30);
template <int Rank, int N>
struct RowTable {
  int token[N];
  int first[Rank][N];
  int last[Rank][N];
};

template <int Rank, class Box, int kThreads>
__device__ void build_row_table(Params<Rank> const& p, GroupCoords<Rank> const& g,
                                int const* origin, RowTable<Rank, Box::kSize>& t, int tid) {
  for (int r = tid; r < Box::kSize; r += kThreads) {
    int c[Rank];
    bool const valid = box_coords<Rank, Box>(origin, r, g.q_end, c);
    t.token[r] = valid ? g.q_token(p, c) : -1;
#pragma unroll
    for (int a = 0; a < Rank; ++a) {
      if (valid) {
        auto const w = g.window(p, a, c[a]);
        t.first[a][r] = int(w.first);
        t.last[a][r] = int(w.last);
      } else {  // a window no key is in (keys are >= 0), also for the unsigned range tests
        t.first[a][r] = kNoKey;
        t.last[a][r] = kNoKey;
      }
    }
  }
}

// Whether query row r of a row table sees the key at group coordinates k.
template <int Rank, int N>
__device__ __forceinline__ bool sees(RowTable<Rank, N> const& t, int r, int const* k) {
  bool ok = true;  // bitwise, not short-circuit: no branches in per-element masks
#pragma unroll
  for (int a = 0; a < Rank; ++a) ok = ok & (t.first[a][r] <= k[a]) & (k[a] <= t.last[a][r]);
  return ok;
}

// The key boxes a query box reaches: forward and dQ.
template <int Rank, class QBox, class KVBox>
struct KeyWalk {
  int first[Rank];       // first key of the union of the query windows
  int count[Rank];       // key boxes along the axis
  int full_first[Rank];  // keys every (real) query of the box sees: [full_first, full_last]
  int full_last[Rank];
  int tiles;

  __device__ void init(Params<Rank> const& p, GroupCoords<Rank> const& g, int const* q_origin) {
    tiles = 1;
#pragma unroll
    for (int a = 0; a < Rank; ++a) {
      int const q_last = min(q_origin[a] + QBox::extent(a), g.q_end[a]) - 1;
      auto const keys = tile_key_range(p.axis[a].spec, g.length[a], q_origin[a], q_last);
      first[a] = keys.first;
      count[a] = ceil_div(keys.last - keys.first + 1, KVBox::extent(a));
      full_first[a] = keys.full_first;
      full_last[a] = keys.full_last;
      tiles *= count[a];
    }
  }

  // A position in the walk as per-axis box indices (last axis fastest). Steps are visited in
  // order, so a cursor advances by carrying instead of dividing the step number by the counts:
  // the divisions cost more than a small head dim's whole softmax step.
  struct Cursor {
    int index[Rank] = {};
  };

  __device__ void advance(Cursor& c) const {
    bool carry = true;
#pragma unroll
    for (int a = Rank - 1; a >= 0; --a) {
      int const i = c.index[a] + int(carry);
      carry = carry && i == count[a];
      c.index[a] = carry ? 0 : i;
    }
  }

  __device__ void origin(Cursor const& c, int* o) const {
#pragma unroll
    for (int a = 0; a < Rank; ++a) o[a] = first[a] + c.index[a] * KVBox::extent(a);
  }

  // Every query of the box sees every key of the key box at o (no mask needed).
  __device__ bool full(int const* o) const {
    bool ok = true;
#pragma unroll
    for (int a = 0; a < Rank; ++a) {
      ok = ok && o[a] >= full_first[a] && o[a] + KVBox::extent(a) - 1 <= full_last[a];
    }
    return ok;
  }
};

// The query boxes whose windows reach a key box: dK/dV. Only the range's queries are computed,
// so the walk covers those of them that see a key of the box (none: no step, zero gradients).
template <int Rank, class QBox, class KVBox>
struct QueryWalk {
  int first[Rank];  // first query of the range that sees a key of the box
  int count[Rank];  // query boxes along the axis
  int k_last[Rank];  // last real key of the key box
  int tiles;

  __device__ void init(Params<Rank> const& p, GroupCoords<Rank> const& g, int const* k_origin) {
    tiles = 1;
#pragma unroll
    for (int a = 0; a < Rank; ++a) {
      k_last[a] = min(k_origin[a] + KVBox::extent(a), g.length[a]) - 1;
      auto const r0 = axis_inverse_window(p.axis[a].spec, g.length[a], k_origin[a]);
      auto const r1 = axis_inverse_window(p.axis[a].spec, g.length[a], k_last[a]);
      int const q_first = max(int(r0.first), g.q_begin[a]);
      int const q_last = min(int(r1.last), g.q_end[a] - 1);
      first[a] = q_first;
      count[a] = q_last >= q_first ? ceil_div(q_last - q_first + 1, QBox::extent(a)) : 0;
      tiles *= count[a];
    }
  }

  __device__ void origin(int n, int* o) const {
#pragma unroll
    for (int a = Rank - 1; a >= 0; --a) {
      o[a] = first[a] + (n % count[a]) * QBox::extent(a);
      n /= count[a];
    }
  }

  // Every query of the query box at q_o is real (in the range) and sees every key of the
  // (whole, real) key box at k_o.
  __device__ bool full(Params<Rank> const& p, GroupCoords<Rank> const& g, int const* q_o,
                       int const* k_o) const {
    bool ok = true;
#pragma unroll
    for (int a = 0; a < Rank; ++a) {
      int const box_q_last = q_o[a] + QBox::extent(a) - 1;
      int const box_k_last = k_o[a] + KVBox::extent(a) - 1;
      ok = ok && box_q_last < g.q_end[a] && box_k_last < g.length[a] &&
           g.window(p, a, box_q_last).first <= k_o[a] && g.window(p, a, q_o[a]).last >= box_k_last;
    }
    return ok;
  }
};

}  // namespace natten
