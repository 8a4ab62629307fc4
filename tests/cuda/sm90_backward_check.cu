// Standalone check of the SM90 backward (no torch): small problems against a float64 CPU
// evaluation of docs/semantics.md and its gradients (window arithmetic from common/na_window.h),
// then timings of the benchmark problems P1-P3. Built by `tests/cuda/run_sm90_check.sh backward` as
// several translation units of this one file: NATTEN_PART 0 is the harness, parts 1-4 hold the
// instantiations listed once in NATTEN_INSTANCES below (compiled in parallel).
//
//   sm90_backward_check [--checks] [--timings] [--quick] [--family F] [--self-test]
// (default: checks and timings of every family; --quick: one check per instance; --self-test:
// only the host-side self-test of the float64 reference, no GPU needed, which the checks also
// run first)
// The kernel gets O and LSE from the float64 forward (rounded to the element type and float32),
// so a failure points at the backward alone. Exit status non-zero when any check fails.
#include <tuple>

#include "sm90_harness.cuh"
#include "sm90/bwd_params.h"
#include "sm90/kernels.h"

namespace natten::sm90 {
template <int Rank, typename Element, int HeadDim, class QTile, class KVTile>
void run_fna_backward(NaProblem const&, FnaTensors const&, float*, cudaStream_t);
#if NATTEN_PART == 0
template <int Rank_, class Element_, int HeadDim, class QTile_, class KVTile_, DqPath kDq_>
struct BackwardConfig;
template <class Config, typename T>
void run_backward(NaProblem const&, FnaTensors const&, float*, cudaStream_t);
#endif
}  // namespace natten::sm90
namespace natten::sm80 {
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_backward(NaProblem const&, FnaTensors const&, float*, cudaStream_t);
}  // namespace natten::sm80

// X(part, family, rank, element, head dim, query tile, key tile) (sm90_harness.cuh), one line a part.
// Families: sm90 (this backward: 64-token query boxes, 128-token key boxes), sm90bulk (the same
// with dQ's partials staged in shared memory and added by bulk reductions: DqPath::kBulk), sm90det
// (the deterministic backward: dK and dV by the same kernel, dQ by the SM80 family's dQ kernel;
// DqPath::kSeparate), sm90detw (the same with the Hopper dQ kernel; DqPath::kSeparateWgmma), sm80
// (the SM80 family's backward, timed in the same run). The checks of the two deterministic
// families also run each case twice and compare the bits.
#define NATTEN_INSTANCES(X) \
  X(1, sm90, 1, bf16, 128, B64, B128) X(1, sm90, 1, fp16, 128, B64, B128) X(1, sm90, 1, bf16, 64, B64, B128) \
  X(2, sm90, 2, bf16, 128, B8x8, B16x8) X(2, sm90, 2, fp16, 64, B8x8, B16x8) \
  X(3, sm90, 3, bf16, 128, B4x4x4, B4x4x8) X(3, sm90, 3, bf16, 128, B2x4x8, B2x8x8) X(3, sm90, 3, fp16, 64, B4x4x4, B4x4x8) \
  X(4, sm80, 1, bf16, 128, B128, B64) X(4, sm80, 2, bf16, 128, B16x8, B8x8) X(4, sm80, 3, bf16, 128, B4x4x8, B4x4x4) \
  X(5, sm90bulk, 1, bf16, 128, B64, B128) X(5, sm90bulk, 2, bf16, 128, B8x8, B16x8) X(5, sm90bulk, 3, bf16, 128, B4x4x4, B4x4x8) X(5, sm90bulk, 3, fp16, 64, B4x4x4, B4x4x8) \
  X(6, sm90det, 1, bf16, 128, B64, B128) X(6, sm90det, 2, bf16, 128, B8x8, B16x8) X(6, sm90det, 3, bf16, 128, B4x4x4, B4x4x8) X(6, sm90det, 3, fp16, 64, B4x4x4, B4x4x8) \
  X(7, sm90detw, 1, bf16, 128, B64, B128) X(7, sm90detw, 2, bf16, 128, B8x8, B16x8) X(7, sm90detw, 3, bf16, 128, B4x4x4, B4x4x8) X(7, sm90detw, 3, fp16, 64, B4x4x4, B4x4x8)

