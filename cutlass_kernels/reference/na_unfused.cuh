// Unfused neighbourhood attention, reference CUDA kernels: attn = q.k (+ rpb) over each
// query's window, out = attn.v, and the gradients of both (docs/semantics.md; layouts in
// na_params.h; same window-offset convention as the CPU backend: offset i along an axis
// stands for key group coordinate window.start + i, visible when inside [first, last]).
//
// Query-side work (attn, out, d_attn, dQ) is one warp per (b, query, head) walking the
// window's offsets; key-side gradients (dK, dV) are one warp per (b, key, kv head) walking the
// queries that see the key (inverse window) and the query heads of its group, so no two
// warps write one element. d_rpb sums over batch and tokens: one warp per (slice of the rows,
// head, bias entry) sums its slice in a fixed order, and a last pass adds the slices in order,
// so that every gradient is the same bit for bit on every run.
#pragma once

#include "reference/common.cuh"
#include "reference/kernels.h"

namespace natten::reference {
namespace detail {

template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    na_qk_forward_kernel(Problem<Rank> const P, NaUnfusedTensors const t) {
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, Hkv = P.heads_kv, D = P.dim, kw = P.window;
  int64_t const rows = P.batch * N * H;
  auto const* q = static_cast<T const*>(t.q);
  auto const* k = static_cast<T const*>(t.k);
  auto const* rpb = static_cast<T const*>(t.rpb);
  auto* attn = static_cast<T*>(t.out);
  using A = Acc<T>;

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    int64_t const h = row % H;
    int64_t const x = (row / H) % N;
    int64_t const b = row / (H * N);
    T const* k_head = k + (b * N * Hkv + h / P.group) * D;
    T const* bias = rpb != nullptr ? rpb + h * P.rpb_size : nullptr;
    Row<kPer, A> qr;
    qr.load(q + row * D, D, lane, A(1));
    T* dst = attn + row * kw;
    for_each_offset(P, x, [&](int64_t j, int64_t y, int64_t ri, bool visible) {
      if (!visible) {
        if (lane == 0) store_acc(dst + j, -INFINITY);
        return;
      }
      A s = warp_sum(qr.partial_dot(k_head + y * Hkv * D, D, lane));
      if (lane == 0) {
        if (bias != nullptr) s += to_acc(bias[ri]);
        store_acc(dst + j, s);
      }
    });
  }
}

// dQ = sum_j d_attn[j] k_j over visible offsets.
template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    na_qk_backward_dq_kernel(Problem<Rank> const P, NaUnfusedTensors const t) {
  using A = Acc<T>;
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, Hkv = P.heads_kv, D = P.dim, kw = P.window;
  int64_t const rows = P.batch * N * H;
  auto const* d_attn = static_cast<T const*>(t.d_out);
  auto const* k = static_cast<T const*>(t.k);
  auto* d_q = static_cast<T*>(t.d_q);

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    int64_t const h = row % H;
    int64_t const x = (row / H) % N;
    int64_t const b = row / (H * N);
    T const* k_head = k + (b * N * Hkv + h / P.group) * D;
    T const* g = d_attn + row * kw;
    Row<kPer, A> dq;
    dq.zero();
    for_each_offset(P, x, [&](int64_t j, int64_t y, int64_t, bool visible) {
      if (visible) dq.axpy(to_acc(g[j]), k_head + y * Hkv * D, D, lane);
    });
    dq.store(d_q + row * D, D, lane, A(1));
  }
}

// partial[s, h, ri] = the sum of d_attn over rows (b, x) of slice s at the offset whose bias
// entry is ri (na_qk_backward_rpb_splits). Entry ri is a relative position per axis (key group
// coordinate minus query group coordinate, plus k - 1): the offset is found from it directly.
template <int Rank, typename T>
__global__ void __launch_bounds__(kThreads)
    na_qk_backward_rpb_kernel(Problem<Rank> const P, T const* d_attn, int64_t splits, Acc<T>* partial) {
  using A = Acc<T>;
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, R = P.rpb_size, rows = P.batch * N;
  int64_t const per_split = (rows + splits - 1) / splits;
  for (int64_t item = first_warp(); item < splits * H * R; item += warp_stride()) {
    int64_t const ri = item % R, h = (item / R) % H, s = item / (R * H);
    int64_t rel[Rank];
    int64_t rest = ri;
#pragma unroll
    for (int a = Rank - 1; a >= 0; --a) {
      int64_t const span = 2 * P.axis[a].kernel - 1;
      rel[a] = rest % span - (P.axis[a].kernel - 1);
      rest /= span;
    }
    int64_t const end = (s + 1) * per_split < rows ? (s + 1) * per_split : rows;
    A sum = 0;
    for (int64_t r = s * per_split + lane; r < end; r += 32) {
      OffsetAxis ax[Rank];
      offset_axes(P, r % N, ax);
      int64_t j = 0;
      bool visible = true;
#pragma unroll
      for (int a = 0; a < Rank; ++a) {
        int64_t const yi = ax[a].gi + rel[a], i = yi - ax[a].w.start;
        visible = visible && yi >= ax[a].w.first && yi <= ax[a].w.last && i >= 0 && i < ax[a].kernel;
        j = j * ax[a].kernel + i;
      }
      if (visible) sum += to_acc(d_attn[(r * H + h) * P.window + j]);
    }
    sum = warp_sum(sum);
    if (lane == 0) partial[item] = sum;
  }
}

