// Unfused neighbourhood attention on the CPU: attn = q.k (+ rpb) over each query's window,
// out = attn.v, and the gradients of both (docs/semantics.md; layouts in na_params.h).
//
// All four ops walk a query's window through one enumeration (WindowTable), so they cannot
// disagree on which key, which bias entry or which visibility an offset stands for.
// Backward ops scatter into key-side gradients without atomics: one work item owns one
// (batch, kv head) slice and loops over the query heads that share it, so items never write
// the same element and every sum is taken in a fixed order (deterministic results).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/na_params.h"
#include "common/na_window.h"
#include "cpu/host_services.h"
#include "cpu/numeric.h"

namespace natten::cpu {
namespace unfused_detail {

// Window of one query coordinate along one axis, in window-offset terms.
struct AxisOffsets {
  int64_t key0;     // key coordinate that offset 0 refers to
  int64_t lo, hi;   // visible offsets (causal windows hide the trailing ones)
  int64_t rpb0;     // rpb index along the axis of offset 0
};

template <int Rank>
class WindowTable {
 public:
  // Windows depend on one coordinate per axis only, so one table of `extent` entries per
  // axis replaces a window computation per query.
  explicit WindowTable(NaProblem const& p) {
    for (int a = 0; a < Rank; ++a) {
      AxisSpec const& spec = p.axis[a];
      Axis& ax = axis_[a];
      ax.extent = spec.extent;
      ax.kernel = spec.kernel;
      ax.dilation = spec.dilation;
      ax.at.resize(spec.extent);
      for (int64_t x = 0; x < spec.extent; ++x) {
        int64_t const r = x % spec.dilation;
        int64_t const xi = x / spec.dilation;
        AxisWindow const w = axis_window(spec, group_length(spec, r), xi);
        ax.at[x] = {w.start * spec.dilation + r, w.first - w.start, w.last - w.start,
                    w.start - xi + spec.kernel - 1};
      }
    }
  }

  // Calls f(j, key_token, rpb_index, visible) for every window offset j of query token
  // `token`, j in row-major order over per-axis offsets (the attn layout).
  template <typename F>
  void for_each_offset(int64_t token, F&& f) const {
    AxisOffsets const* w[Rank];
    for (int a = Rank - 1; a >= 0; --a) {
      w[a] = &axis_[a].at[token % axis_[a].extent];
      token /= axis_[a].extent;
    }
    visit<0>(w, f, 0, 0, 0, true);
  }

 private:
  struct Axis {
    int64_t extent, kernel, dilation;
    std::vector<AxisOffsets> at;
  };

  template <int A, typename F>
  void visit(AxisOffsets const* const* w, F& f, int64_t j, int64_t key, int64_t rpb,
             bool visible) const {
    if constexpr (A == Rank) {
      f(j, key, rpb, visible);
    } else {
      Axis const& ax = axis_[A];
      AxisOffsets const& o = *w[A];
      for (int64_t i = 0; i < ax.kernel; ++i) {
        visit<A + 1>(w, f, j * ax.kernel + i, key * ax.extent + o.key0 + i * ax.dilation,
                     rpb * (2 * ax.kernel - 1) + o.rpb0 + i, visible && i >= o.lo && i <= o.hi);
      }
    }
  }

  Axis axis_[Rank];
};

// Read-only tensor in the accumulation type. Half/BFloat16 inputs are converted once up front:
// each element is read by many windows, and plain float rows let the inner loops vectorize.
template <typename T>
class AccumInput {
 public:
  using A = Accum<T>;
  AccumInput(void const* data, int64_t n, HostServices const& host) {
    if constexpr (std::is_same_v<T, A>) {
      data_ = static_cast<T const*>(data);
    } else {
      T const* src = static_cast<T const*>(data);
      copy_.resize(n);
      host.parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) copy_[i] = to_accum<A>(src[i]);
      });
      data_ = copy_.data();
    }
  }
  A const* data() const { return data_; }

 private:
  std::vector<A> copy_;
  A const* data_ = nullptr;
};

// Independent partial sums give the compiler a reduction it may vectorize without
// -ffast-math, and keep the summation order fixed.
template <typename A>
inline A dot(A const* a, A const* b, int64_t n) {
  constexpr int kLanes = 8;
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  }
  A sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

