// Host-only check of the SM80 family's tiling of a query range (no GPU, no CUDA, no torch):
// builds with any C++17 compiler (tests/test_sm80_query_range_host.py compiles it with the
// system's c++).
//
// The shared geometry the SM80 kernels decide with (common/tile_geometry.cuh: decompose_tile,
// build_row_table, box_query_token, box_token, KeyWalk, QueryWalk) is included as it is with the
// CUDA qualifiers defined away, and replayed as sm80/fna_forward.cuh, fna_backward.cuh and
// mainloop.cuh use it, on random problems (ranks 1-3, odd/even windows, stride, dilation, causal)
// with random query ranges per axis (the whole grid among them):
//   - query-box CTAs (forward, dQ): every query of the range is the row of exactly one CTA, at
//     its token in the range's grid, and box_query_token agrees with the row table; the CTA's
//     walk (mask_scores: full boxes unmasked, else the row table's windows) adds every visible
//     (query, key) pair of docs/semantics.md exactly once and no other pair of real tokens, and
//     every step holds a visible pair (the walk covers only the range's windows);
//   - key-box CTAs (dK/dV): their QueryWalk steps (QueryWalk::full unmasked, else the row
//     table) add every visible pair of a range query exactly once and nothing else, and every
//     step holds a visible pair; additional-key CTAs step over every query of the range once.
// Exit status non-zero on any violation.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "host_shim.h"
#include "common/tile_geometry.cuh"
#include "host_check_common.h"

using namespace natten;
using namespace natten::host_check;

