// Host-only check of the SM90 forward's walk and score masks (no GPU, no CUDA, no torch): builds
// with any C++17 compiler (tests/test_sm90_forward_host.py).
//
// The kernel's code is included as it is (common/tile_geometry.cuh, sm90/fwd_mask.cuh) with the
// CUDA qualifiers defined away, and replayed per CTA (query box of a dilation group, as
// sm80::QueryBoxCta::init makes it), per consumer thread (its rows and columns as the wgmma
// accumulator layout gives them; sm90_layout_check.cu checks that against CuTe) and
// per walk step (KeyWalk::full, else BitMask::apply on that step's scores). Against brute force
// over docs/semantics.md on random problems (ranks 1-3, odd/even windows, stride, dilation, causal
// per axis, non-divisible extents) with random query ranges per axis (NaProblem::q_offset; the
// whole axis among them) it requires:
//   0. every query of the range is a row of exactly one CTA, at its token in the range's grid
//      (box_query_token, where O and the LSE go), and the Q load (query_box_position, stepping
//      by the dilation) brings exactly that query's row of the range's grid to each row of the
//      box, and for rows past the range's run of the group a position past the grid (zeros);
// and for every element of every walked key box whose query row is a computed query:
//   1. it is kept exactly when its key is a real token that the query sees (zero-filled keys of
//      partial boxes are masked), and
//   2. every (query, key) pair docs/semantics.md makes visible is kept exactly once over the walk.
// Rows past the range are never stored, so their elements are free. Additional keys have a count
// mask of their own and are not part of this check.
//   sm90_forward_mask_check [--mutate]
// --mutate moves one row's window end along the innermost axis by one key, to show the check
// catches such a bug: it must then fail.
// Exit status non-zero on any violation.
#include <cmath>
#include <cstring>
#include <map>
#include <vector>

#include "host_shim.h"
#include "common/tile_geometry.cuh"
#include "sm90/fwd_mask.cuh"
#include "host_check_common.h"

using namespace natten;
using namespace natten::host_check;

namespace {

bool mutate = false;
int64_t partial_checked = 0;  // elements of real query rows on masked (partial) key boxes

struct Scores {  // a thread's score fragment, indexed like CuTe's
  float* v;
  float& operator()(int i) { return v[i]; }
};

// Check 0 for the CTA of the query box at q_origin of group g: its rows' tokens in the range's
// grid (counted into rows_of) against where the Q load puts them.
template <int Rank, class QBox>
void check_query_rows(Params<Rank> const& p, GroupCoords<Rank> const& g, int const* q_origin, std::vector<int>& rows_of) {
  int pos[Rank];
  for (int a = 0; a < Rank; ++a) pos[a] = query_box_position(p, g, a, q_origin[a]);
  for (int r = 0; r < QBox::kSize; ++r) {
    int const t = box_query_token<Rank, QBox>(p, g, q_origin, r);
    int64_t loaded = 0;  // the range-grid token the load brings to row r, or -1 (zeros)
    for (int a = 0; a < Rank; ++a) {
      int const x = pos[a] + QBox::offset(r, a) * p.axis[a].spec.dilation;
      EXPECT(x >= 0, "row %d loads from position %d < 0 along axis %d", r, x, a);
      loaded = loaded < 0 || x >= p.axis[a].q_extent ? -1 : loaded + int64_t(x) * p.axis[a].q_token_stride;
    }
    EXPECT(loaded == t, "row %d: the Q load brings token %lld, its token is %d", r, (long long)loaded, t);
    if (t >= 0 && t < int64_t(rows_of.size())) ++rows_of[t];
  }
}

template <int Rank, class QBox, class KVBox>
void check_problem(Problem const& prob, std::vector<std::vector<int64_t>> const& keys_of) {
  NaProblem const& np = prob.p;
  FnaTensors t{};
  Params<Rank> const p = make_box_params<Rank, QBox, KVBox>(np, t, 64, "mask check");
  constexpr int M = QBox::kSize, N = KVBox::kSize;
  int64_t const nq = p.q_tokens;
  int const failures_before = failures;
  std::vector<std::map<int64_t, int>> kept(nq);  // per query of the range's grid
  std::vector<int> rows_of(nq, 0);

  int64_t q_tiles = 1;
  for (int a = 0; a < Rank; ++a) q_tiles *= int64_t(p.axis[a].q_tiles) * p.axis[a].spec.dilation;
  for (int64_t bx = 0; bx < q_tiles; ++bx) {
    GroupCoords<Rank> g;
    int q_origin[Rank];
    if (!decompose_tile<Rank, QBox>(p, int(bx), true, g, q_origin)) continue;  // the CTA returns
    check_query_rows<Rank, QBox>(p, g, q_origin, rows_of);
    KeyWalk<Rank, QBox, KVBox> walk;
    walk.init(p, g, q_origin);
    for (int ct = 0; ct < 128 * (M / 64); ++ct) {
      // The accumulator layout: warpgroup ct / 128 holds rows 64w.., warp 16 rows, lane / 4 and
      // lane / 4 + 8; columns 2 * (lane % 4) + column_step(v).
      int const row0 = 64 * (ct / 128) + 16 * ((ct % 128) / 32) + (ct % 32) / 4, col0 = 2 * (ct % 4);
      sm90::BitMask<Rank, QBox, KVBox> mask;
      mask.init(p, g, q_origin, walk.first, row0, col0);
      if (mutate) mask.hi[0][Rank - 1] += 1;  // one row's window end, one key further
      int64_t row_tok[2];
      for (int i = 0; i < 2; ++i) row_tok[i] = box_query_token<Rank, QBox>(p, g, q_origin, row0 + 8 * i);
      typename KeyWalk<Rank, QBox, KVBox>::Cursor at;
      for (int n = 0; n < walk.tiles; ++n, walk.advance(at)) {
        int o[Rank];
        walk.origin(at, o);
        bool const full = walk.full(o);
        float s[N / 2];
        for (float& x : s) x = 0.f;
        Scores frag{s};
        if (!full) mask.apply(frag, at.index, -INFINITY);
        for (int v = 0; v < N / 2; ++v) {
          int64_t const q = row_tok[sm90::row_half(v)];
          if (q < 0) continue;
          int64_t const k = box_token<Rank, KVBox>(p, g, o, col0 + sm90::column_step(v));
          partial_checked += !full;
          bool const keep = s[v] == 0.f;
          bool const want = k >= 0 && spec_sees(np, key_grid_token(np, q), k);
          EXPECT(keep == want, "box %lld thread %d step %d element %d (query %lld, key %lld): kept %d, visible %d%s",
                 (long long)bx, ct, n, v, (long long)q, (long long)k, int(keep), int(want), full ? " (full box)" : "");
          if (keep && k >= 0) ++kept[q][k];
        }
      }
    }
  }
  for (int64_t x = 0; x < nq; ++x) {
    EXPECT(rows_of[x] == 1, "range query %lld is a row of %d CTAs", (long long)x, rows_of[x]);
    for (int64_t y : keys_of[x]) {
      auto const it = kept[x].find(y);
      int const c = it == kept[x].end() ? 0 : it->second;
      EXPECT(c == 1, "query %lld key %lld kept %d times", (long long)x, (long long)y, c);
    }
  }
  if (failures != failures_before) std::printf("  in problem %s\n", prob.describe().c_str());
}

template <int Rank, class QBox, class KVBox>
void check_mask(Problem const& prob) {
  int64_t const nq = prob.p.query_tokens(), T = prob.p.tokens();
  std::vector<std::vector<int64_t>> keys_of(nq);  // per query of the range's grid
  for (int64_t x = 0; x < nq; ++x) {
    for (int64_t y = 0; y < T; ++y) {
      if (spec_sees(prob.p, key_grid_token(prob.p, x), y)) keys_of[x].push_back(y);
    }
  }
  check_problem<Rank, QBox, KVBox>(prob, keys_of);
}

template <int Rank, class QBox, class KVBox>
void run(char const* name, std::mt19937& rng, int count, int max_extent) {
  int const before = failures;
  for (int i = 0; i < count; ++i) {
    Problem pr = random_problem<Rank, QBox, KVBox>(rng, max_extent);
    pr.p.num_extra = 0;
    random_range(rng, pr.p);
    check_mask<Rank, QBox, KVBox>(pr);
  }
  std::printf("%-26s %4d problems: %s\n", name, count, failures == before ? "ok" : "VIOLATIONS");
}

}  // namespace

