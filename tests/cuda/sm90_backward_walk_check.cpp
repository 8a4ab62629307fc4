// Host-only check of the SM90 backward's walk and mask (no GPU, no CUDA, no torch): builds with
// any C++17 compiler (tests/test_sm90_backward_host.py compiles it with the system's c++).
//
// The kernel's code that decides which (query, key) pairs a CTA adds into the gradients is
// included as it is (sm90/bwd_walk.cuh, common/tile_geometry.cuh) with the CUDA qualifiers
// defined away, and its decisions are replayed on the host exactly as bwd_kernel.cuh and
// bwd_mainloop.cuh make them, per CTA (key box of a dilation group or slice of additional keys)
// and step (query box of one query head):
//   - the producer's TMA box positions (keys: residue + origin * dilation per axis; queries:
//     common/'s query_box_position, in the query range's grid) and the flat token (or
//     "zero-filled": out of bounds) every row of a query or key box then holds;
//   - the table warp's query tokens in the range's grid (common/'s box_query_token);
//   - the consumers' per-element visibility (QueryStep::full, else the bit masks of
//     sm90/bwd_mask.cuh from the key table of KeyBoxCta::key_queries, for every consumer
//     thread's key rows and query columns as the wgmma accumulator holds them).
// Against brute force over docs/semantics.md (common/na_window.h's axis_window, per axis, dilation
// residues), on random problems (ranks 1-3, odd/even windows, stride, dilation, causal per axis,
// non-divisible extents, GQA, additional keys) with random query ranges per axis
// (NaProblem::q_offset; the whole axis among them), it requires:
//   1. every visible (head, query of the range, key) pair is added exactly once over all CTAs and
//      steps, and no other pair of real tokens is added (dQ, dK, dV, extra dK/dV all sum these
//      pairs; keys no query of the range sees get none, so zero gradients);
//   2. a pair with a zero-filled row adds nothing only because that row is zero: such pairs are
//      allowed, but never on a `full` step (full claims every row is real);
//   3. the TMA rows are the tokens the table says (-1 exactly where the box leaves the grid),
//      and key rows agree with KeyBoxCta::key_row;
//   4. every step of a key box's walk holds at least one visible pair (the walk yields only
//      query boxes that some query's window makes necessary); additional-key CTAs visit every
//      query box of the range's run of every dilation group, and only the boxes past a run's end
//      add nothing.
// Exit status non-zero on any violation.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

// The CUDA builtin the included device code uses, for a host compiler.
#include "host_shim.h"
struct FakeDim3 {
  unsigned x = 0, y = 0, z = 0;
};
static FakeDim3 blockIdx;

#include "common/tile_geometry.cuh"
#include "sm90/bwd_mask.cuh"
#include "sm90/bwd_walk.cuh"
#include "host_check_common.h"

using namespace natten;
using natten::sm90::KeyBoxCta;
using natten::sm90::QueryStep;
using namespace natten::host_check;

