// Fused neighbourhood attention forward, reference CUDA kernel: one warp per (batch, query,
// head), lanes split the head dims; an online softmax in the accumulation type over the
// query's window keys and then the additional keys; out = P.V / rowsum(P),
// lse = max + log(rowsum).
#pragma once

#include "reference/common.cuh"

namespace natten::reference {
namespace detail {

template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    fna_forward_kernel(Problem<Rank> const P, FnaTensors const t) {
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, Hkv = P.heads_kv, E = P.num_extra;
  int64_t const D = P.dim, Dv = P.dim_v;
  int64_t const rows = P.batch * N * H;
  auto const* q = static_cast<T const*>(t.q);
  auto const* k = static_cast<T const*>(t.k);
  auto const* v = static_cast<T const*>(t.v);
  auto const* ek = static_cast<T const*>(t.extra_k);
  auto const* ev = static_cast<T const*>(t.extra_v);
  auto* out = static_cast<T*>(t.out);
  using A = Acc<T>;
  auto* lse = static_cast<A*>(t.lse);

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    // row = (b * N + x) * H + h
    int64_t const h = row % H;
    int64_t const x = (row / H) % N;
    int64_t const b = row / (H * N);
    int64_t const hk = h / P.group;

    Row<kPer, A> qs;
    qs.load(q + row * D, D, lane, static_cast<A>(P.scale));
    Row<kPer, A> o;
    o.zero();
    A m = -INFINITY, l = A(0);

    auto attend = [&](T const* k_row, T const* v_row) {
      A const s = warp_sum(qs.partial_dot(k_row, D, lane));
      A const m_new = acc_max(m, s);
      A const alpha = acc_exp(m - m_new);  // 0 for the first key (m = -inf)
      A const pr = acc_exp(s - m_new);
      l = l * alpha + pr;
      m = m_new;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        int64_t const c = lane + int64_t{kWarpSize} * j;
        o.v[j] = o.v[j] * alpha + (c < Dv ? pr * to_acc(v_row[c]) : A(0));
      }
    };

    // Key token y of this batch and kv head: row (b * N + y) * Hkv + hk.
    T const* k_head = k + (b * N * Hkv + hk) * D;
    T const* v_head = v + (b * N * Hkv + hk) * Dv;
    Run runs[Rank];
    window_runs(P, x, runs);
    for_each_token(runs, [&](int64_t y) { attend(k_head + y * Hkv * D, v_head + y * Hkv * Dv); });

    if (E > 0) {
      T const* ek_head = ek + (b * E * Hkv + hk) * D;
      T const* ev_head = ev + (b * E * Hkv + hk) * Dv;
      for (int64_t e = 0; e < E; ++e) attend(ek_head + e * Hkv * D, ev_head + e * Hkv * Dv);
    }

    // Every query sees at least itself, so l >= 1.
    o.store(out + row * Dv, Dv, lane, A(1) / l);
    if (lane == 0) lse[row] = m + acc_log(l);
  }
}

}  // namespace detail

template <int Rank, typename T>
void fna_forward(NaProblem const& p, FnaTensors const& t, cudaStream_t stream) {
  using namespace detail;
  Problem<Rank> const P = make_problem<Rank>(p, "fna_forward");
  int64_t const rows = P.batch * P.tokens * P.heads;
  if (rows == 0) return;
  with_row_slots(std::max(P.dim, P.dim_v), [&](auto slots) {
    constexpr int kPer = decltype(slots)::value;
    fna_forward_kernel<Rank, T, kPer><<<grid_blocks(rows), kThreads, 0, stream>>>(P, t);
    check_launch("fna_forward_kernel");
  });
}

}  // namespace natten::reference
