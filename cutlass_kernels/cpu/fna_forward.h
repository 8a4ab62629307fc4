// Fused neighbourhood attention forward on the CPU: per (batch, head, query tile), scores of
// the tile against its key box in chunks (one matrix product each), the mask only on rows
// that do not see the whole box, an online softmax, and P.V accumulated by matrix products.
// The N x N score matrix never exists; memory per worker is one tile by one chunk.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/fna_kernel_common.h"

namespace natten::cpu {

template <int Rank, typename T>
void fna_forward(NaProblem const& p, FnaTensors const& t, CpuTileConfig const& cfg,
                 HostServices const& host) {
  using A = Accum<T>;
  TileGrid<Rank> const grid(p, tile_shape<Rank>(cfg));
  int64_t const n_tiles = grid.num_tiles();
  // Keys come from the whole grid (N tokens), queries only from the query range (Nq).
  int64_t const N = p.tokens(), Nq = p.query_tokens(), E = p.num_extra, D = p.dim, Dv = p.dim_v;
  int64_t const H = p.heads, group = p.heads / p.heads_kv;
  RowLayout const q_rows{Nq, H, D}, o_rows{Nq, H, Dv}, k_rows{N, p.heads_kv, D},
      v_rows{N, p.heads_kv, Dv}, ek_rows{E, p.heads_kv, D}, ev_rows{E, p.heads_kv, Dv};
  auto const* q = static_cast<T const*>(t.q);
  auto const* k = static_cast<T const*>(t.k);
  auto const* v = static_cast<T const*>(t.v);
  auto const* ek = static_cast<T const*>(t.extra_k);
  auto const* ev = static_cast<T const*>(t.extra_v);
  auto* out = static_cast<T*>(t.out);
  auto* lse = static_cast<A*>(t.lse);
  A const scale = static_cast<A>(p.scale);

  host.parallel_for(p.batch * H * n_tiles, 1, [&](int64_t begin, int64_t end) {
    TileView<Rank> view;
    std::vector<A> qs, kc, vc, s, o, m, l;
    for (int64_t item = begin; item < end; ++item) {
      int64_t const b = item / (H * n_tiles);
      int64_t const h = (item / n_tiles) % H;
      int64_t const hk = h / group;
      view.build(grid, grid.tile(item % n_tiles));
      int64_t const nq = view.num_q;
      qs.resize(nq * D);
      for (int64_t i = 0; i < nq; ++i) {
        load_row(q + q_rows.offset(b, view.q_token[i], h), D, scale, qs.data() + i * D);
      }
      o.assign(nq * Dv, A(0));
      m.assign(nq, A(-INFINITY));
      l.assign(nq, A(0));

      // Scores of the tile against keys [j0, j0 + c), folded into the running softmax state. `masked` is false for additional keys, which every query sees.
      auto attend = [&](int64_t j0, int64_t c, KeyChunk<A> const& kv, bool masked) {
        s.resize(nq * c);
        host.gemm(false, true, nq, c, D, A(1), qs.data(), D, kv.k, kv.ldk, A(0), s.data(), c);
        TileView<Rank> const* runs = masked ? &view : nullptr;
        for (int64_t i = 0; i < nq; ++i) {
          A* row = s.data() + i * c;
          A mx = -INFINITY;
          for_each_run(runs, i, j0, c, [&](int64_t b, int64_t e) {
            for (int64_t j = b; j < e; ++j) mx = std::max(mx, row[j]);
          });
          if (mx == A(-INFINITY)) {  // the row sees none of these keys
            std::fill(row, row + c, A(0));
            continue;
          }
          mx = std::max(mx, m[i]);
          A const alpha = softmax_exp(m[i] - mx);
          l[i] = l[i] * alpha + exp_runs(runs, i, j0, c, mx, row);
          m[i] = mx;
          if (alpha != A(1)) {
            A* orow = o.data() + i * Dv;
            for (int64_t d = 0; d < Dv; ++d) orow[d] *= alpha;
          }
        }
        host.gemm(false, false, nq, Dv, c, A(1), s.data(), c, kv.v, kv.ldv, A(1), o.data(), Dv);
      };

      for_each_key_chunk<A, T>(
          view.num_k, cfg.kv_chunk, D, Dv,
          [&](int64_t j) {
            int64_t const tok = view.k_token[j];
            return std::make_pair(k + k_rows.offset(b, tok, hk), v + v_rows.offset(b, tok, hk));
          },
          kc, vc, [&](int64_t j0, int64_t c, KeyChunk<A> const& kv) { attend(j0, c, kv, true); });
      for_each_key_chunk<A, T>(
          E, cfg.kv_chunk, D, Dv,
          [&](int64_t j) {
            return std::make_pair(ek + ek_rows.offset(b, j, hk), ev + ev_rows.offset(b, j, hk));
          },
          kc, vc, [&](int64_t j0, int64_t c, KeyChunk<A> const& kv) { attend(j0, c, kv, false); });

      for (int64_t i = 0; i < nq; ++i) {
        int64_t const tok = view.q_token[i];
        store_row(o.data() + i * Dv, Dv, A(1) / l[i], out + o_rows.offset(b, tok, h));
        lse[(b * Nq + tok) * H + h] = m[i] + std::log(l[i]);
      }
    }
  });
}

}  // namespace natten::cpu