// partial[i] = sum over s of partial[s * n + i], in slice order; one thread per i (which alone
// reads and writes its entries, so the sum may land in slice 0's place).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_slices_kernel(A* partial, int64_t n, int64_t splits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int64_t w = 0; w < splits; ++w) s += partial[w * n + i];
    partial[i] = s;
  }
}

// The transpose of a window product: dst[y] = sum over the queries x that see key y and the
// heads h of y's group of weights[x, h, j(x, y)] * src[x, h]. It is dK of qk (weights dAttn,
// src q) and dV of av (weights attn, src dO); walking the inverse window needs no atomics.
template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    window_transpose_kernel(Problem<Rank> const P, T const* weights, T const* src, int64_t width,
                            T* dst) {
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, Hkv = P.heads_kv, kw = P.window;
  int64_t const rows = P.batch * N * Hkv;

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    // row = (b * N + y) * Hkv + hk
    int64_t const hk = row % Hkv;
    int64_t const y = (row / Hkv) % N;
    int64_t const b = row / (Hkv * N);
    Row<kPer, Acc<T>> acc;
    acc.zero();
    for_each_query_of_key(P, y, [&](int64_t x, int64_t j) {
      for (int64_t h = hk * P.group; h < (hk + 1) * P.group; ++h) {
        int64_t const q_row = (b * N + x) * H + h;
        acc.axpy(to_acc(weights[q_row * kw + j]), src + q_row * width, width, lane);
      }
    });
    acc.store(dst + row * width, width, lane, Acc<T>(1));
  }
}

template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    na_av_forward_kernel(Problem<Rank> const P, NaUnfusedTensors const t) {
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, Hkv = P.heads_kv, Dv = P.dim_v, kw = P.window;
  int64_t const rows = P.batch * N * H;
  auto const* attn = static_cast<T const*>(t.attn);
  auto const* v = static_cast<T const*>(t.v);
  auto* out = static_cast<T*>(t.out);

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    int64_t const h = row % H;
    int64_t const x = (row / H) % N;
    int64_t const b = row / (H * N);
    T const* v_head = v + (b * N * Hkv + h / P.group) * Dv;
    T const* a = attn + row * kw;
    Row<kPer, Acc<T>> o;
    o.zero();
    // Invisible offsets are skipped, not multiplied: their weights may be -inf or NaN.
    for_each_offset(P, x, [&](int64_t j, int64_t y, int64_t, bool visible) {
      if (visible) o.axpy(to_acc(a[j]), v_head + y * Hkv * Dv, Dv, lane);
    });
    o.store(out + row * Dv, Dv, lane, Acc<T>(1));
  }
}

// d_attn[x, h, j] = dO[x, h] . v[key j] at visible offsets, 0 elsewhere.
template <int Rank, typename T, int kPer>
__global__ void __launch_bounds__(kThreads)
    na_av_backward_dattn_kernel(Problem<Rank> const P, NaUnfusedTensors const t) {
  int const lane = lane_id();
  int64_t const N = P.tokens, H = P.heads, Hkv = P.heads_kv, Dv = P.dim_v, kw = P.window;
  int64_t const rows = P.batch * N * H;
  auto const* d_out = static_cast<T const*>(t.d_out);
  auto const* v = static_cast<T const*>(t.v);
  auto* d_attn = static_cast<T*>(t.d_attn);

  for (int64_t row = first_warp(); row < rows; row += warp_stride()) {
    int64_t const h = row % H;
    int64_t const x = (row / H) % N;
    int64_t const b = row / (H * N);
    T const* v_head = v + (b * N * Hkv + h / P.group) * Dv;
    Row<kPer, Acc<T>> go;
    go.load(d_out + row * Dv, Dv, lane, Acc<T>(1));
    T* dst = d_attn + row * kw;
    for_each_offset(P, x, [&](int64_t j, int64_t y, int64_t, bool visible) {
      if (!visible) {
        if (lane == 0) store_acc(dst + j, Acc<T>(0));
        return;
      }
      Acc<T> const s = warp_sum(go.partial_dot(v_head + y * Hkv * Dv, Dv, lane));
      if (lane == 0) store_acc(dst + j, s);
    });
  }
}

}  // namespace detail