#define NATTEN_ENTRY_sm80(R, T, HD, Q, KV) natten::sm80::fna_backward<R, T, HD, Q, KV>
#define NATTEN_ENTRY_sm90(R, T, HD, Q, KV) natten::sm90::run_fna_backward<R, T, HD, Q, KV>
#define NATTEN_ENTRY_sm90bulk(R, T, HD, Q, KV) \
  natten::sm90::run_backward<natten::sm90::BackwardConfig<R, T, HD, Q, KV, natten::sm90::DqPath::kBulk>, T>
#define NATTEN_ENTRY_sm90det(R, T, HD, Q, KV) \
  natten::sm90::run_backward<natten::sm90::BackwardConfig<R, T, HD, Q, KV, natten::sm90::DqPath::kSeparate>, T>
#define NATTEN_ENTRY_sm90detw(R, T, HD, Q, KV) \
  natten::sm90::run_backward<natten::sm90::BackwardConfig<R, T, HD, Q, KV, natten::sm90::DqPath::kSeparateWgmma>, T>

#if NATTEN_PART > 0
// One part of the instantiations.
#if NATTEN_PART == 4
#include "sm80/fna_backward.cuh"
#else
#include "sm90/bwd_launch.cuh"
#endif
#define INSTANTIATE(part, family, R, T, HD, Q, KV)                                                    \
  NATTEN_INSTANTIATE_IN_PART(part, family, R, T, HD, Q, KV, natten::NaProblem const&, natten::FnaTensors const&, \
                             float*, cudaStream_t)
NATTEN_INSTANCES(INSTANTIATE)

#else  // the harness

using Runner = void (*)(NaProblem const&, FnaTensors const&, float*, cudaStream_t);

std::vector<Instance<Runner>> const& instances() {
#ifdef NATTEN_NO_INSTANCES  // part 0 alone, for --self-test (tests/test_sm90_backward_host.py)
  static std::vector<Instance<Runner>> const all;
#else
  static std::vector<Instance<Runner>> const all = {NATTEN_INSTANCES(NATTEN_INSTANCE)};
#endif
  return all;
}

// Workspace floats either family needs: the SM90 backward's (the SM80 backward needs only delta,
// which is smaller).
size_t workspace_floats(NaProblem const& p) { return natten::sm90::fna_backward_workspace_floats(p); }

