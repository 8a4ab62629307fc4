// Key-side pieces of the SM80 mainloops: where the keys of a step live, their loads, and the
// score mask of the query-box-major kernels (forward and dQ). The dK/dV kernel owns one key
// slice instead of walking them, and addresses its loads and gradient stores through the same
// KeySlice, so every kernel agrees on which key rows exist.
#pragma once

#include "sm80/mma.cuh"
#include "common/tile_geometry.cuh"

namespace natten::sm80 {

// The keys of one step: a key box of the CTA's dilation group, or a slice of the additional
// keys (which have no grid position, so every query sees them).
template <int Rank, class KVBox>
struct KeySlice {
  int origin[Rank];  // group coordinates of the box; unused for additional keys
  int extra_first;   // first additional key of the slice; -1 for a box of the grid

  // Key r's token in the [B, *S, Hkv, ...] (box) or [B, E, Hkv, ...] (additional keys) tensor,
  // or -1 for a key past the group's end or past the last additional key.
  __device__ int token(Params<Rank> const& p, GroupCoords<Rank> const& g, int r) const {
    if (extra_first < 0) return box_token<Rank, KVBox>(p, g, origin, r);
    int const e = extra_first + r;
    return e < p.num_extra ? e : -1;
  }

  // The rows this slice's keys live in: those of `grid` or of `extra`, for (b, hk).
  template <class Element>
  __device__ HeadRows<Element> rows(Params<Rank> const& p, Element* grid, Element* extra, int b,
                                    int hk, int dim) const {
    return extra_first < 0 ? head_rows(grid, p.tokens, p.heads_kv, b, hk, dim)
                           : head_rows(extra, p.num_extra, p.heads_kv, b, hk, dim);
  }
};

// What a query-box-major CTA (forward, dQ) owns: its batch entry, query head and the key/value
// head that serves it, its query box (group coordinates and origin), and its walk: the key
// boxes its queries see, then the slices of the additional keys.
template <int Rank, class QBox, class KVBox>
struct QueryBoxCta {
  int b, h, hk;
  GroupCoords<Rank> g;
  int q_origin[Rank];
  KeyWalk<Rank, QBox, KVBox> walk;
  int steps;

  // false: the box starts past its group's end, and the CTA has nothing to do.
  __device__ __forceinline__ bool init(Params<Rank> const& p) {
    b = blockIdx.z;
    h = blockIdx.y;
    hk = h / p.group;
    if (!decompose_tile<Rank, QBox>(p, blockIdx.x, true, g, q_origin)) return false;
    walk.init(p, g, q_origin);
    steps = walk.tiles + ceil_div(p.num_extra, KVBox::kSize);
    return true;
  }
};

// Step n of a KeyWalk, at cursor c: its key boxes first, then the slices of the additional
// keys (for which the cursor, past the boxes, gives an unused origin).
template <int Rank, class KVBox, class Walk>
__device__ __forceinline__ KeySlice<Rank, KVBox> key_slice(Walk const& walk, int n,
                                                           typename Walk::Cursor const& c) {
  KeySlice<Rank, KVBox> k;
  k.extra_first = n < walk.tiles ? -1 : (n - walk.tiles) * KVBox::kSize;
  walk.origin(c, k.origin);
  return k;
}

// Loads the key (or value) rows of a slice into s; rows that do not exist are zero-filled.
template <int Rank, class Traits, class KVBox, class S>
__device__ __forceinline__ void load_keys(Params<Rank> const& p, GroupCoords<Rank> const& g,
                                          KeySlice<Rank, KVBox> const& keys, int b, int hk, S& s,
                                          void const* grid_ptr, void const* extra_ptr, int dim,
                                          int tid) {
  using Element = typename Traits::Element;
  constexpr int N = KVBox::kSize, D = Traits::kHeadDim, kThreads = Traits::kThreads;
  auto const rows = keys.rows(p, static_cast<Element const*>(grid_ptr),
                              static_cast<Element const*>(extra_ptr), b, hk, dim);
  // Two gathers rather than one with a per-row choice: the forward's registers are tight.
  if (keys.extra_first < 0) {
    auto token = [&](int r) { return box_token<Rank, KVBox>(p, g, keys.origin, r); };
    gather_rows<N, D, kThreads>(s, rows, token, dim, tid);
  } else {
    auto token = [&](int r) {
      int const e = keys.extra_first + r;
      return e < p.num_extra ? e : -1;
    };
    gather_rows<N, D, kThreads>(s, rows, token, dim, tid);
  }
}

// Sets invisible elements of walk step n's (at cursor c) scores (or probabilities) to `masked`
// (nothing to do on fully visible key boxes). rows: the query (row) table; coords: accumulator
// coordinates as (row, col). Callers mask scaled scores with -inf or probabilities with 0,
// never raw scores: a negative or zero softmax scale would turn a raw -inf into +inf or NaN.
template <int Rank, class KVBox, class Walk, class Scores, class Coords, class Rows>
__device__ __forceinline__ void mask_scores(Params<Rank> const& p, Walk const& walk, int n,
                                            typename Walk::Cursor const& c, Scores& s,
                                            Coords const& coords, Rows const& rows, float masked) {
  constexpr int N = KVBox::kSize;
  if (n < walk.tiles) {
    int o[Rank];
    walk.origin(c, o);
    if (walk.full(o)) return;
    // Branch-free on purpose: a short-circuit test per element compiles to branches around
    // shared-memory loads, which cost more than the scores' whole softmax. One unsigned compare
    // per axis tests lo <= k <= hi. Rows past the group's end see nothing (never stored).
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s); ++i) {
      int const r = get<0>(coords(i, 0));
      int lo[Rank];
      unsigned span[Rank];
#pragma unroll
      for (int a = 0; a < Rank; ++a) {
        lo[a] = rows.first[a][r] - o[a];
        span[a] = static_cast<unsigned>(rows.last[a][r] - rows.first[a][r]);
      }
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        int const c = get<1>(coords(0, j));
        bool visible = true;
#pragma unroll
        for (int a = 0; a < Rank; ++a) {
          visible = visible & (static_cast<unsigned>(KVBox::offset(c, a) - lo[a]) <= span[a]);
        }
        s(i, j) = visible ? s(i, j) : masked;
      }
    }
  } else {
    int const e0 = (n - walk.tiles) * N;
    if (e0 + N <= p.num_extra) return;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      if (e0 + get<1>(coords(0, j)) >= p.num_extra) {
        CUTE_UNROLL
        for (int i = 0; i < size<0>(s); ++i) s(i, j) = masked;
      }
    }
  }
}

}  // namespace natten::sm80