template <int Rank, typename T>
void na_qk_forward(NaProblem const& p, NaUnfusedTensors const& t, cudaStream_t stream) {
  using namespace detail;
  Problem<Rank> const P = make_problem<Rank>(p, "na_qk_forward");
  int64_t const rows = P.batch * P.tokens * P.heads;
  if (rows == 0) return;
  with_row_slots(P.dim, [&](auto slots) {
    constexpr int kPer = decltype(slots)::value;
    na_qk_forward_kernel<Rank, T, kPer><<<grid_blocks(rows), kThreads, 0, stream>>>(P, t);
    check_launch("na_qk_forward_kernel");
  });
}

template <int Rank, typename T>
void na_qk_backward(NaProblem const& p, NaUnfusedTensors const& t, float* rpb_workspace,
                    cudaStream_t stream) {
  using namespace detail;
  Problem<Rank> const P = make_problem<Rank>(p, "na_qk_backward");
  int64_t const q_rows = P.batch * P.tokens * P.heads;
  int64_t const k_rows = P.batch * P.tokens * P.heads_kv;
  if (q_rows == 0) return;
  with_row_slots(P.dim, [&](auto slots) {
    constexpr int kPer = decltype(slots)::value;
    na_qk_backward_dq_kernel<Rank, T, kPer><<<grid_blocks(q_rows), kThreads, 0, stream>>>(P, t);
    check_launch("na_qk_backward_dq_kernel");
    window_transpose_kernel<Rank, T, kPer><<<grid_blocks(k_rows), kThreads, 0, stream>>>(
        P, static_cast<T const*>(t.d_out), static_cast<T const*>(t.q), P.dim,
        static_cast<T*>(t.d_k));
    check_launch("window_transpose_kernel (dK)");
  });
  if (rpb_workspace == nullptr) return;
  using A = Acc<T>;
  A* partial = reinterpret_cast<A*>(rpb_workspace);
  int64_t const splits = na_qk_backward_rpb_splits(p), n = P.heads * P.rpb_size;
  na_qk_backward_rpb_kernel<Rank, T><<<grid_blocks(splits * n), kThreads, 0, stream>>>(
      P, static_cast<T const*>(t.d_out), splits, partial);
  check_launch("na_qk_backward_rpb_kernel");
  if (splits > 1) {
    sum_slices_kernel<A><<<grid_blocks(n, kThreads), kThreads, 0, stream>>>(partial, n, splits);
    check_launch("sum_slices_kernel (d_rpb)");
  }
}

template <int Rank, typename T>
void na_av_forward(NaProblem const& p, NaUnfusedTensors const& t, cudaStream_t stream) {
  using namespace detail;
  Problem<Rank> const P = make_problem<Rank>(p, "na_av_forward");
  int64_t const rows = P.batch * P.tokens * P.heads;
  if (rows == 0) return;
  with_row_slots(P.dim_v, [&](auto slots) {
    constexpr int kPer = decltype(slots)::value;
    na_av_forward_kernel<Rank, T, kPer><<<grid_blocks(rows), kThreads, 0, stream>>>(P, t);
    check_launch("na_av_forward_kernel");
  });
}

template <int Rank, typename T>
void na_av_backward(NaProblem const& p, NaUnfusedTensors const& t, cudaStream_t stream) {
  using namespace detail;
  Problem<Rank> const P = make_problem<Rank>(p, "na_av_backward");
  int64_t const q_rows = P.batch * P.tokens * P.heads;
  int64_t const k_rows = P.batch * P.tokens * P.heads_kv;
  if (q_rows == 0) return;
  with_row_slots(P.dim_v, [&](auto slots) {
    constexpr int kPer = decltype(slots)::value;
    na_av_backward_dattn_kernel<Rank, T, kPer>
        <<<grid_blocks(q_rows), kThreads, 0, stream>>>(P, t);
    check_launch("na_av_backward_dattn_kernel");
    window_transpose_kernel<Rank, T, kPer><<<grid_blocks(k_rows), kThreads, 0, stream>>>(
        P, static_cast<T const*>(t.attn), static_cast<T const*>(t.d_out), P.dim_v,
        static_cast<T*>(t.d_v));
    check_launch("window_transpose_kernel (dV)");
  });
}

}  // namespace natten::reference