// Float64 forward and backward of docs/semantics.md. Inputs as doubles; outputs out [B, N, H, Dv],
// lse [B, N, H], and the gradients of q, k, v, extra k, extra v given d_out (and d_lse, empty
// when unused). Pass 1 (parallel over queries) computes each query's softmax, out, lse, dq and
// keeps its probabilities and score gradients; pass 2 (parallel over batch and key head) adds
// them into dk, dv.
struct Grads {
  std::vector<double> out, lse, dq, dk, dv, dek, dev;
};
Grads reference(NaProblem const& p, std::vector<double> const& q, std::vector<double> const& k,
                std::vector<double> const& v, std::vector<double> const& ek, std::vector<double> const& ev,
                std::vector<double> const& d_out, std::vector<double> const& d_lse) {
  int64_t const n = p.tokens(), B = p.batch, H = p.heads, Hk = p.heads_kv, D = p.dim, Dv = p.dim_v,
                E = p.num_extra, G = H / Hk;
  Grads g;
  g.out.assign(B * n * H * Dv, 0.0);
  g.lse.assign(B * n * H, 0.0);
  g.dq.assign(B * n * H * D, 0.0);
  g.dk.assign(B * n * Hk * D, 0.0);
  g.dv.assign(B * n * Hk * Dv, 0.0);
  g.dek.assign(B * E * Hk * D, 0.0);
  g.dev.assign(B * E * Hk * Dv, 0.0);
  std::vector<std::vector<int64_t>> keys(n);
  std::vector<std::vector<double>> probs(B * n * H), dscores(B * n * H);
  auto key_row = [&](int64_t b, int64_t hk, std::vector<int64_t> const& ks, size_t j, bool value) {
    int64_t const dim = value ? Dv : D;
    if (j < ks.size()) return &(value ? v : k)[((b * n + ks[j]) * Hk + hk) * dim];
    return &(value ? ev : ek)[((b * E + int64_t(j - ks.size())) * Hk + hk) * dim];
  };
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t x = 0; x < n; ++x) {
    keys[x] = visible_keys(p, x);
    auto const& ks = keys[x];
    size_t const count = ks.size() + size_t(E);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        int64_t const hk = h / G, row = (b * n + x) * H + h;
        double const* qr = &q[row * D];
        double const* gr = &d_out[row * Dv];
        std::vector<double> s(count), dp(count);
        for (size_t j = 0; j < count; ++j) {
          double const* kr = key_row(b, hk, ks, j, false);
          double const* vr = key_row(b, hk, ks, j, true);
          double dot = 0, dv_dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          for (int64_t d = 0; d < Dv; ++d) dv_dot += gr[d] * vr[d];
          s[j] = dot * p.scale;
          dp[j] = dv_dot;
        }
        double const m = *std::max_element(s.begin(), s.end());
        double l = 0;
        for (double& t : s) l += (t = std::exp(t - m));
        double* o = &g.out[row * Dv];
        for (size_t j = 0; j < count; ++j) {
          s[j] /= l;
          double const* vr = key_row(b, hk, ks, j, true);
          for (int64_t d = 0; d < Dv; ++d) o[d] += s[j] * vr[d];
        }
        g.lse[row] = m + std::log(l);
        double delta = 0;
        for (int64_t d = 0; d < Dv; ++d) delta += gr[d] * o[d];
        if (!d_lse.empty()) delta -= d_lse[row];  // d lse / d s_j = P_j
        double* dqr = &g.dq[row * D];
        for (size_t j = 0; j < count; ++j) {
          dp[j] = s[j] * (dp[j] - delta);  // dS, the gradient of the scaled score
          double const* kr = key_row(b, hk, ks, j, false);
          for (int64_t d = 0; d < D; ++d) dqr[d] += p.scale * dp[j] * kr[d];
        }
        probs[row] = std::move(s);
        dscores[row] = std::move(dp);
      }
    }
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bk = 0; bk < B * Hk; ++bk) {
    int64_t const b = bk / Hk, hk = bk % Hk;
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (int64_t x = 0; x < n; ++x) {
        int64_t const row = (b * n + x) * H + h;
        auto const& ks = keys[x];
        double const* qr = &q[row * D];
        double const* gr = &d_out[row * Dv];
        for (size_t j = 0; j < probs[row].size(); ++j) {
          bool const grid = j < ks.size();
          int64_t const key = grid ? (b * n + ks[j]) * Hk + hk : (b * E + int64_t(j - ks.size())) * Hk + hk;
          double* dkr = &(grid ? g.dk : g.dek)[key * D];
          double* dvr = &(grid ? g.dv : g.dev)[key * Dv];
          double const ds = p.scale * dscores[row][j], pr = probs[row][j];
          for (int64_t d = 0; d < D; ++d) dkr[d] += ds * qr[d];
          for (int64_t d = 0; d < Dv; ++d) dvr[d] += pr * gr[d];
        }
      }
    }
  }
  return g;
}

// Self-test of the float64 reference, on the host, before any GPU case (a wrong reference would
// pass a wrong kernel or fail a right one). Two independent checks:
//  1. visible_keys (through common/na_window.h) against docs/semantics.md written out literally
//     here, for every query of random small axes (odd/even windows, stride, dilation, causal);
//  2. reference()'s gradients against central finite differences of its own forward, for the
//     loss sum(out * d_out) + sum(lse * d_lse), on tiny problems with GQA, additional keys, a
//     d_lse, a negative scale, stride/dilation/causal and D != Dv: every element of dq, dk, dv,
//     dek, dev. The forward (softmax, out, lse) is the plain definition, so this pins the
//     gradient formulas (delta, dS, the scale of dq/dk, dv, the d_lse term) to it.
bool spec_sees_axis(AxisSpec const& a, int64_t x, int64_t y) {  // docs/semantics.md, as written
  int64_t const L = a.extent, k = a.kernel, s = a.stride, d = a.dilation;
  if (x % d != y % d) return false;
  int64_t const xi = x / d, yi = y / d;
  int64_t const Lg = L / d + ((x % d) < (L % d) ? 1 : 0);
  if (a.causal) {
    int64_t const lead = std::min((xi / s) * s + s - 1, Lg - 1);
    return yi <= xi && lead - yi < k;
  }
  int64_t const left = k / 2, right = k % 2 ? k / 2 : k / 2 - 1;
  int64_t const lead = std::min((xi / s) * s + s / 2, Lg - 1);
  int64_t const centre = std::max(left, std::min(lead, Lg - 1 - right));
  return centre - left <= yi && yi <= centre + right;
}