template <typename A>
inline void axpy(A alpha, A const* x, A* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T, typename A>
inline void store(A const* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_accum<T>(src[i]);
}

// Enough rows per chunk that scheduling overhead stays small next to the work.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_item));
}

// Calls body(b, hkv, scratch) for every (batch, kv head) slice, in parallel; `scratch` is a
// zeroed [tokens, width] buffer private to the slice, for gradients scattered onto keys.
template <typename A, typename F>
void for_each_kv_slice(NaProblem const& p, int64_t width, HostServices const& host, F&& body) {
  host.parallel_for(p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch;
    for (int64_t item = begin; item < end; ++item) {
      scratch.assign(p.tokens() * width, A(0));
      body(item / p.heads_kv, item % p.heads_kv, scratch.data());
    }
  });
}

}  // namespace unfused_detail

template <int Rank, typename T>
void na_qk_forward(NaProblem const& p, NaUnfusedTensors const& t, HostServices const& host) {
  using namespace unfused_detail;
  using A = Accum<T>;
  int64_t const n = p.tokens(), h_count = p.heads, d = p.dim, kw = p.window_size();
  int64_t const group = p.heads / p.heads_kv, rpb_size = p.rpb_size();
  WindowTable<Rank> const win(p);
  AccumInput<T> const q(t.q, p.batch * n * h_count * d, host);
  AccumInput<T> const k(t.k, p.batch * n * p.heads_kv * d, host);
  AccumInput<T> const rpb(t.rpb, t.rpb ? h_count * rpb_size : 0, host);
  T* attn = static_cast<T*>(t.out);
  T const minus_inf = from_accum<T>(-std::numeric_limits<A>::infinity());

  host.parallel_for(p.batch * n, grain_for(h_count * kw * d), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int64_t const b = row / n;
      for (int64_t h = 0; h < h_count; ++h) {
        A const* q_row = q.data() + (row * h_count + h) * d;
        A const* k_head = k.data() + (b * n * p.heads_kv + h / group) * d;
        A const* bias = t.rpb ? rpb.data() + h * rpb_size : nullptr;
        T* out = attn + (row * h_count + h) * kw;
        win.for_each_offset(row % n, [&](int64_t j, int64_t key, int64_t ri, bool visible) {
          if (!visible) {
            out[j] = minus_inf;
            return;
          }
          A s = dot(q_row, k_head + key * p.heads_kv * d, d);
          if (bias) s += bias[ri];
          out[j] = from_accum<T>(s);
        });
      }
    }
  });
}

template <int Rank, typename T>
void na_qk_backward(NaProblem const& p, NaUnfusedTensors const& t, HostServices const& host) {
  using namespace unfused_detail;
  using A = Accum<T>;
  int64_t const n = p.tokens(), h_count = p.heads, hkv_count = p.heads_kv, d = p.dim;
  int64_t const kw = p.window_size(), group = h_count / hkv_count, rpb_size = p.rpb_size();
  WindowTable<Rank> const win(p);
  AccumInput<T> const d_attn(t.d_out, p.batch * n * h_count * kw, host);
  AccumInput<T> const q(t.q, p.batch * n * h_count * d, host);
  AccumInput<T> const k(t.k, p.batch * n * hkv_count * d, host);
  T* d_q = static_cast<T*>(t.d_q);
  T* d_k = static_cast<T*>(t.d_k);
  // Per-batch partials of d_rpb, [B, H, rpb]: each slice owns the rows of its heads.
  std::vector<A> rpb_part(t.d_rpb ? p.batch * h_count * rpb_size : 0, A(0));

  for_each_kv_slice<A>(p, d, host, [&](int64_t b, int64_t hkv, A* dk_acc) {
    std::vector<A> dq_acc(d);
    A const* k_head = k.data() + (b * n * hkv_count + hkv) * d;
    for (int64_t x = 0; x < n; ++x) {
      int64_t const row = b * n + x;
      for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
        A const* g = d_attn.data() + (row * h_count + h) * kw;
        A const* q_row = q.data() + (row * h_count + h) * d;
        A* bias_grad = t.d_rpb ? rpb_part.data() + (b * h_count + h) * rpb_size : nullptr;
        std::fill(dq_acc.begin(), dq_acc.end(), A(0));
        win.for_each_offset(x, [&](int64_t j, int64_t key, int64_t ri, bool visible) {
          if (!visible) return;
          axpy(g[j], k_head + key * hkv_count * d, dq_acc.data(), d);
          axpy(g[j], q_row, dk_acc + key * d, d);
          if (bias_grad) bias_grad[ri] += g[j];
        });
        store(dq_acc.data(), d_q + (row * h_count + h) * d, d);
      }
    }
    for (int64_t y = 0; y < n; ++y) {
      store(dk_acc + y * d, d_k + ((b * n + y) * hkv_count + hkv) * d, d);
    }
  });

  if (t.d_rpb) {
    T* d_rpb = static_cast<T*>(t.d_rpb);
    int64_t const size = h_count * rpb_size;
    host.parallel_for(size, grain_for(p.batch), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        A sum = 0;
        for (int64_t b = 0; b < p.batch; ++b) sum += rpb_part[b * size + i];
        d_rpb[i] = from_accum<T>(sum);
      }
    });
  }
}

