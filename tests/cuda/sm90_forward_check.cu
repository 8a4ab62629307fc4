// Standalone check of the SM90 forward (no torch): small problems against a float64 CPU
// evaluation of docs/semantics.md (window arithmetic from common/na_window.h), then timings of the
// benchmark problems P1-P3. Built by `tests/cuda/run_sm90_check.sh forward` as several translation
// units of this one file: NATTEN_PART 0 is the harness, parts 1-5 hold the instantiations listed
// once in NATTEN_INSTANCES below (compiled in parallel).
//
//   sm90_forward_check [--checks] [--timings] [--quick] [--family F]
// (default: checks and timings of every family; --quick: one check per instance)
// Exit status non-zero when any check fails.
#include "sm90_harness.cuh"

namespace natten::sm90 {
template <int Rank, typename Element, int HeadDim, class QTile, class KVTile>
void run_fna_forward(NaProblem const&, FnaTensors const&, cudaStream_t);
#if NATTEN_PART == 0
template <int Rank_, class Element_, int HeadDim, class QTile_, class KVTile_, bool kPingPong_>
struct ForwardConfig;
template <class Config>
void run_forward(NaProblem const&, FnaTensors const&, cudaStream_t);
#endif
}  // namespace natten::sm90
namespace natten::sm80 {
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_forward(NaProblem const& p, FnaTensors const& t, cudaStream_t stream);
}  // namespace natten::sm80

// X(part, family, rank, element, head dim, query tile, key tile) (sm90_harness.cuh), one line a part.
// Families: sm90 (the entry point: BitMask; ping-pong of the two consumers where the query box has
// 128 tokens), sm90np (the same without ping-pong), sm80 (the SM80 family's forward, for timings in
// the same run).
#define NATTEN_INSTANCES(X) \
  X(1, sm90, 1, bf16, 128, B128, B128) X(1, sm90, 1, fp16, 128, B128, B64) X(1, sm90, 1, bf16, 64, B64, B128) \
  X(2, sm90, 2, bf16, 128, B16x8, B16x8) X(2, sm90, 2, bf16, 128, B16x8, B8x8) X(2, sm90, 2, fp16, 64, B8x16, B16x8) \
  X(3, sm90, 3, bf16, 128, B2x8x8, B2x8x8) X(3, sm90, 3, bf16, 128, B4x4x8, B4x4x4) X(3, sm90, 3, fp16, 64, B2x8x8, B2x4x8) \
  X(4, sm80, 1, bf16, 128, B128, B64) X(4, sm80, 2, bf16, 128, B16x8, B8x8) X(4, sm80, 3, bf16, 128, B4x4x8, B4x4x4) \
  X(5, sm90np, 1, bf16, 128, B128, B128) X(5, sm90np, 2, bf16, 128, B16x8, B16x8) X(5, sm90np, 3, bf16, 128, B2x8x8, B2x8x8) X(5, sm90np, 3, fp16, 64, B2x8x8, B2x4x8)

#define NATTEN_ENTRY_sm80(R, T, HD, Q, KV) natten::sm80::fna_forward<R, T, HD, Q, KV>
#define NATTEN_ENTRY_sm90(R, T, HD, Q, KV) natten::sm90::run_fna_forward<R, T, HD, Q, KV>
#define NATTEN_ENTRY_sm90np(R, T, HD, Q, KV) \
  natten::sm90::run_forward<natten::sm90::ForwardConfig<R, T, HD, Q, KV, false>>

#if NATTEN_PART > 0
// One part of the instantiations.
#if NATTEN_PART == 4
#include "sm80/fna_forward.cuh"
#else
#include "sm90/fwd_launch.cuh"
#endif
#define INSTANTIATE(part, family, R, T, HD, Q, KV) \
  NATTEN_INSTANTIATE_IN_PART(part, family, R, T, HD, Q, KV, natten::NaProblem const&, natten::FnaTensors const&, cudaStream_t)
NATTEN_INSTANCES(INSTANTIATE)

#else  // the harness

using Runner = void (*)(NaProblem const&, FnaTensors const&, cudaStream_t);

std::vector<Instance<Runner>> const& instances() {
  static std::vector<Instance<Runner>> const all = {NATTEN_INSTANCES(NATTEN_INSTANCE)};
  return all;
}