bool reference_self_test() {
  std::mt19937 rng(99);
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  int window_bad = 0;
  for (int trial = 0; trial < 300; ++trial) {
    NaProblem p;
    p.rank = int(uni(1, 3));
    for (int a = 0; a < p.rank; ++a) {
      int64_t const L = uni(1, p.rank == 1 ? 40 : 9), d = uni(1, std::max<int64_t>(1, L / 2));
      int64_t const k = uni(1, L / d), s = uni(1, k);
      p.axis[a] = AxisSpec{L, k, s, d, uni(0, 1) == 1};
    }
    int64_t const n = p.tokens();
    for (int64_t x = 0; x < n; ++x) {
      auto keys = visible_keys(p, x);
      std::sort(keys.begin(), keys.end());
      std::vector<int64_t> want;
      for (int64_t y = 0; y < n; ++y) {
        bool ok = true;
        int64_t xr = x, yr = y;
        for (int a = p.rank - 1; a >= 0; --a) {
          ok = ok && spec_sees_axis(p.axis[a], xr % p.axis[a].extent, yr % p.axis[a].extent);
          xr /= p.axis[a].extent;
          yr /= p.axis[a].extent;
        }
        if (ok) want.push_back(y);
      }
      window_bad += keys != want;
    }
  }
  std::printf("reference self-test: visible keys vs docs/semantics.md: %d queries differ\n", window_bad);

  struct Tiny {
    char const* name;
    Case c;
    int64_t dim_v;
  };
  Tiny const tiny[] = {
      {"1-D L9 k4 s2 causal, GQA 4/2, 3 extra, d_lse, scale -0.3",
       {"", 1, {9}, {4}, {2}, {1}, {true}, 2, 4, 2, 4, 3, -0.3, true}, 3},
      {"2-D 6x5 k3x2 d2x1 s1x2, causal 0/1",
       {"", 2, {6, 5}, {3, 2}, {1, 2}, {2, 1}, {false, true}, 1, 2, 1, 3, 0, 0.7, true}, 5},
      {"3-D 3x4x5 k2x3x3 causal 1/0/1, 2 extra",
       {"", 3, {3, 4, 5}, {2, 3, 3}, {1, 1, 2}, {1, 1, 1}, {true, false, true}, 1, 2, 2, 2, 2, 0.5, false}, 2},
  };
  double worst = 0;
  for (auto const& t : tiny) {
    NaProblem p = problem_of(t.c, int(t.c.dim));
    p.dim_v = t.dim_v;
    int64_t const n = p.tokens(), rows = p.batch * n * p.heads, E = p.num_extra;
    std::vector<double> in[5] = {random_values(rows * p.dim, rng), random_values(p.batch * n * p.heads_kv * p.dim, rng),
                                 random_values(p.batch * n * p.heads_kv * p.dim_v, rng),
                                 random_values(p.batch * E * p.heads_kv * p.dim, rng),
                                 random_values(p.batch * E * p.heads_kv * p.dim_v, rng)};
    std::vector<double> const d_out = random_values(rows * p.dim_v, rng);
    std::vector<double> const d_lse = t.c.d_lse ? random_values(rows, rng) : std::vector<double>();
    auto loss = [&]() {
      Grads const g = reference(p, in[0], in[1], in[2], in[3], in[4], d_out, d_lse);
      double l = 0;
      for (size_t i = 0; i < g.out.size(); ++i) l += g.out[i] * d_out[i];
      for (size_t i = 0; i < d_lse.size(); ++i) l += g.lse[i] * d_lse[i];
      return l;
    };
    Grads const g = reference(p, in[0], in[1], in[2], in[3], in[4], d_out, d_lse);
    std::vector<double> const* analytic[5] = {&g.dq, &g.dk, &g.dv, &g.dek, &g.dev};
    double err = 0, scale = 0;
    for (int which = 0; which < 5; ++which) {
      for (size_t i = 0; i < in[which].size(); ++i) {
        double const x = in[which][i], h = 1e-5;
        in[which][i] = x + h;
        double const up = loss();
        in[which][i] = x - h;
        double const down = loss();
        in[which][i] = x;
        double const fd = (up - down) / (2 * h);
        err = std::max(err, std::abs(fd - (*analytic[which])[i]));
        scale = std::max(scale, std::abs(fd));
      }
    }
    double const rel = err / std::max(scale, 1e-300);
    worst = std::max(worst, rel);
    std::printf("reference self-test: gradients vs finite differences, %s: max error %.1e of max %.2f\n", t.name, err,
                scale);
  }
  bool const ok = window_bad == 0 && worst < 1e-6;
  std::printf("reference self-test: %s\n", ok ? "PASS" : "FAIL");
  return ok;
}

