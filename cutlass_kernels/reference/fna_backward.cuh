// Fused neighbourhood attention backward, reference CUDA kernels, in the FlashAttention-2
// manner: probabilities recomputed from the saved lse, p = exp(scale q.k - lse), and
// delta = rowsum(dO * O) - dLSE in place of the softmax Jacobian (as the CPU backend does).
//
//   1. delta  [B, N, H] into the workspace: one warp per (b, query, head).
//   2. dQ:    one warp per (b, query, head) over the query's window and the additional keys;
//             dQ = scale * sum dS k, dS = p (dO.v - delta).
//   3. dK/dV: one warp per (b, key, kv head) over the queries whose windows hold the key
//             (inverse window, product over axes) and the query heads of its group;
//             dV = sum p dO, dK = sum dS (scale q). Keys no query sees get 0.
//   4. additional dK/dV: one warp per (slice of queries, b, extra key, kv head) over every
//             query of the slice (each sees every extra key); with several slices the
//             partial sums go to the workspace and a last pass adds them in slice order.
// No atomics: every output element has exactly one writer, and all sums run in a fixed
// order, so results are deterministic.
#pragma once

#include "reference/common.cuh"

namespace natten::reference {
namespace detail {

template <int Rank, typename T>
__global__ void __launch_bounds__(kThreads)
    fna_backward_delta_kernel(Problem<Rank> const P, FnaTensors const t, Acc<T>* delta) {
  using A = Acc<T>;
  int const lane = lane_id();
  int64_t const Dv = P.dim_v;
  int64_t const rows = P.batch * P.tokens * P.heads;
  auto const* out = static_cast<T const*>(t.out);
  auto const* d_out = static_cast<T const*>(t.d_out);
  auto const* d_lse = static_cast<A const*>(t.d_lse);
  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    A s = A(0);
    for (int64_t c = lane; c < Dv; c += kWarpSize) {
      s += to_acc(out[row * Dv + c]) * to_acc(d_out[row * Dv + c]);
    }
    s = warp_sum(s);
    if (lane == 0) delta[row] = d_lse != nullptr ? s - d_lse[row] : s;
  }
}

template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    fna_backward_dq_kernel(Problem<Rank> const P, FnaTensors const t, Acc<T> const* delta) {
  using A = Acc<T>;
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, Hkv = P.heads_kv, E = P.num_extra;
  int64_t const D = P.dim, Dv = P.dim_v;
  int64_t const rows = P.batch * N * H;
  auto const* q = static_cast<T const*>(t.q);
  auto const* k = static_cast<T const*>(t.k);
  auto const* v = static_cast<T const*>(t.v);
  auto const* ek = static_cast<T const*>(t.extra_k);
  auto const* ev = static_cast<T const*>(t.extra_v);
  auto const* d_out = static_cast<T const*>(t.d_out);
  auto const* lse = static_cast<A const*>(t.lse);
  auto* d_q = static_cast<T*>(t.d_q);
  A const scale = static_cast<A>(P.scale);

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    int64_t const h = row % H;
    int64_t const x = (row / H) % N;
    int64_t const b = row / (H * N);
    int64_t const hk = h / P.group;
    Row<kPer, A> qs, go, dq;
    qs.load(q + row * D, D, lane, scale);
    go.load(d_out + row * Dv, Dv, lane, A(1));
    dq.zero();
    A const row_lse = lse[row];
    A const row_delta = delta[row];

    auto backprop = [&](T const* k_row, T const* v_row) {
      A s = qs.partial_dot(k_row, D, lane);
      A dp = go.partial_dot(v_row, Dv, lane);
      warp_sum2(s, dp);
      A const pr = acc_exp(s - row_lse);
      dq.axpy(pr * (dp - row_delta), k_row, D, lane);
    };

    T const* k_head = k + (b * N * Hkv + hk) * D;
    T const* v_head = v + (b * N * Hkv + hk) * Dv;
    Run runs[Rank];
    window_runs(P, x, runs);
    for_each_token(runs,
                   [&](int64_t y) { backprop(k_head + y * Hkv * D, v_head + y * Hkv * Dv); });
    if (E > 0) {
      T const* ek_head = ek + (b * E * Hkv + hk) * D;
      T const* ev_head = ev + (b * E * Hkv + hk) * Dv;
      for (int64_t e = 0; e < E; ++e) backprop(ek_head + e * Hkv * D, ev_head + e * Hkv * Dv);
    }
    dq.store(d_q + row * D, D, lane, scale);
  }
}