namespace {

// What a TMA box load of a grid tensor puts in row j: the flat token, or -1 (zero fill). As
// bwd_kernel.cuh: per axis the box starts at residue + origin * dilation (keys, the key grid) or
// at query_box_position (`queries`: Q and dO, the query range's grid) and strides by dilation.
template <int Rank, class Box>
int64_t tma_row_token(Params<Rank> const& p, GroupCoords<Rank> const& g, int const* origin, int j, bool queries) {
  int64_t t = 0;
  for (int a = 0; a < Rank; ++a) {
    AxisParams const& A = p.axis[a];
    int const residue = (g.first_token / A.token_stride) % A.spec.extent;
    int64_t const start = queries ? query_box_position(p, g, a, origin[a]) : residue + int64_t(origin[a]) * A.spec.dilation;
    int64_t const pos = start + int64_t(Box::offset(j, a)) * A.spec.dilation;
    EXPECT(pos >= 0, "row %d of a box loads from position %lld < 0 along axis %d", j, (long long)pos, a);
    if (pos >= (queries ? A.q_extent : A.spec.extent)) return -1;
    t += pos * (queries ? A.q_token_stride : A.token_stride);
  }
  return t;
}

template <int Rank, class QBox, class KVBox>
void check_problem(Problem const& prob) {
  NaProblem const& np = prob.p;
  FnaTensors t{};
  Params<Rank> const p = make_box_params<Rank, QBox, KVBox>(np, t, 64, "walk check");
  constexpr int M = QBox::kSize, N = KVBox::kSize;
  int64_t const T = p.tokens, nq = p.q_tokens, E = p.num_extra;
  int const failures_before = failures;

  // Visible pairs by brute force: per query of the range's grid its keys (the same for every head).
  std::vector<std::vector<int64_t>> keys_of(nq);
  for (int64_t x = 0; x < nq; ++x) {
    for (int64_t y = 0; y < T; ++y) {
      if (spec_sees(np, key_grid_token(np, x), y)) keys_of[x].push_back(y);
    }
  }
  // Added pairs: (head, query of the range, key) -> count; additional keys as key T + e.
  std::vector<std::map<int64_t, int>> added(int64_t(p.heads) * nq);

  int64_t kv_tiles = 1;
  for (int a = 0; a < Rank; ++a) kv_tiles *= int64_t(p.axis[a].kv_tiles) * p.axis[a].spec.dilation;
  int64_t const grid_x = kv_tiles + (E + N - 1) / N;
  for (int hk = 0; hk < p.heads_kv; ++hk) {
    for (int64_t bx = 0; bx < grid_x; ++bx) {
      blockIdx.x = unsigned(bx);
      blockIdx.y = unsigned(hk);
      blockIdx.z = 0;
      KeyBoxCta<Rank, QBox, KVBox> cta{};
      if (!cta.init(p)) continue;  // the kernel returns: its box must hold no real key
      // Key table (consumers' prologue) and the TMA rows of K/V.
      natten::sm90::KeyTable<Rank, N> keys{};
      int64_t key_id[N];  // token, T + e for an additional key, -1 for a zero-filled row
      for (int r = 0; r < N; ++r) {
        int first[Rank], last[Rank];
        cta.key_queries(p, r, first, last);
        for (int a = 0; a < Rank; ++a) {
          keys.first[a][r] = first[a];
          keys.last[a][r] = last[a];
        }
        int64_t const row = cta.key_row(p, r);
        if (cta.extra_first < 0) {
          int64_t const tok = tma_row_token<Rank, KVBox>(p, cta.g, cta.k_origin, r, false);
          key_id[r] = tok;
          EXPECT((tok < 0) == (row < 0), "key row %d: TMA token %lld but key_row %lld", r, (long long)tok,
                 (long long)row);
          if (tok >= 0) EXPECT(row == tok * p.heads_kv + hk, "key row %d: key_row %lld, token %lld", r,
                               (long long)row, (long long)tok);
        } else {
          int64_t const e = cta.extra_first + r;
          key_id[r] = e < E ? T + e : -1;
          EXPECT((row < 0) == (e >= E), "extra key %d: key_row %lld", r, (long long)row);
        }
      }
      for (int s = 0; s < cta.steps; ++s) {
        QueryStep<Rank> const qs = cta.step(p, s);
        // Table warp.
        int token[M];
        for (int j = 0; j < M; ++j) {
          token[j] = box_query_token<Rank, QBox>(p, qs.g, qs.origin, j);
          int64_t const tok = tma_row_token<Rank, QBox>(p, qs.g, qs.origin, j, true);
          EXPECT(tok == token[j], "query row %d: TMA token %lld, table %d", j, (long long)tok, token[j]);
        }
        // Consumers: the mask of every thread's elements (256 threads, two warpgroups of 64 keys;
        // the accumulator layout that tests/cuda/sm90_layout_check.cu checks against CuTe),
        // each (key, query) pair held by exactly one thread.
        std::vector<int> seen(N * M, -1);
        for (int ct = 0; ct < 256; ++ct) {
          int const lane = ct % 32;
          int const key0 = 64 * (ct / 128) + 16 * (ct % 128 / 32) + lane / 4, col0 = 2 * (lane % 4);
          uint32_t w[2];
          natten::sm90::key_row_masks<Rank, QBox, KVBox>(keys, qs.origin, qs.g.q_end, key0, col0, w);
          for (int v = 0; v < M / 2; ++v) {
            int const r = key0 + 8 * natten::sm90::row_half(v), j = col0 + natten::sm90::column_step(v);
            EXPECT(seen[r * M + j] == -1, "pair (key row %d, query row %d) held twice", r, j);
            seen[r * M + j] = (w[natten::sm90::row_half(v)] >> natten::sm90::column_bit(v)) & 1u;
          }
        }
        EXPECT(qs.h / p.group == hk, "step %d: head %d outside KV head %d's group", s, qs.h, hk);
        // Consumers: per element visibility as `probabilities` decides it.
        int visible_pairs = 0;
        for (int r = 0; r < N; ++r) {
          for (int j = 0; j < M; ++j) {
            EXPECT(seen[r * M + j] >= 0, "pair (key row %d, query row %d) held by no thread", r, j);
            bool const visible = qs.full || seen[r * M + j] == 1;
            if (!visible) continue;
            int64_t const q = token[j], k = key_id[r];
            if (q < 0 || k < 0) {
              // Adds nothing (a zero row of Q/dO or K/V, P finite: lse 0, delta 0), but a full step
              // must not have such rows.
              EXPECT(!qs.full, "full step %d has a zero-filled row (query row %d, key row %d)", s, j, r);
              continue;
            }
            ++visible_pairs;
            ++added[int64_t(qs.h) * nq + q][k];
          }
        }
        if (cta.extra_first < 0) {
          EXPECT(visible_pairs > 0, "CTA %lld step %d (head %d) adds no pair", (long long)bx, s, qs.h);
        } else {  // additional keys visit every query box of the range's run of every group: only
                  // those past a run's end (runs of a non-divisible extent differ in length) add nothing
          bool past_end = false;
          for (int a = 0; a < Rank; ++a) past_end = past_end || qs.origin[a] >= qs.g.q_end[a];
          EXPECT((visible_pairs == 0) == past_end, "extra CTA %lld step %d (head %d): %d pairs", (long long)bx, s,
                 qs.h, visible_pairs);
        }
      }
    }
  }
  // Compare.
  for (int h = 0; h < p.heads; ++h) {
    for (int64_t x = 0; x < nq; ++x) {
      auto const& got = added[int64_t(h) * nq + x];
      size_t expected = keys_of[x].size() + size_t(E);
      for (int64_t y : keys_of[x]) {
        auto it = got.find(y);
        int const n = it == got.end() ? 0 : it->second;
        EXPECT(n == 1, "head %d query %lld key %lld added %d times", h, (long long)x, (long long)y, n);
      }
      for (int64_t e = 0; e < E; ++e) {
        auto it = got.find(T + e);
        int const n = it == got.end() ? 0 : it->second;
        EXPECT(n == 1, "head %d query %lld extra key %lld added %d times", h, (long long)x, (long long)e, n);
      }
      EXPECT(got.size() == expected, "head %d query %lld: %zu distinct keys added, %zu visible", h, (long long)x,
             got.size(), expected);
    }
  }
  if (failures != failures_before) std::printf("  in problem %s\n", prob.describe().c_str());
}

template <int Rank, class QBox, class KVBox>
void run(char const* name, std::mt19937& rng, int count, int max_extent) {
  int const before = failures;
  for (int i = 0; i < count; ++i) {
    Problem pr = random_problem<Rank, QBox, KVBox>(rng, max_extent);
    random_range(rng, pr.p);
    check_problem<Rank, QBox, KVBox>(pr);
  }
  std::printf("%-26s %4d problems: %s\n", name, count, failures == before ? "ok" : "VIOLATIONS");
}

// Problems of the harness (tests/cuda/sm90_backward_check.cu) and hand-picked corners.
template <int Rank, class QBox, class KVBox>
void fixed(std::initializer_list<std::vector<int64_t>> cases) {
  for (auto const& c : cases) {  // L, k, s, d, causal per axis, then heads, heads_kv, extra
    Problem pr;
    pr.p.rank = Rank;
    for (int a = 0; a < Rank; ++a) {
      pr.p.axis[a] = AxisSpec{c[5 * a], c[5 * a + 1], c[5 * a + 2], c[5 * a + 3], c[5 * a + 4] != 0};
    }
    pr.p.heads = c[5 * Rank];
    pr.p.heads_kv = c[5 * Rank + 1];
    pr.p.num_extra = c[5 * Rank + 2];
    pr.p.batch = 1;
    pr.p.dim = pr.p.dim_v = 64;
    pr.p.scale = 0.125;
    check_problem<Rank, QBox, KVBox>(pr);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(20260);
  fixed<1, Box<64>, Box<128>>({{500, 65, 1, 1, 0, 2, 2, 0},
                               {300, 64, 1, 1, 0, 2, 2, 0},
                               {777, 33, 8, 1, 0, 2, 2, 0},
                               {600, 31, 1, 2, 0, 2, 2, 0},
                               {515, 100, 1, 1, 1, 2, 2, 0},
                               {400, 40, 5, 2, 1, 2, 2, 0},
                               {256, 17, 1, 1, 0, 4, 1, 77},
                               {333, 48, 16, 1, 0, 2, 1, 200},
                               {1, 1, 1, 1, 0, 1, 1, 0},
                               {129, 1, 1, 1, 1, 1, 1, 130}});
  fixed<2, Box<8, 8>, Box<16, 8>>({{40, 13, 1, 1, 0, 36, 9, 1, 1, 0, 2, 2, 0},
                                   {50, 7, 1, 3, 0, 45, 5, 1, 2, 0, 2, 2, 0},
                                   {30, 6, 2, 1, 1, 30, 6, 2, 1, 1, 2, 2, 0},
                                   {24, 5, 1, 1, 0, 20, 5, 1, 1, 0, 6, 2, 130}});
  fixed<3, Box<4, 4, 4>, Box<4, 4, 8>>({{12, 4, 2, 1, 0, 16, 8, 4, 1, 0, 18, 6, 3, 2, 0, 2, 2, 0},
                                        {8, 4, 1, 1, 0, 10, 4, 2, 1, 1, 12, 6, 3, 1, 1, 2, 2, 0},
                                        {6, 3, 1, 2, 0, 10, 3, 1, 3, 0, 14, 5, 1, 2, 0, 2, 2, 20}});
  std::printf("fixed cases: %s\n", failures == 0 ? "ok" : "VIOLATIONS");
  run<1, Box<64>, Box<128>>("1-D 64/128", rng, 150, 700);
  run<2, Box<8, 8>, Box<16, 8>>("2-D 8x8/16x8", rng, 100, 40);
  run<3, Box<4, 4, 4>, Box<4, 4, 8>>("3-D 4x4x4/4x4x8", rng, 60, 13);
  run<3, Box<2, 4, 8>, Box<2, 8, 8>>("3-D 2x4x8/2x8x8", rng, 40, 13);
  std::printf("%s: %d violations\n", failures == 0 ? "PASS" : "FAIL", failures);
  return failures != 0;
}