template <class T>
bool check_case(Instance<Runner> const& inst, Case const& c, std::mt19937& rng) {
  NaProblem const p = problem_of(c, inst.head_dim);
  int64_t const n = p.tokens(), rows = p.batch * n * p.heads;
  int64_t const E = p.num_extra;
  Buffer<T> q(random_values(rows * p.dim, rng)), k(random_values(p.batch * n * p.heads_kv * p.dim, rng)),
      v(random_values(p.batch * n * p.heads_kv * p.dim_v, rng)), ek(random_values(p.batch * E * p.heads_kv * p.dim, rng)),
      ev(random_values(p.batch * E * p.heads_kv * p.dim_v, rng)), d_out(random_values(rows * p.dim_v, rng));
  std::vector<double> d_lse_values = c.d_lse ? random_values(rows, rng) : std::vector<double>();
  Buffer<float> d_lse(d_lse_values);
  d_lse_values = d_lse.exact;
  // The forward's outputs as the kernel would get them: out in T, lse in float32.
  Grads const ref = reference(p, q.exact, k.exact, v.exact, ek.exact, ev.exact, d_out.exact, d_lse_values);
  Buffer<T> out(ref.out);
  Buffer<float> lse(ref.lse);
  Buffer<T> d_q(rows * p.dim), d_k(p.batch * n * p.heads_kv * p.dim), d_v(p.batch * n * p.heads_kv * p.dim_v),
      d_ek(p.batch * E * p.heads_kv * p.dim), d_ev(p.batch * E * p.heads_kv * p.dim_v);
  Buffer<float> workspace(workspace_floats(p));
  FnaTensors const t{q.dev,    k.dev,   v.dev,   ek.dev,  ev.dev, out.dev, lse.dev, d_out.dev,
                     c.d_lse ? d_lse.dev : nullptr, d_q.dev, d_k.dev, d_v.dev, d_ek.dev, d_ev.dev};
  std::string error;
  try {
    inst.run(p, t, workspace.dev, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
  } catch (std::exception const& e) {
    error = e.what();
  }
  bool ok = error.empty();
  double err[5] = {NAN, NAN, NAN, NAN, NAN};
  size_t bad = 0;
  if (ok) {
    err[0] = rel_error(d_q.read(bad), ref.dq);
    err[1] = rel_error(d_k.read(bad), ref.dk);
    err[2] = rel_error(d_v.read(bad), ref.dv);
    if (E > 0) {
      err[3] = rel_error(d_ek.read(bad), ref.dek);
      err[4] = rel_error(d_ev.read(bad), ref.dev);
    }
    double const tol = inst.bf ? 1e-2 : 2e-3;
    ok = bad == 0;
    for (double e : err) ok = ok && (std::isnan(e) ? true : e < tol);
    ok = ok && !std::isnan(err[0]) && !std::isnan(err[1]) && !std::isnan(err[2]);
    if (ok && (!std::strcmp(inst.family, "sm90det") || !std::strcmp(inst.family, "sm90detw"))) {
      auto const first = std::make_tuple(d_q.read(bad), d_k.read(bad), d_v.read(bad), d_ek.read(bad), d_ev.read(bad));
      inst.run(p, t, workspace.dev, nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      if (first != std::make_tuple(d_q.read(bad), d_k.read(bad), d_v.read(bad), d_ek.read(bad), d_ev.read(bad))) {
        ok = false;
        error = "a second run gave other bits";
      }
    }
  }
  auto fmt = [](double e) {
    char buf[16];
    if (std::isnan(e)) return std::string("     -  ");
    std::snprintf(buf, sizeof buf, "%8.1e", e);
    return std::string(buf);
  };
  std::printf("%-4s %-8s %-5s %d-D hd%-3d %-12s %-36s %s %s %s %s %s %6zu %s\n", ok ? "PASS" : "FAIL", inst.family,
              inst.bf ? "bf16" : "fp16", inst.rank, inst.head_dim, inst.tiles.c_str(), c.name.c_str(),
              fmt(err[0]).c_str(), fmt(err[1]).c_str(), fmt(err[2]).c_str(), fmt(err[3]).c_str(), fmt(err[4]).c_str(),
              bad, error.c_str());
  return ok;
}

// Buffers of one timed problem, shared by every instance timed on it. O and dO are random and
// LSE a constant that keeps the probabilities finite: the timing does not depend on the values.
template <class T>
struct BenchTensors {
  DeviceArena arena;
  FnaTensors t;
  float* workspace = nullptr;
  explicit BenchTensors(NaProblem const& p) {
    int64_t const n = p.batch * p.tokens();
    t.q = arena.random<T>(n * p.heads * p.dim, 1);
    t.k = arena.random<T>(n * p.heads_kv * p.dim, 2);
    t.v = arena.random<T>(n * p.heads_kv * p.dim_v, 3);
    t.out = arena.random<T>(n * p.heads * p.dim_v, 4);
    t.d_out = arena.random<T>(n * p.heads * p.dim_v, 5);
    t.lse = arena.constant(n * p.heads, 8.f);
    t.d_q = arena.zeros(n * p.heads * p.dim * sizeof(T));
    t.d_k = arena.zeros(n * p.heads_kv * p.dim * sizeof(T));
    t.d_v = arena.zeros(n * p.heads_kv * p.dim_v * sizeof(T));
    workspace = static_cast<float*>(arena.zeros(workspace_floats(p) * sizeof(float)));
    CUDA_CHECK(cudaDeviceSynchronize());
  }
};

int main(int argc, char** argv) {
  Options const opt(argc, argv);
  // The reference is checked on the host before any GPU case (and alone with --self-test, which
  // needs no GPU).
  if (opt.self_test || opt.checks) {
    if (!reference_self_test()) return 1;
    if (opt.self_test) return 0;
  }
  print_device();
  int failed = 0, run = 0;
  if (opt.checks) {
    std::printf("%-4s %-8s %-5s %-9s %-12s %-36s %8s %8s %8s %8s %8s %6s\n", "", "family", "dtype", "kernel", "tiles",
                "case", "dQ", "dK", "dV", "dK extra", "dV extra", "nonfin");
    std::tie(run, failed) = run_checks(instances(), opt, [](auto const& inst, Case const& c, std::mt19937& rng) {
      return inst.bf ? check_case<bf16>(inst, c, rng) : check_case<fp16>(inst, c, rng);
    });
  }
  if (opt.timings) {
    // Backward FLOPs: five GEMMs (S, dP, dV, dK, dQ) of 2 B H D per visible pair. Times cover every
    // launch of one backward call (SM90: delta, dQ clear, main kernel, dQ conversion; sm90det and
    // sm90detw: delta, main kernel, dQ kernel).
    // ms: timed in instance order, then (rev) in reverse order (time_both_orders); TFLOP/s from
    // the lower.
    std::printf("\n%-3s %-22s %-8s %-13s %8s %8s %8s %8s\n", "", "problem", "family", "tiles", "ms", "ms rev",
                "TFLOP/s", "target");
    for (auto const& bench : bench_problems(3.0, 1.4, 13.0)) {
      NaProblem const p = problem_of(bench.c, 128);
      double const flops = 10.0 * p.batch * p.heads * p.dim * visible_pairs(p);
      BenchTensors<bf16> const tensors(p);
      std::vector<Instance<Runner> const*> timed;
      for (auto const& inst : instances()) {
        if (inst.rank == p.rank && inst.bf && inst.head_dim == 128 && opt.selects(inst.family)) timed.push_back(&inst);
      }
      auto const both = time_both_orders(timed, [&](Instance<Runner> const& inst) {
        return median_ms([&] { inst.run(p, tensors.t, tensors.workspace, nullptr); }, 20, 3);
      });
      for (size_t i = 0; i < timed.size(); ++i) {
        float const ms = std::min(both[i].first, both[i].second);
        std::printf("%-3s %-22s %-8s %-13s %8.3f %8.3f %8.1f %8.2f\n", bench.name, bench.c.name.c_str(),
                    timed[i]->family, timed[i]->tiles.c_str(), both[i].first, both[i].second, flops / (ms * 1e9),
                    bench.target_ms);
      }
    }
  }
  if (opt.checks) std::printf("%d passed, %d failed\n", run - failed, failed);
  return failed != 0;
}

#endif