template <int Rank, typename T>
void na_av_forward(NaProblem const& p, NaUnfusedTensors const& t, HostServices const& host) {
  using namespace unfused_detail;
  using A = Accum<T>;
  int64_t const n = p.tokens(), h_count = p.heads, dv = p.dim_v, kw = p.window_size();
  int64_t const group = p.heads / p.heads_kv;
  WindowTable<Rank> const win(p);
  AccumInput<T> const attn(t.attn, p.batch * n * h_count * kw, host);
  AccumInput<T> const v(t.v, p.batch * n * p.heads_kv * dv, host);
  T* out = static_cast<T*>(t.out);

  host.parallel_for(p.batch * n, grain_for(h_count * kw * dv), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(dv);
    for (int64_t row = begin; row < end; ++row) {
      int64_t const b = row / n;
      for (int64_t h = 0; h < h_count; ++h) {
        A const* a = attn.data() + (row * h_count + h) * kw;
        A const* v_head = v.data() + (b * n * p.heads_kv + h / group) * dv;
        std::fill(acc.begin(), acc.end(), A(0));
        // Invisible offsets are skipped, not multiplied: their weights may be -inf or NaN.
        win.for_each_offset(row % n, [&](int64_t j, int64_t key, int64_t, bool visible) {
          if (visible) axpy(a[j], v_head + key * p.heads_kv * dv, acc.data(), dv);
        });
        store(acc.data(), out + (row * h_count + h) * dv, dv);
      }
    }
  });
}

template <int Rank, typename T>
void na_av_backward(NaProblem const& p, NaUnfusedTensors const& t, HostServices const& host) {
  using namespace unfused_detail;
  using A = Accum<T>;
  int64_t const n = p.tokens(), h_count = p.heads, hkv_count = p.heads_kv, dv = p.dim_v;
  int64_t const kw = p.window_size(), group = h_count / hkv_count;
  WindowTable<Rank> const win(p);
  AccumInput<T> const d_out(t.d_out, p.batch * n * h_count * dv, host);
  AccumInput<T> const attn(t.attn, p.batch * n * h_count * kw, host);
  AccumInput<T> const v(t.v, p.batch * n * hkv_count * dv, host);
  T* d_attn = static_cast<T*>(t.d_attn);
  T* d_v = static_cast<T*>(t.d_v);

  for_each_kv_slice<A>(p, dv, host, [&](int64_t b, int64_t hkv, A* dv_acc) {
    A const* v_head = v.data() + (b * n * hkv_count + hkv) * dv;
    for (int64_t x = 0; x < n; ++x) {
      int64_t const row = b * n + x;
      for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
        A const* g = d_out.data() + (row * h_count + h) * dv;
        A const* a = attn.data() + (row * h_count + h) * kw;
        T* da = d_attn + (row * h_count + h) * kw;
        win.for_each_offset(x, [&](int64_t j, int64_t key, int64_t, bool visible) {
          if (!visible) {
            da[j] = from_accum<T>(A(0));
            return;
          }
          da[j] = from_accum<T>(dot(g, v_head + key * hkv_count * dv, dv));
          axpy(a[j], g, dv_acc + key * dv, dv);
        });
      }
    }
    for (int64_t y = 0; y < n; ++y) {
      store(dv_acc + y * dv, d_v + ((b * n + y) * hkv_count + hkv) * dv, dv);
    }
  });
}

}  // namespace natten::cpu
