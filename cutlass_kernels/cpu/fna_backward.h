// Fused neighbourhood attention backward on the CPU, in the FlashAttention-2 manner: scores
// and probabilities are recomputed per (query tile, key chunk) from the saved logsumexp, and
// delta = rowsum(dO * O) - dLSE replaces the softmax Jacobian (dLSE/dS = P, so the gradient of
// the logsumexp folds into the same term). dQ of a tile is owned by one worker;
// dK/dV are scattered into per-worker accumulators (each worker owns one kv head of one batch
// and a slice of the query tiles) that are summed in a fixed order at the end, so the result
// is deterministic for a given thread count and no atomics are needed.
#pragma once

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/fna_kernel_common.h"

namespace natten::cpu {

template <int Rank, typename T>
void fna_backward(NaProblem const& p, FnaTensors const& t, CpuTileConfig const& cfg,
                  HostServices const& host) {
  using A = Accum<T>;
  TileGrid<Rank> const grid(p, tile_shape<Rank>(cfg));
  int64_t const n_tiles = grid.num_tiles();
  // dK/dV cover the whole grid (N tokens); q, out, lse, their gradients and d_q only the query
  // range (Nq), whose queries alone contribute.
  int64_t const N = p.tokens(), Nq = p.query_tokens(), E = p.num_extra, D = p.dim, Dv = p.dim_v;
  int64_t const H = p.heads, Hkv = p.heads_kv, group = H / Hkv;
  RowLayout const q_rows{Nq, H, D}, o_rows{Nq, H, Dv}, k_rows{N, Hkv, D}, v_rows{N, Hkv, Dv},
      ek_rows{E, Hkv, D}, ev_rows{E, Hkv, Dv};
  auto const* q = static_cast<T const*>(t.q);
  auto const* k = static_cast<T const*>(t.k);
  auto const* v = static_cast<T const*>(t.v);
  auto const* ek = static_cast<T const*>(t.extra_k);
  auto const* ev = static_cast<T const*>(t.extra_v);
  auto const* out = static_cast<T const*>(t.out);
  auto const* d_out = static_cast<T const*>(t.d_out);
  auto const* lse = static_cast<A const*>(t.lse);
  auto const* d_lse = static_cast<A const*>(t.d_lse);
  A const scale = static_cast<A>(p.scale);

  // Enough workers to occupy every thread twice over, never more than there are tiles.
  int64_t const slices = p.batch * Hkv;
  int64_t const splits =
      std::max<int64_t>(1, std::min(n_tiles, (2 * host.num_threads() + slices - 1) / slices));
  // Per worker: dK [N, D], dV [N, Dv], d_extra_k [E, D], d_extra_v [E, Dv].
  int64_t const acc_size = (N + E) * (D + Dv);
  std::vector<A> acc(slices * splits * acc_size, A(0));

  host.parallel_for(slices * splits, 1, [&](int64_t begin, int64_t end) {
    TileView<Rank> view;
    std::vector<A> qs, go, delta, dq, kc, vc, s, dp, tmp, orow(Dv);
    for (int64_t item = begin; item < end; ++item) {
      int64_t const slice = item / splits, split = item % splits;
      int64_t const b = slice / Hkv, hk = slice % Hkv;
      A* dk_acc = acc.data() + item * acc_size;
      A* dv_acc = dk_acc + N * D;
      A* dek_acc = dv_acc + N * Dv;
      A* dev_acc = dek_acc + E * D;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t tile = split * n_tiles / splits; tile < (split + 1) * n_tiles / splits;
             ++tile) {
          view.build(grid, grid.tile(tile));
          int64_t const nq = view.num_q;
          qs.resize(nq * D);
          go.resize(nq * Dv);
          delta.resize(nq);
          for (int64_t i = 0; i < nq; ++i) {
            int64_t const tok = view.q_token[i];
            load_row(q + q_rows.offset(b, tok, h), D, scale, qs.data() + i * D);
            load_row(d_out + o_rows.offset(b, tok, h), Dv, A(1), go.data() + i * Dv);
            load_row(out + o_rows.offset(b, tok, h), Dv, A(1), orow.data());
            A const sum = row_dot(go.data() + i * Dv, orow.data(), Dv);
            delta[i] = d_lse ? sum - d_lse[(b * Nq + tok) * H + h] : sum;
          }
          dq.assign(nq * D, A(0));

          // Gradients from keys [j0, j0 + c); their dK/dV rows land in dk_dst(j)/dv_dst(j).
          auto backprop = [&](int64_t j0, int64_t c, KeyChunk<A> const& kv, bool masked,
                              auto dk_dst, auto dv_dst) {
            s.resize(nq * c);
            dp.resize(nq * c);
            host.gemm(false, true, nq, c, D, A(1), qs.data(), D, kv.k, kv.ldk, A(0), s.data(), c);
            for (int64_t i = 0; i < nq; ++i) {
              A const row_lse = lse[(b * Nq + view.q_token[i]) * H + h];
              exp_runs(masked ? &view : nullptr, i, j0, c, row_lse, s.data() + i * c);
            }
            // dV = P^T dO
            tmp.resize(c * std::max(D, Dv));
            host.gemm(true, false, c, Dv, nq, A(1), s.data(), c, go.data(), Dv, A(0),
                      tmp.data(), Dv);
            for (int64_t j = 0; j < c; ++j) add_row(tmp.data() + j * Dv, Dv, dv_dst(j0 + j));
            // dS = P * (dO V^T - delta)
            host.gemm(false, true, nq, c, Dv, A(1), go.data(), Dv, kv.v, kv.ldv, A(0), dp.data(),
                      c);
            for (int64_t i = 0; i < nq; ++i) {
              A const* prow = s.data() + i * c;
              A* row = dp.data() + i * c;
              for (int64_t j = 0; j < c; ++j) row[j] = prow[j] * (row[j] - delta[i]);
            }
            // dQ += scale dS K;  dK = dS^T (scale Q)
            host.gemm(false, false, nq, D, c, scale, dp.data(), c, kv.k, kv.ldk, A(1), dq.data(),
                      D);
            host.gemm(true, false, c, D, nq, A(1), dp.data(), c, qs.data(), D, A(0), tmp.data(),
                      D);
            for (int64_t j = 0; j < c; ++j) add_row(tmp.data() + j * D, D, dk_dst(j0 + j));
          };

          for_each_key_chunk<A, T>(
              view.num_k, cfg.kv_chunk, D, Dv,
              [&](int64_t j) {
                int64_t const tok = view.k_token[j];
                return std::make_pair(k + k_rows.offset(b, tok, hk),
                                      v + v_rows.offset(b, tok, hk));
              },
              kc, vc, [&](int64_t j0, int64_t c, KeyChunk<A> const& kv) {
                backprop(
                    j0, c, kv, true, [&](int64_t j) { return dk_acc + view.k_token[j] * D; },
                    [&](int64_t j) { return dv_acc + view.k_token[j] * Dv; });
              });
          for_each_key_chunk<A, T>(
              E, cfg.kv_chunk, D, Dv,
              [&](int64_t j) {
                return std::make_pair(ek + ek_rows.offset(b, j, hk),
                                      ev + ev_rows.offset(b, j, hk));
              },
              kc, vc, [&](int64_t j0, int64_t c, KeyChunk<A> const& kv) {
                backprop(
                    j0, c, kv, false, [&](int64_t j) { return dek_acc + j * D; },
                    [&](int64_t j) { return dev_acc + j * Dv; });
              });

          auto* d_q = static_cast<T*>(t.d_q);
          for (int64_t i = 0; i < nq; ++i) {
            store_row(dq.data() + i * D, D, A(1), d_q + q_rows.offset(b, view.q_token[i], h));
          }
        }
      }
    }
  });

  // Sum the workers of each (batch, kv head) in split order and convert.
  auto* d_k = static_cast<T*>(t.d_k);
  auto* d_v = static_cast<T*>(t.d_v);
  auto* d_ek = static_cast<T*>(t.d_extra_k);
  auto* d_ev = static_cast<T*>(t.d_extra_v);
  host.parallel_for(slices * (N + E), 64, [&](int64_t begin, int64_t end) {
    std::vector<A> sum(std::max(D, Dv));
    for (int64_t r = begin; r < end; ++r) {
      int64_t const slice = r / (N + E), row = r % (N + E);
      int64_t const b = slice / Hkv, hk = slice % Hkv;
      bool const extra = row >= N;
      int64_t const dk_off = extra ? (N * (D + Dv) + (row - N) * D) : row * D;
      int64_t const dv_off = extra ? (N * (D + Dv) + E * D + (row - N) * Dv) : N * D + row * Dv;
      T* dk_row = extra ? d_ek + ek_rows.offset(b, row - N, hk) : d_k + k_rows.offset(b, row, hk);
      T* dv_row = extra ? d_ev + ev_rows.offset(b, row - N, hk) : d_v + v_rows.offset(b, row, hk);
      for (auto [off, width, dst] : {std::make_tuple(dk_off, D, dk_row),
                                     std::make_tuple(dv_off, Dv, dv_row)}) {
        std::fill(sum.begin(), sum.begin() + width, A(0));
        for (int64_t w = 0; w < splits; ++w) {
          add_row(acc.data() + (slice * splits + w) * acc_size + off, width, sum.data());
        }
        store_row(sum.data(), width, A(1), dst);
      }
    }
  });
}

}  // namespace natten::cpu