// dK, dV of one key row held in registers, accumulated query by query (every query head of
// the key's kv head): dV += p dO, dK += dS (scale q).
template <typename T, int kPer>
struct KeyGrad {
  using A = Acc<T>;
  T const* q;
  T const* d_out;
  A const* lse;
  A const* delta;
  int64_t tokens, heads, group, dim, dim_v;
  A scale;
  int lane;
  Row<kPer, A> k, v, dk, dv;

  template <int Rank>
  __device__ __forceinline__ KeyGrad(Problem<Rank> const& P, FnaTensors const& t,
                                     A const* delta_)
      : q(static_cast<T const*>(t.q)),
        d_out(static_cast<T const*>(t.d_out)),
        lse(static_cast<A const*>(t.lse)),
        delta(delta_),
        tokens(P.tokens),
        heads(P.heads),
        group(P.group),
        dim(P.dim),
        dim_v(P.dim_v),
        scale(static_cast<A>(P.scale)),
        lane(lane_id()) {}

  __device__ __forceinline__ void begin(T const* k_row, T const* v_row) {
    k.load(k_row, dim, lane, A(1));
    v.load(v_row, dim_v, lane, A(1));
    dk.zero();
    dv.zero();
  }

  // Adds the pairs of query token x (batch b) with the query heads of kv head hk.
  __device__ __forceinline__ void add_query(int64_t b, int64_t x, int64_t hk) {
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      int64_t const row = (b * tokens + x) * heads + h;
      Row<kPer, A> qs, go;
      qs.load(q + row * dim, dim, lane, scale);
      go.load(d_out + row * dim_v, dim_v, lane, A(1));
      A s = qs.partial_dot(k);
      A dp = go.partial_dot(v);
      warp_sum2(s, dp);
      A const pr = acc_exp(s - lse[row]);
      dv.axpy(pr, go);
      dk.axpy(pr * (dp - delta[row]), qs);
    }
  }
};

template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    fna_backward_dkdv_kernel(Problem<Rank> const P, FnaTensors const t, Acc<T> const* delta) {
  int64_t const N = P.tokens, Hkv = P.heads_kv, D = P.dim, Dv = P.dim_v;
  int64_t const rows = P.batch * N * Hkv;
  auto const* k = static_cast<T const*>(t.k);
  auto const* v = static_cast<T const*>(t.v);
  auto* d_k = static_cast<T*>(t.d_k);
  auto* d_v = static_cast<T*>(t.d_v);
  KeyGrad<T, kPer> g(P, t, delta);

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    // row = (b * N + y) * Hkv + hk
    int64_t const hk = row % Hkv;
    int64_t const y = (row / Hkv) % N;
    int64_t const b = row / (Hkv * N);
    g.begin(k + row * D, v + row * Dv);
    Run runs[Rank];
    inverse_runs(P, y, runs);
    for_each_token(runs, [&](int64_t x) { g.add_query(b, x, hk); });
    g.dk.store(d_k + row * D, D, g.lane, Acc<T>(1));
    g.dv.store(d_v + row * Dv, Dv, g.lane, Acc<T>(1));
  }
}