int main(int argc, char** argv) {
  mutate = argc > 1 && !std::strcmp(argv[1], "--mutate");
  std::mt19937 rng(90210);
  // Every (query box, key box) pair of the registry and of tests/cuda/sm90_forward_check.cu, key
  // boxes of 256 (two mask words per row) and 64 (half a word), and innermost extents of 2, 4,
  // 8, 16, 32, 64 (every way an axis field can hold the thread's column bits).
  run<1, Box<128>, Box<128>>("1-D 128/128", rng, 120, 900);
  run<1, Box<128>, Box<64>>("1-D 128/64", rng, 60, 700);
  run<1, Box<64>, Box<128>>("1-D 64/128", rng, 60, 700);
  run<1, Box<128>, Box<256>>("1-D 128/256", rng, 40, 900);
  run<2, Box<16, 8>, Box<16, 8>>("2-D 16x8/16x8", rng, 80, 48);
  run<2, Box<16, 8>, Box<8, 8>>("2-D 16x8/8x8", rng, 40, 40);
  run<2, Box<8, 16>, Box<16, 8>>("2-D 8x16/16x8", rng, 40, 40);
  run<2, Box<16, 8>, Box<16, 16>>("2-D 16x8/16x16", rng, 30, 40);
  run<2, Box<8, 16>, Box<2, 32>>("2-D 8x16/2x32", rng, 30, 40);
  run<3, Box<2, 8, 8>, Box<2, 8, 8>>("3-D 2x8x8/2x8x8", rng, 50, 20);
  run<3, Box<4, 4, 8>, Box<4, 4, 4>>("3-D 4x4x8/4x4x4", rng, 40, 16);
  run<3, Box<2, 8, 8>, Box<2, 4, 8>>("3-D 2x8x8/2x4x8", rng, 40, 16);
  run<3, Box<2, 4, 8>, Box<4, 2, 16>>("3-D 2x4x8/4x2x16", rng, 30, 20);
  run<3, Box<2, 8, 8>, Box<1, 2, 64>>("3-D 2x8x8/1x2x64", rng, 20, 20);
  run<3, Box<2, 8, 8>, Box<8, 8, 2>>("3-D 2x8x8/8x8x2", rng, 20, 20);
  run<2, Box<16, 8>, Box<32, 4>>("2-D 16x8/32x4", rng, 30, 40);
  run<2, Box<16, 8>, Box<64, 2>>("2-D 16x8/64x2", rng, 20, 70);
  std::printf("%s: %d violations%s; %lld elements of partial key boxes checked\n", failures == 0 ? "PASS" : "FAIL",
              failures, mutate ? " (mutated masks)" : "", (long long)partial_checked);
  return failures != 0;
}
