// The walk of the SM90 backward: what a key-box-stationary CTA owns and which query boxes it
// visits, in order.
//
// A CTA owns one key box of one dilation group (or one slice of the additional keys) for one
// key/value head and batch entry, keeps its dK and dV in registers, and visits, for every query
// head of the GQA group in turn, the query boxes whose windows reach its keys (common/'s
// QueryWalk). Additional keys are seen by every query, so their CTAs visit every query box of
// every dilation group. The walk is the SM80 dK/dV kernel's, written against the shared geometry
// in common/tile_geometry.cuh, so both families agree on which queries see which keys; like it,
// a call computing a range of the queries visits only the range's query boxes.
#pragma once

#include "common/tile_geometry.cuh"

namespace natten::sm90 {

// One step: a query box of one query head.
template <int Rank>
struct QueryStep {
  int h;
  GroupCoords<Rank> g;  // the box's dilation group: the CTA's, except for additional keys
  int origin[Rank];
  bool full;  // every query of the box is real and sees every key of the CTA: no mask needed
};

template <int Rank, class QBox, class KVBox>
struct KeyBoxCta {
  int b, hk;
  GroupCoords<Rank> g;  // of the key box (unused for additional keys)
  int k_origin[Rank];
  int extra_first;  // first additional key of the CTA's slice; -1 for a key box of the grid
  QueryWalk<Rank, QBox, KVBox> walk;
  int per_head;  // steps per query head
  int steps;

  // CTAs past the key boxes of the grid own the additional keys. False: the key box starts past
  // its group's end (groups of a non-divisible extent differ in length), nothing to do.
  __device__ bool init(Params<Rank> const& p) {
    b = blockIdx.z;
    hk = blockIdx.y;
    int kv_tiles = 1, q_tiles = 1;
#pragma unroll
    for (int a = 0; a < Rank; ++a) {
      kv_tiles *= p.axis[a].kv_tiles * p.axis[a].spec.dilation;
      q_tiles *= p.axis[a].q_tiles * p.axis[a].spec.dilation;
    }
    if (int(blockIdx.x) < kv_tiles) {
      if (!decompose_tile<Rank, KVBox>(p, blockIdx.x, false, g, k_origin)) return false;
      extra_first = -1;
      walk.init(p, g, k_origin);
      per_head = walk.tiles;
    } else {
      extra_first = (int(blockIdx.x) - kv_tiles) * KVBox::kSize;
      per_head = q_tiles;
    }
    steps = p.group * per_head;  // 0 (no query sees the box) still writes zero gradients
    return true;
  }

  __device__ QueryStep<Rank> step(Params<Rank> const& p, int s) const {
    QueryStep<Rank> q;
    q.h = hk * p.group + s / per_head;
    int const n = s % per_head;
    if (extra_first < 0) {
      q.g = g;
      walk.origin(n, q.origin);
      q.full = walk.full(p, g, q.origin, k_origin);
    } else {
      // A box past the range's run of its group has no computed queries (decompose_tile still
      // fills its coordinates; its rows arrive as zeros and are masked), so it contributes nothing.
      decompose_tile<Rank, QBox>(p, n, true, q.g, q.origin);
      bool whole = extra_first + KVBox::kSize <= p.num_extra;
#pragma unroll
      for (int a = 0; a < Rank; ++a) whole = whole && q.origin[a] + QBox::extent(a) <= q.g.q_end[a];
      q.full = whole;
    }
    return q;
  }

  // Key r of the CTA: its row in the [B, *S, Hkv, ...] or (additional keys) [B, E, Hkv, ...]
  // tensor, or -1 for a key past its group's end or past the last additional key.
  __device__ int64_t key_row(Params<Rank> const& p, int r) const {
    if (extra_first < 0) {
      int const t = box_token<Rank, KVBox>(p, g, k_origin, r);
      return t < 0 ? -1 : (int64_t(b) * p.tokens + t) * p.heads_kv + hk;
    }
    int const e = extra_first + r;
    return e < p.num_extra ? (int64_t(b) * p.num_extra + e) * p.heads_kv + hk : -1;
  }

  // Per axis, the computed queries that see key r, as an interval [first, last] of its group's
  // coordinates: those of the query range (empty for a key past its group's end). Additional
  // keys: every query up to the end of the range's run of its group, which the mask applies per
  // step (the interval reaches past every end), or none past the last additional key.
  __device__ void key_queries(Params<Rank> const& p, int r, int* first, int* last) const {
    constexpr int kEveryQuery = 1 << 30;
#pragma unroll
    for (int a = 0; a < Rank; ++a) {
      if (extra_first < 0) {
        auto const q = axis_inverse_window(p.axis[a].spec, g.length[a], k_origin[a] + KVBox::offset(r, a));
        first[a] = max(int(q.first), g.q_begin[a]);
        last[a] = min(int(q.last), g.q_end[a] - 1);
      } else {
        first[a] = 0;
        last[a] = extra_first + r < p.num_extra ? kEveryQuery : -1;
      }
    }
  }
};

}  // namespace natten::sm90
