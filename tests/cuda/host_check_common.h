// What the host-side walk/mask checks of the tiled kernels share (sm90_backward_walk_check.cpp,
// sm90_forward_mask_check.cpp, sm80_query_range_walk_check.cpp): violation counting,
// docs/semantics.md by brute force, and random problems within the TMA limits of a pair of boxes,
// with random query ranges. Include after common/tile_geometry.cuh with
// the CUDA qualifiers defined away.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>

namespace natten::host_check {

inline int failures = 0;
inline int reported = 0;
#define EXPECT(cond, ...)                      \
  do {                                         \
    if (!(cond)) {                             \
      ++failures;                              \
      if (reported++ < 20) {                   \
        std::printf("  violation: " __VA_ARGS__); \
        std::printf("\n");                     \
      }                                        \
    }                                          \
  } while (0)

struct Problem {
  NaProblem p;
  std::string describe() const {
    std::string s = "rank " + std::to_string(p.rank) + ":";
    for (int a = 0; a < p.rank; ++a) {
      auto const& x = p.axis[a];
      s += " [L" + std::to_string(x.extent) + " k" + std::to_string(x.kernel) + " s" + std::to_string(x.stride) +
           " d" + std::to_string(x.dilation) + (x.causal ? " causal" : "") + "]";
    }
    for (int a = 0; a < p.rank; ++a) {
      if (p.q_extent[a] != NaProblem::kWholeAxis) {
        s += " queries" + std::to_string(a) + " [" + std::to_string(p.q_offset[a]) + ", " +
             std::to_string(p.q_offset[a] + p.q_extent[a]) + ")";
      }
    }
    s += " H" + std::to_string(p.heads) + "/" + std::to_string(p.heads_kv) + " E" + std::to_string(p.num_extra);
    return s;
  }
};

// docs/semantics.md: does query token x see key token y (flat, row-major)?
inline bool spec_sees(NaProblem const& p, int64_t x, int64_t y) {
  for (int a = p.rank - 1; a >= 0; --a) {
    AxisSpec const& ax = p.axis[a];
    int64_t const cx = x % ax.extent, cy = y % ax.extent;
    x /= ax.extent;
    y /= ax.extent;
    if (cx % ax.dilation != cy % ax.dilation) return false;
    int64_t const r = cx % ax.dilation;
    auto const w = axis_window(ax, group_length(ax, r), cx / ax.dilation);
    int64_t const yi = cy / ax.dilation;
    if (yi < w.first || yi > w.last) return false;
  }
  return true;
}

// Key-grid token of a token of the query range's grid (NaProblem::q_offset).
inline int64_t key_grid_token(NaProblem const& p, int64_t tq) {
  int64_t t = 0, stride = 1;
  for (int a = p.rank - 1; a >= 0; --a) {
    int64_t const e = p.query_extent(a);
    t += (tq % e + p.q_offset[a]) * stride;
    tq /= e;
    stride *= p.axis[a].extent;
  }
  return t;
}

// A random query range per axis: the whole axis a third of the time.
inline void random_range(std::mt19937& rng, NaProblem& p) {
  for (int a = 0; a < p.rank; ++a) {
    int64_t const L = p.axis[a].extent;
    if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) continue;
    int64_t const e = std::uniform_int_distribution<int64_t>(1, L)(rng);
    p.q_extent[a] = e;
    p.q_offset[a] = std::uniform_int_distribution<int64_t>(0, L - e)(rng);
  }
}

// A random valid problem of rank R whose TMA limits (tile extent x dilation <= 256, dilation <= 8)
// hold for the boxes QBox, KVBox; `max_extent` per axis.
template <int Rank, class QBox, class KVBox>
Problem random_problem(std::mt19937& rng, int max_extent) {
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Problem pr;
  NaProblem& p = pr.p;
  p.rank = Rank;
  for (int a = 0; a < Rank; ++a) {
    int const box = std::max(QBox::extent(a), KVBox::extent(a));
    int const d_max = std::min(3, 256 / box);
    int64_t d = uni(1, 4) == 1 ? uni(1, d_max) : 1;
    int64_t L = uni(1, max_extent);
    int64_t k = uni(1, std::max<int64_t>(1, std::min<int64_t>(L / d, max_extent / 2)));
    if (k * d > L) d = 1;
    k = std::min<int64_t>(k, L / d);
    int64_t s = uni(1, 3) == 1 ? uni(1, int(k)) : 1;
    p.axis[a] = AxisSpec{L, k, s, d, uni(0, 2) == 0};
  }
  p.heads_kv = uni(1, 2);
  p.heads = p.heads_kv * uni(1, 3);
  p.batch = 1;
  p.dim = p.dim_v = 64;
  p.num_extra = uni(0, 3) == 0 ? uni(1, 300) : 0;
  p.scale = 0.125;
  return pr;
}

}  // namespace natten::host_check