// Float64 evaluation of docs/semantics.md for every query: out [B, N, H, Dv], lse [B, N, H].
void reference(NaProblem const& p, std::vector<double> const& q, std::vector<double> const& k,
               std::vector<double> const& v, std::vector<double> const& ek, std::vector<double> const& ev,
               std::vector<double>& out, std::vector<double>& lse) {
  int64_t const n = p.tokens(), H = p.heads, Hk = p.heads_kv, D = p.dim, Dv = p.dim_v, E = p.num_extra;
  out.assign(p.batch * n * H * Dv, 0.0);
  lse.assign(p.batch * n * H, 0.0);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t x = 0; x < n; ++x) {
    std::vector<int64_t> const keys = visible_keys(p, x);
    std::vector<double> s;
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        int64_t const hk = h / (H / Hk);
        double const* qr = &q[((b * n + x) * H + h) * D];
        s.clear();
        for (int64_t y : keys) {
          double const* kr = &k[((b * n + y) * Hk + hk) * D];
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          s.push_back(dot * p.scale);
        }
        for (int64_t e = 0; e < E; ++e) {
          double const* kr = &ek[((b * E + e) * Hk + hk) * D];
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          s.push_back(dot * p.scale);
        }
        double const m = *std::max_element(s.begin(), s.end());
        double l = 0;
        for (double& t : s) l += (t = std::exp(t - m));
        double* o = &out[((b * n + x) * H + h) * Dv];
        for (size_t j = 0; j < s.size(); ++j) {
          double const* vr = j < keys.size() ? &v[((b * n + keys[j]) * Hk + hk) * Dv]
                                             : &ev[((b * E + int64_t(j - keys.size())) * Hk + hk) * Dv];
          for (int64_t d = 0; d < Dv; ++d) o[d] += s[j] / l * vr[d];
        }
        lse[(b * n + x) * H + h] = m + std::log(l);
      }
    }
  }
}