namespace {

template <int Rank, class QBox, class KVBox, class CBox>
void check(Problem const& pr) {
  NaProblem const& p = pr.p;
  FnaTensors t;
  Params<Rank> const P = make_box_params<Rank, QBox, KVBox>(p, t, 64, "check");
  int const before = failures;
  int64_t const nq = p.query_tokens(), nk = p.tokens();
  // Visible pairs by brute force: (range token, key token).
  std::map<std::pair<int64_t, int64_t>, int> expected;
  for (int64_t q = 0; q < nq; ++q) {
    for (int64_t k = 0; k < nk; ++k) {
      if (spec_sees(p, key_grid_token(p, q), k)) expected[{q, k}] = 0;
    }
  }
  auto add = [&](int64_t q, int64_t k, char const* who) {
    auto it = expected.find({q, k});
    EXPECT(it != expected.end(), "%s adds invisible pair (%lld, %lld): %s", who, (long long)q,
           (long long)k, pr.describe().c_str());
    if (it != expected.end()) ++it->second;
  };
  auto check_counts = [&](char const* who) {
    for (auto& [pair, n] : expected) {
      EXPECT(n == 1, "%s adds pair (%lld, %lld) %d times: %s", who, (long long)pair.first,
             (long long)pair.second, n, pr.describe().c_str());
      n = 0;
    }
  };

  // Adds the pairs a step computes: every real key of the key box at k_o (group g) with every
  // row of the query table that sees it, or every row if the step is `full`; whether it added
  // one. A full dK/dV step (real_when_full) also claims that every row is a range query.
  auto add_step = [&](GroupCoords<Rank> const& g, int const* k_o, auto const& table, int n_rows,
                      bool full, bool real_when_full, char const* who) {
    bool any = false;
    for (int j = 0; j < KVBox::kSize; ++j) {
      int kc[Rank];
      if (!box_coords<Rank, KVBox>(k_o, j, g.length, kc)) continue;
      int const tk = g.token(P, kc);
      for (int r = 0; r < n_rows; ++r) {
        if (table.token[r] < 0) {
          EXPECT(!(full && real_when_full), "%s: full step with a query outside the range: %s", who,
                 pr.describe().c_str());
          continue;
        }
        if (!(full || sees(table, r, kc))) continue;
        add(table.token[r], tk, who);
        any = true;
      }
    }
    EXPECT(any, "%s step without a visible pair: %s", who, pr.describe().c_str());
  };

  int q_tiles = 1, kv_tiles = 1;
  for (int a = 0; a < Rank; ++a) {
    q_tiles *= P.axis[a].q_tiles * P.axis[a].spec.dilation;
    kv_tiles *= P.axis[a].kv_tiles * P.axis[a].spec.dilation;
  }

  // Forward and dQ: query-box CTAs.
  std::vector<int> rows_of(nq, 0);
  RowTable<Rank, QBox::kSize> rows;
  for (int i = 0; i < q_tiles; ++i) {
    GroupCoords<Rank> g;
    int q_origin[Rank];
    if (!decompose_tile<Rank, QBox>(P, i, true, g, q_origin)) continue;
    build_row_table<Rank, QBox, 1>(P, g, q_origin, rows, 0);
    for (int r = 0; r < QBox::kSize; ++r) {
      int const tq = rows.token[r];
      int const from_box = box_query_token<Rank, QBox>(P, g, q_origin, r);
      EXPECT(tq == from_box, "row table %d, box_query_token %d", tq, from_box);
      if (tq < 0) continue;
      EXPECT(tq < nq, "query token %d past the range: %s", tq, pr.describe().c_str());
      if (tq < nq) ++rows_of[tq];
    }
    KeyWalk<Rank, QBox, KVBox> walk;
    walk.init(P, g, q_origin);
    typename KeyWalk<Rank, QBox, KVBox>::Cursor c;
    for (int n = 0; n < walk.tiles; ++n, walk.advance(c)) {
      int o[Rank];
      walk.origin(c, o);
      add_step(g, o, rows, QBox::kSize, walk.full(o), false, "forward");
    }
  }
  for (int64_t q = 0; q < nq; ++q) {
    EXPECT(rows_of[q] == 1, "range query %lld is a row of %d CTAs: %s", (long long)q, rows_of[q],
           pr.describe().c_str());
  }
  check_counts("forward");

  // dK/dV: key-box CTAs walking the range's query boxes.
  RowTable<Rank, CBox::kSize> cols;
  for (int i = 0; i < kv_tiles; ++i) {
    GroupCoords<Rank> g;
    int k_origin[Rank];
    if (!decompose_tile<Rank, KVBox>(P, i, false, g, k_origin)) continue;
    QueryWalk<Rank, CBox, KVBox> walk;
    walk.init(P, g, k_origin);
    for (int n = 0; n < walk.tiles; ++n) {
      int q_o[Rank];
      walk.origin(n, q_o);
      build_row_table<Rank, CBox, 1>(P, g, q_o, cols, 0);
      add_step(g, k_origin, cols, CBox::kSize, walk.full(P, g, q_o, k_origin), true, "dK/dV");
    }
  }
  check_counts("dK/dV");

  // Additional-key CTAs of dK/dV: every query box of the range, cut into CBox pieces.
  constexpr int kCuts = QBox::kSize / CBox::kSize;
  std::fill(rows_of.begin(), rows_of.end(), 0);
  for (int n = 0; n < q_tiles * kCuts; ++n) {
    GroupCoords<Rank> g;
    int q_o[Rank];
    decompose_tile<Rank, QBox>(P, n / kCuts, true, g, q_o);
    for (int a = 0; a < Rank; ++a) q_o[a] += QBox::offset((n % kCuts) * CBox::kSize, a);
    build_row_table<Rank, CBox, 1>(P, g, q_o, cols, 0);
    for (int r = 0; r < CBox::kSize; ++r) {
      if (cols.token[r] >= 0 && cols.token[r] < nq) ++rows_of[cols.token[r]];
    }
  }
  for (int64_t q = 0; q < nq; ++q) {
    EXPECT(rows_of[q] == 1, "additional keys see range query %lld %d times: %s", (long long)q,
           rows_of[q], pr.describe().c_str());
  }
  if (failures > before) std::printf("  in %s\n", pr.describe().c_str());
}

template <int Rank, class QBox, class KVBox, class CBox>
void run(std::mt19937& rng, int problems, int max_extent) {
  for (int i = 0; i < problems; ++i) {
    Problem pr = random_problem<Rank, QBox, KVBox>(rng, max_extent);
    random_range(rng, pr.p);
    check<Rank, QBox, KVBox, CBox>(pr);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(2024);
  run<1, Box<8>, Box<16>, Box<4>>(rng, 400, 60);
  run<1, Box<16>, Box<8>, Box<16>>(rng, 200, 60);
  run<2, Box<4, 8>, Box<8, 4>, Box<2, 8>>(rng, 200, 20);
  run<3, Box<2, 4, 2>, Box<2, 2, 4>, Box<1, 4, 2>>(rng, 100, 9);
  if (failures) {
    std::printf("FAIL: %d violations\n", failures);
    return 1;
  }
  std::printf("PASS\n");
  return 0;
}