// Additional keys: warp item = ((split * B + b) * E + e) * Hkv + hk over queries
// [split * N / splits, (split + 1) * N / splits). With one split the result is stored
// directly; otherwise as partials of the accumulation type, row item of
// [splits, B, E, Hkv, D + Dv].
template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    fna_backward_extra_kernel(Problem<Rank> const P, FnaTensors const t, Acc<T> const* delta,
                              int64_t splits, Acc<T>* partial) {
  using A = Acc<T>;
  int64_t const N = P.tokens, Hkv = P.heads_kv, E = P.num_extra, D = P.dim, Dv = P.dim_v;
  int64_t const rows = P.batch * E * Hkv;  // rows of one split: (b * E + e) * Hkv + hk
  int64_t const items = splits * rows;
  auto const* ek = static_cast<T const*>(t.extra_k);
  auto const* ev = static_cast<T const*>(t.extra_v);
  auto* d_ek = static_cast<T*>(t.d_extra_k);
  auto* d_ev = static_cast<T*>(t.d_extra_v);
  KeyGrad<T, kPer> g(P, t, delta);

  for (int64_t item = first_warp(); item < items; item += warp_stride()) {
    int64_t const row = item % rows;
    int64_t const split = item / rows;
    int64_t const hk = row % Hkv;
    int64_t const b = row / (Hkv * E);
    g.begin(ek + row * D, ev + row * Dv);
    int64_t const x_end = (split + 1) * N / splits;
    for (int64_t x = split * N / splits; x < x_end; ++x) g.add_query(b, x, hk);
    if (partial == nullptr) {
      g.dk.store(d_ek + row * D, D, g.lane, A(1));
      g.dv.store(d_ev + row * Dv, Dv, g.lane, A(1));
    } else {
      A* dst = partial + item * (D + Dv);
      g.dk.store(dst, D, g.lane, A(1));
      g.dv.store(dst + D, Dv, g.lane, A(1));
    }
  }
}

// Sums the partials of the additional keys over the splits, in split order; one thread per
// element of [B, E, Hkv, D + Dv].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fna_backward_extra_reduce_kernel(int64_t rows, int64_t D, int64_t Dv, int64_t splits,
                                     Acc<T> const* partial, T* d_ek, T* d_ev) {
  int64_t const width = D + Dv;
  int64_t const total = rows * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc<T> s = 0;
    for (int64_t w = 0; w < splits; ++w) s += partial[w * total + i];
    int64_t const row = i / width, c = i % width;
    if (c < D) {
      store_acc(d_ek + row * D + c, s);
    } else {
      store_acc(d_ev + row * Dv + (c - D), s);
    }
  }
}

}  // namespace detail

template <int Rank, typename T>
void fna_backward(NaProblem const& p, FnaTensors const& t, float* workspace,
                  cudaStream_t stream) {
  using namespace detail;
  Problem<Rank> const P = make_problem<Rank>(p, "fna_backward");
  int64_t const q_rows = P.batch * P.tokens * P.heads;
  int64_t const k_rows = P.batch * P.tokens * P.heads_kv;
  int64_t const e_rows = P.batch * P.num_extra * P.heads_kv;
  if (q_rows == 0) return;
  auto* delta = reinterpret_cast<Acc<T>*>(workspace);
  int64_t const splits = fna_backward_extra_splits(p);
  Acc<T>* partial = splits > 1 ? delta + q_rows : nullptr;

  fna_backward_delta_kernel<Rank, T><<<grid_blocks(q_rows), kThreads, 0, stream>>>(P, t, delta);
  check_launch("fna_backward_delta_kernel");
  with_row_slots(std::max(P.dim, P.dim_v), [&](auto slots) {
    constexpr int kPer = decltype(slots)::value;
    fna_backward_dq_kernel<Rank, T, kPer>
        <<<grid_blocks(q_rows), kThreads, 0, stream>>>(P, t, delta);
    check_launch("fna_backward_dq_kernel");
    fna_backward_dkdv_kernel<Rank, T, kPer>
        <<<grid_blocks(k_rows), kThreads, 0, stream>>>(P, t, delta);
    check_launch("fna_backward_dkdv_kernel");
    if (e_rows > 0) {
      fna_backward_extra_kernel<Rank, T, kPer>
          <<<grid_blocks(splits * e_rows), kThreads, 0, stream>>>(P, t, delta, splits, partial);
      check_launch("fna_backward_extra_kernel");
    }
  });
  if (e_rows > 0 && splits > 1) {
    fna_backward_extra_reduce_kernel<T>
        <<<grid_blocks(e_rows * (P.dim + P.dim_v), kThreads), kThreads, 0, stream>>>(
            e_rows, P.dim, P.dim_v, splits, partial, static_cast<T*>(t.d_extra_k),
            static_cast<T*>(t.d_extra_v));
    check_launch("fna_backward_extra_reduce_kernel");
  }
}

}  // namespace natten::reference