template <class T>
bool check_case(Instance<Runner> const& inst, Case const& c, std::mt19937& rng) {
  NaProblem const p = problem_of(c, inst.head_dim);
  int64_t const n = p.tokens();
  Buffer<T> const q(random_values(p.batch * n * p.heads * p.dim, rng)),
      k(random_values(p.batch * n * p.heads_kv * p.dim, rng)),
      v(random_values(p.batch * n * p.heads_kv * p.dim_v, rng)),
      ek(random_values(p.batch * p.num_extra * p.heads_kv * p.dim, rng)),
      ev(random_values(p.batch * p.num_extra * p.heads_kv * p.dim_v, rng));
  Buffer<T> const out(size_t(p.batch * n * p.heads * p.dim_v));
  Buffer<float> const lse(size_t(p.batch * n * p.heads));
  FnaTensors const t{q.dev, k.dev, v.dev, ek.dev, ev.dev, out.dev, lse.dev};
  std::string error;
  try {
    inst.run(p, t, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
  } catch (std::exception const& e) {
    error = e.what();
  }
  bool ok = error.empty();
  double e_out = NAN, e_lse = NAN;
  size_t unwritten = 0;
  if (ok) {
    std::vector<double> const got = out.read(unwritten), got_lse = lse.read(unwritten);
    std::vector<double> ref, ref_lse;
    reference(p, q.exact, k.exact, v.exact, ek.exact, ev.exact, ref, ref_lse);
    e_out = rel_error(got, ref);
    e_lse = rel_error(got_lse, ref_lse);
    double const tol = inst.bf ? 1e-2 : 2e-3;
    ok = unwritten == 0 && e_out < tol && e_lse < 1e-3;
  }
  std::printf("%-4s %-6s %-5s %d-D hd%-3d %-13s %-34s err %.2e lse %.2e nonfinite %zu %s\n", ok ? "ok" : "FAIL",
              inst.family, inst.bf ? "bf16" : "fp16", inst.rank, inst.head_dim, inst.tiles.c_str(), c.name.c_str(),
              e_out, e_lse, unwritten, error.c_str());
  return ok;
}

// Buffers of one timed problem, shared by every instance timed on it.
template <class T>
struct BenchTensors {
  DeviceArena arena;
  FnaTensors t;
  explicit BenchTensors(NaProblem const& p) {
    int64_t const n = p.batch * p.tokens();
    t.q = arena.random<T>(n * p.heads * p.dim, 1);
    t.k = arena.random<T>(n * p.heads_kv * p.dim, 2);
    t.v = arena.random<T>(n * p.heads_kv * p.dim_v, 3);
    t.out = arena.zeros(n * p.heads * p.dim_v * sizeof(T));
    t.lse = arena.zeros(n * p.heads * sizeof(float));
    CUDA_CHECK(cudaDeviceSynchronize());
  }
};

float time_ms(Instance<Runner> const& inst, NaProblem const& p, FnaTensors const& t, int iters) {
  return median_ms([&] { inst.run(p, t, nullptr); }, iters, 3);
}

// Query rows times keys that the tiles of an instance compute (every query box's key walk in
// whole key boxes), per batch entry and head; dilation 1. Tiles form a grid, so the sum over
// query boxes of the product of per-axis box counts is the product of per-axis sums.
double tile_pairs(NaProblem const& p, int const* q_box, int const* kv_box) {
  double pairs = 1;
  for (int a = 0; a < p.rank; ++a) {
    AxisSpec const& ax = p.axis[a];
    double boxes = 0;
    for (int64_t x0 = 0; x0 < ax.extent; x0 += q_box[a]) {
      int64_t const x1 = std::min(x0 + q_box[a], ax.extent) - 1;
      int64_t const span = natten::axis_window(ax, ax.extent, x1).last - natten::axis_window(ax, ax.extent, x0).first + 1;
      boxes += double((span + kv_box[a] - 1) / kv_box[a]) * kv_box[a] * q_box[a];
    }
    pairs *= boxes;
  }
  return pairs;
}

int main(int argc, char** argv) {
  Options const opt(argc, argv);
  print_device();
  int failed = 0;
  if (opt.checks) {
    auto const [run, bad] = run_checks(instances(), opt, [](auto const& inst, Case const& c, std::mt19937& rng) {
      return inst.bf ? check_case<bf16>(inst, c, rng) : check_case<fp16>(inst, c, rng);
    });
    failed = bad;
    std::printf("checks: %d of %d passed\n", run - failed, run);
  }
  if (opt.timings) {
    // ms: timed in instance order, then (rev) in reverse order (time_both_orders); TFLOP/s from
    // the lower. dense: the same instance with every window the whole grid (its attainable rate);
    // bound: the FLOPs its tiles compute at that rate; "of bound": bound / measured.
    std::printf("\n%-3s %-22s %-6s %-13s %8s %8s %8s %7s %9s %8s %8s\n", "", "problem", "family", "tiles", "ms",
                "ms rev", "TFLOP/s", "target", "dense TF", "bound", "of bound");
    for (auto const& bench : bench_problems(1.00, 0.45, 4.0)) {
      NaProblem const p = problem_of(bench.c, 128);
      NaProblem dense = p;
      for (int a = 0; a < p.rank; ++a) dense.axis[a].kernel = p.axis[a].extent;
      double const pairs = visible_pairs(p);
      double const per_pair = 4.0 * p.batch * p.heads * p.dim;
      double const dense_flops = per_pair * double(p.tokens()) * double(p.tokens());
      BenchTensors<bf16> const tensors(p);
      {
        // What a token permutation into contiguous boxes would cost at least: one copy of Q, K, V
        // in and of O back, at the copy engine's device-to-device rate.
        size_t const bytes = size_t(p.batch) * p.tokens() * p.heads * p.dim * sizeof(bf16);
        void* scratch;
        CUDA_CHECK(cudaMalloc(&scratch, bytes));
        float const copy_ms = median_ms([&] {
          for (void const* src : {tensors.t.q, tensors.t.k, tensors.t.v, static_cast<void const*>(tensors.t.out)}) {
            CUDA_CHECK(cudaMemcpyAsync(scratch, src, bytes, cudaMemcpyDeviceToDevice));
          }
        }, 10, 0);
        std::printf("%-3s %-22s copies of Q, K, V, O (a permutation's least cost): %.3f ms\n", bench.name,
                    bench.c.name.c_str(), copy_ms);
        cudaFree(scratch);
      }
      std::vector<Instance<Runner> const*> timed;
      for (auto const& inst : instances()) {
        if (inst.rank == p.rank && inst.bf && inst.head_dim == 128 && opt.selects(inst.family)) timed.push_back(&inst);
      }
      auto const both = time_both_orders(timed, [&](Instance<Runner> const& inst) { return time_ms(inst, p, tensors.t, 20); });
      for (size_t i = 0; i < timed.size(); ++i) {
        auto const& inst = *timed[i];
        float const ms = std::min(both[i].first, both[i].second);
        float const dense_ms = time_ms(inst, dense, tensors.t, 5);
        double const dense_rate = dense_flops / (dense_ms * 1e-3);
        double const bound_ms = per_pair * tile_pairs(p, inst.q_box, inst.kv_box) / dense_rate * 1e3;
        std::printf("%-3s %-22s %-6s %-13s %8.3f %8.3f %8.1f %7.2f %9.1f %8.3f %7.0f%%\n", bench.name,
                    bench.c.name.c_str(), inst.family, inst.tiles.c_str(), both[i].first, both[i].second,
                    per_pair * pairs / (ms * 1e9), bench.target_ms, dense_rate * 1e-12, bound_ms, 100.0 * bound_ms / ms);
      }
    }
  }
  return failed != 0;
}

#endif
