// Standalone check of the SM90 forward (no torch): small problems against a float64 CPU
// evaluation of SPEC section 1 (window arithmetic from common/na_window.h), then timings of the
// benchmark problems P1-P3. Built by tests/cuda/run_sm90_forward_check.sh as several translation
// units of this one file: NATTEN_PART 0 is the harness, parts 1-6 hold the instantiations listed
// once in NATTEN_INSTANCES below (compiled in parallel). Both mask policies of sm90/fwd_mask.cuh
// are instantiated for the registry's tile pairs (families sm90 and sm90wm), so one run checks
// both and times them side by side.
//
//   sm90_forward_check [--checks] [--timings] [--quick] [--family F]
// (default: checks and timings of every family; --quick: one check per instance)
// Exit status non-zero when any check fails.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/na_params.h"
#include "common/tile_params.h"

namespace natten::sm90 {
template <int Rank, typename Element, int HeadDim, class QTile, class KVTile>
void run_fna_forward(NaProblem const&, FnaTensors const&, cudaStream_t);
#if NATTEN_PART == 0
template <int Rank, class QTile, class KVTile>
struct BitMask;
template <int Rank, class QTile, class KVTile>
struct WindowMask;
template <int Rank_, class Element_, int HeadDim, class QTile_, class KVTile_, bool kPingPong_,
          template <int, class, class> class Mask_>
struct ForwardConfig;
template <class Config>
void run_forward(NaProblem const&, FnaTensors const&, cudaStream_t);
#endif
}  // namespace natten::sm90
namespace natten::sm80 {
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_forward(NaProblem const& p, FnaTensors const& t, cudaStream_t stream);
}  // namespace natten::sm80

using natten::Box;
using bf16 = __nv_bfloat16;
using fp16 = __half;

// X(part, family, rank, element, head dim, query tile, key tile); tiles as aliases (no commas).
// Families: sm90 (the entry point: BitMask; ping-pong of the two consumers where the query box has
// 128 tokens), sm90np (the same without ping-pong), sm90wm (the per-element WindowMask, to time
// against BitMask), sm80 (the SM80 family's forward, for timings
// in the same run).
using B64 = Box<64>;
using B128 = Box<128>;
using B8x8 = Box<8, 8>;
using B8x16 = Box<8, 16>;
using B16x8 = Box<16, 8>;
using B2x4x8 = Box<2, 4, 8>;
using B2x8x8 = Box<2, 8, 8>;
using B4x4x4 = Box<4, 4, 4>;
using B4x4x8 = Box<4, 4, 8>;
#define NATTEN_INSTANCES(X)                    \
  X(1, sm90, 1, bf16, 128, B128, B128)         \
  X(1, sm90, 1, fp16, 128, B128, B64)          \
  X(1, sm90, 1, bf16, 64, B64, B128)           \
  X(2, sm90, 2, bf16, 128, B16x8, B16x8)       \
  X(2, sm90, 2, bf16, 128, B16x8, B8x8)        \
  X(2, sm90, 2, fp16, 64, B8x16, B16x8)        \
  X(3, sm90, 3, bf16, 128, B2x8x8, B2x8x8)     \
  X(3, sm90, 3, bf16, 128, B4x4x8, B4x4x4)     \
  X(3, sm90, 3, fp16, 64, B2x8x8, B2x4x8)      \
  X(4, sm80, 1, bf16, 128, B128, B64)          \
  X(4, sm80, 2, bf16, 128, B16x8, B8x8)        \
  X(4, sm80, 3, bf16, 128, B4x4x8, B4x4x4)       \
  X(5, sm90np, 1, bf16, 128, B128, B128)       \
  X(5, sm90np, 2, bf16, 128, B16x8, B16x8)     \
  X(5, sm90np, 3, bf16, 128, B2x8x8, B2x8x8)   \
  X(5, sm90np, 3, fp16, 64, B2x8x8, B2x4x8)    \
  X(6, sm90wm, 1, bf16, 128, B128, B128)       \
  X(6, sm90wm, 2, bf16, 128, B16x8, B16x8)     \
  X(6, sm90wm, 3, bf16, 128, B2x8x8, B2x8x8)

#define NATTEN_ENTRY_sm80(R, T, HD, Q, KV) natten::sm80::fna_forward<R, T, HD, Q, KV>
#define NATTEN_ENTRY_sm90(R, T, HD, Q, KV) natten::sm90::run_fna_forward<R, T, HD, Q, KV>
#define NATTEN_ENTRY_sm90np(R, T, HD, Q, KV) \
  natten::sm90::run_forward<natten::sm90::ForwardConfig<R, T, HD, Q, KV, false, natten::sm90::BitMask>>
#define NATTEN_ENTRY_sm90wm(R, T, HD, Q, KV) \
  natten::sm90::run_forward<natten::sm90::ForwardConfig<R, T, HD, Q, KV, false, natten::sm90::WindowMask>>

#if NATTEN_PART > 0
// One part of the instantiations.
#if NATTEN_PART == 4
#include "sm80/fna_forward.cuh"
#else
#include "sm90/fwd_launch.cuh"
#endif
#define NATTEN_SELECT_1(...) __VA_ARGS__
#define NATTEN_SELECT_0(...)
#define NATTEN_CAT(a, b) a##b
#define NATTEN_SELECT(c) NATTEN_CAT(NATTEN_SELECT_, c)
#define INSTANTIATE(part, family, R, T, HD, Q, KV)                                                         \
  NATTEN_SELECT(NATTEN_PART_##part)(template void NATTEN_ENTRY_##family(R, T, HD, Q, KV)( \
      natten::NaProblem const&, natten::FnaTensors const&, cudaStream_t);)
#if NATTEN_PART == 1
#define NATTEN_PART_1 1
#else
#define NATTEN_PART_1 0
#endif
#if NATTEN_PART == 2
#define NATTEN_PART_2 1
#else
#define NATTEN_PART_2 0
#endif
#if NATTEN_PART == 3
#define NATTEN_PART_3 1
#else
#define NATTEN_PART_3 0
#endif
#if NATTEN_PART == 4
#define NATTEN_PART_4 1
#else
#define NATTEN_PART_4 0
#endif
#if NATTEN_PART == 5
#define NATTEN_PART_5 1
#else
#define NATTEN_PART_5 0
#endif
#if NATTEN_PART == 6
#define NATTEN_PART_6 1
#else
#define NATTEN_PART_6 0
#endif
NATTEN_INSTANCES(INSTANTIATE)

#else  // the harness

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using natten::AxisSpec;
using natten::FnaTensors;
using natten::NaProblem;

#define CUDA_CHECK(x)                                                                      \
  do {                                                                                     \
    cudaError_t const e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

using Runner = void (*)(NaProblem const&, FnaTensors const&, cudaStream_t);

struct Instance {
  char const* family;
  int rank;
  bool bf;  // bfloat16 (else float16)
  int head_dim;
  std::string tiles;
  Runner run;
  int q_box[3], kv_box[3];
};

template <class T>
std::string tile_name() {
  std::string s;
  for (int a = 0; a < 3; ++a) {
    if (a > 0 && T::extent(a) == 1 && (a == 2 || T::extent(2) == 1)) break;
    s += (a ? "x" : "") + std::to_string(T::extent(a));
  }
  return s;
}

std::vector<Instance> const& instances() {
#define LIST(part, family, R, T, HD, Q, KV) \
  {#family, R, std::is_same_v<T, bf16>, HD, tile_name<Q>() + "/" + tile_name<KV>(), &NATTEN_ENTRY_##family(R, T, HD, Q, KV), \
   {Q::extent(0), Q::extent(1), Q::extent(2)}, {KV::extent(0), KV::extent(1), KV::extent(2)}},
  static std::vector<Instance> const all = {NATTEN_INSTANCES(LIST)};
  return all;
}

struct Case {
  std::string name;
  int rank;
  int64_t extent[3], kernel[3], stride[3] = {1, 1, 1}, dilation[3] = {1, 1, 1};
  bool causal[3] = {false, false, false};
  int64_t batch = 1, heads = 2, heads_kv = 2, dim = 0, extra = 0;
  double scale = 0;  // 0: head_dim ** -0.5
};

NaProblem problem_of(Case const& c, int head_dim) {
  NaProblem p;
  p.rank = c.rank;
  for (int a = 0; a < c.rank; ++a) {
    p.axis[a] = AxisSpec{c.extent[a], c.kernel[a], c.stride[a], c.dilation[a], c.causal[a]};
  }
  p.batch = c.batch;
  p.heads = c.heads;
  p.heads_kv = c.heads_kv;
  p.dim = p.dim_v = c.dim ? c.dim : head_dim;
  p.num_extra = c.extra;
  p.scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(double(p.dim));
  return p;
}

// Float64 evaluation of SPEC section 1 for every query: out [B, N, H, Dv], lse [B, N, H].
void reference(NaProblem const& p, std::vector<double> const& q, std::vector<double> const& k,
               std::vector<double> const& v, std::vector<double> const& ek, std::vector<double> const& ev,
               std::vector<double>& out, std::vector<double>& lse) {
  int64_t const n = p.tokens(), H = p.heads, Hk = p.heads_kv, D = p.dim, Dv = p.dim_v, E = p.num_extra;
  out.assign(p.batch * n * H * Dv, 0.0);
  lse.assign(p.batch * n * H, 0.0);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t x = 0; x < n; ++x) {
    std::vector<int64_t> keys;
    std::vector<double> s;
    // Visible keys of query x: the product over axes of each axis' window, in grid coordinates.
    int64_t coord[3], rem = x;
    for (int a = p.rank - 1; a >= 0; --a) {
      coord[a] = rem % p.axis[a].extent;
      rem /= p.axis[a].extent;
    }
    keys.assign(1, 0);
    for (int a = 0; a < p.rank; ++a) {
      AxisSpec const& ax = p.axis[a];
      int64_t const r = coord[a] % ax.dilation;
      auto const w = natten::axis_window(ax, natten::group_length(ax, r), coord[a] / ax.dilation);
      std::vector<int64_t> next;
      for (int64_t base : keys) {
        for (int64_t yi = w.first; yi <= w.last; ++yi) next.push_back(base * ax.extent + yi * ax.dilation + r);
      }
      keys.swap(next);
    }
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

double to_double(bf16 x) { return double(__bfloat162float(x)); }
double to_double(fp16 x) { return double(__half2float(x)); }
template <class T>
__host__ __device__ T from_float(float x) {
  if constexpr (std::is_same_v<T, bf16>) return __float2bfloat16(x);
  else return __float2half(x);
}

// A device buffer of random values of T (and their exact values as doubles).
template <class T>
struct Input {
  std::vector<double> exact;
  T* dev = nullptr;
  Input(size_t n, std::mt19937& rng) {
    std::normal_distribution<float> dist(0.f, 1.f);
    std::vector<T> host(n);
    exact.resize(n);
    for (size_t i = 0; i < n; ++i) {
      host[i] = from_float<T>(dist(rng));
      exact[i] = to_double(host[i]);
    }
    if (n) {
      CUDA_CHECK(cudaMalloc(&dev, n * sizeof(T)));
      CUDA_CHECK(cudaMemcpy(dev, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  ~Input() { cudaFree(dev); }
};

double rel_error(std::vector<double> const& got, std::vector<double> const& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

template <class T>
bool check_case(Instance const& inst, Case const& c, std::mt19937& rng) {
  NaProblem const p = problem_of(c, inst.head_dim);
  int64_t const n = p.tokens();
  Input<T> q(p.batch * n * p.heads * p.dim, rng), k(p.batch * n * p.heads_kv * p.dim, rng),
      v(p.batch * n * p.heads_kv * p.dim_v, rng), ek(p.batch * p.num_extra * p.heads_kv * p.dim, rng),
      ev(p.batch * p.num_extra * p.heads_kv * p.dim_v, rng);
  size_t const n_out = p.batch * n * p.heads * p.dim_v, n_lse = p.batch * n * p.heads;
  T* out;
  float* lse;
  CUDA_CHECK(cudaMalloc(&out, n_out * sizeof(T)));
  CUDA_CHECK(cudaMalloc(&lse, n_lse * sizeof(float)));
  CUDA_CHECK(cudaMemset(out, 0xff, n_out * sizeof(T)));  // NaN: every element must be written
  CUDA_CHECK(cudaMemset(lse, 0xff, n_lse * sizeof(float)));
  FnaTensors t;
  t.q = q.dev;
  t.k = k.dev;
  t.v = v.dev;
  t.extra_k = ek.dev;
  t.extra_v = ev.dev;
  t.out = out;
  t.lse = lse;
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
    std::vector<T> h_out(n_out);
    std::vector<float> h_lse(n_lse);
    CUDA_CHECK(cudaMemcpy(h_out.data(), out, n_out * sizeof(T), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(h_lse.data(), lse, n_lse * sizeof(float), cudaMemcpyDeviceToHost));
    std::vector<double> got(n_out), got_lse(n_lse), ref, ref_lse;
    for (size_t i = 0; i < n_out; ++i) unwritten += !std::isfinite(got[i] = to_double(h_out[i]));
    for (size_t i = 0; i < n_lse; ++i) unwritten += !std::isfinite(got_lse[i] = h_lse[i]);
    reference(p, q.exact, k.exact, v.exact, ek.exact, ev.exact, ref, ref_lse);
    e_out = rel_error(got, ref);
    e_lse = rel_error(got_lse, ref_lse);
    double const tol = inst.bf ? 1e-2 : 2e-3;
    ok = unwritten == 0 && e_out < tol && e_lse < 1e-3;
  }
  std::printf("%-4s %-6s %-5s %d-D hd%-3d %-13s %-34s err %.2e lse %.2e nonfinite %zu %s\n", ok ? "ok" : "FAIL",
              inst.family, inst.bf ? "bf16" : "fp16", inst.rank, inst.head_dim, inst.tiles.c_str(), c.name.c_str(),
              e_out, e_lse, unwritten, error.c_str());
  cudaFree(out);
  cudaFree(lse);
  return ok;
}

std::vector<Case> check_cases(int rank) {
  std::vector<Case> cs;
  auto add = [&](Case c) {
    c.rank = rank;
    cs.push_back(c);
  };
  if (rank == 1) {
    add({"L500 k65 (borders, 4+ tiles)", 1, {500}, {65}});
    add({"L300 k64 even, B2", 1, {300}, {64}, {1}, {1}, {false}, 2});
    add({"L777 k33 s8", 1, {777}, {33}, {8}});
    add({"L600 k31 d2", 1, {600}, {31}, {1}, {2}});
    add({"L515 k100 causal", 1, {515}, {100}, {1}, {1}, {true}});
    add({"L400 k40 causal s5 d2", 1, {400}, {40}, {5}, {2}, {true}});
    add({"L256 k17 GQA 4/1 + 77 extra", 1, {256}, {17}, {1}, {1}, {false}, 1, 4, 1, 0, 77});
    add({"L1000 k255 dim 56, scale -0.3", 1, {1000}, {255}, {1}, {1}, {false}, 1, 2, 2, 56, 0, -0.3});
  } else if (rank == 2) {
    add({"40x36 k13x9 (borders)", 2, {40, 36}, {13, 9}});
    add({"33x31 k8x6 even, B2", 2, {33, 31}, {8, 6}, {1, 1}, {1, 1}, {false, false}, 2});
    add({"48x40 k10x12 s3x4", 2, {48, 40}, {10, 12}, {3, 4}});
    add({"50x45 k7x5 d3x2", 2, {50, 45}, {7, 5}, {1, 1}, {3, 2}});
    add({"37x29 k9x7 causal 0/1", 2, {37, 29}, {9, 7}, {1, 1}, {1, 1}, {false, true}});
    add({"30x30 k6x6 causal both s2", 2, {30, 30}, {6, 6}, {2, 2}, {1, 1}, {true, true}});
    add({"24x20 k5x5 GQA 6/2 + 130 extra", 2, {24, 20}, {5, 5}, {1, 1}, {1, 1}, {false, false}, 1, 6, 2, 0, 130});
    add({"64x64 k32x32 (P2 kind)", 2, {64, 64}, {32, 32}});
  } else {
    add({"10x12x20 k5x7x9 (borders)", 3, {10, 12, 20}, {5, 7, 9}});
    add({"9x11x13 k4x6x8 even", 3, {9, 11, 13}, {4, 6, 8}});
    add({"12x16x18 k4x8x6 s2x4x3 d1x1x2", 3, {12, 16, 18}, {4, 8, 6}, {2, 4, 3}, {1, 1, 2}});
    add({"8x12x12 k3x5x5 causal 1/0/0, B2", 3, {8, 12, 12}, {3, 5, 5}, {1, 1, 1}, {1, 1, 1}, {true, false, false}, 2});
    add({"6x10x14 k3x3x5 d2x3x2 + 20 extra", 3, {6, 10, 14}, {3, 3, 5}, {1, 1, 1}, {2, 3, 2}, {false, false, false}, 1, 2, 2, 0, 20});
    add({"12x24x24 k6x12x12 (P3 kind)", 3, {12, 24, 24}, {6, 12, 12}});
  }
  return cs;
}

// Deterministic pseudo-random values in [-2, 2), made on the device (the benchmark tensors are
// too large to draw on the host in reasonable time).
template <class T>
__global__ void fill_random(T* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 15;
    h *= 0x85EBCA77u;
    h ^= h >> 13;
    x[i] = from_float<T>(float(h >> 8) * (4.f / 16777216.f) - 2.f);
  }
}

// Buffers of one timed problem, shared by every instance timed on it.
template <class T>
struct BenchTensors {
  FnaTensors t;
  std::vector<void*> owned;
  explicit BenchTensors(NaProblem const& p) {
    int64_t const n = p.batch * p.tokens();
    auto alloc = [&](size_t count, size_t bytes, uint32_t seed) {
      void* d;
      CUDA_CHECK(cudaMalloc(&d, count * bytes));
      if (seed) fill_random<T><<<1024, 256>>>(static_cast<T*>(d), count, seed);
      owned.push_back(d);
      return d;
    };
    t.q = alloc(n * p.heads * p.dim, sizeof(T), 1);
    t.k = alloc(n * p.heads_kv * p.dim, sizeof(T), 2);
    t.v = alloc(n * p.heads_kv * p.dim_v, sizeof(T), 3);
    t.out = alloc(n * p.heads * p.dim_v, sizeof(T), 0);
    t.lse = alloc(n * p.heads, sizeof(float), 0);
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~BenchTensors() {
    for (void* d : owned) cudaFree(d);
  }
};

// Median of `iters` timed runs of `work` (CUDA events around each), after `warmup` untimed ones.
template <class Work>
float median_ms(Work&& work, int iters, int warmup) {
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < warmup; ++i) work();
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(e0));
    work();
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float x;
    CUDA_CHECK(cudaEventElapsedTime(&x, e0, e1));
    ms.push_back(x);
  }
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return ms[ms.size() / 2];
}

float time_ms(Instance const& inst, NaProblem const& p, FnaTensors const& t, int iters) {
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
  bool checks = true, timings = true, quick = false;
  std::string family;  // empty: every family
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--checks")) timings = false;
    if (!std::strcmp(argv[i], "--timings")) checks = false;
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--family") && i + 1 < argc) family = argv[++i];
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // whole lines even if a hang gets the run killed
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  int failed = 0, run = 0;
  if (checks) {
    std::mt19937 rng(1234);
    for (auto const& inst : instances()) {
      if (!std::strncmp(inst.family, "sm80", 4) || (!family.empty() && family != inst.family)) continue;
      auto cases = check_cases(inst.rank);
      if (quick) cases.resize(1);
      for (auto const& c : cases) {
        bool const ok = inst.bf ? check_case<bf16>(inst, c, rng) : check_case<fp16>(inst, c, rng);
        failed += !ok;
        ++run;
      }
    }
    std::printf("checks: %d of %d passed\n", run - failed, run);
  }
  if (timings) {
    struct Bench {
      char const* name;
      Case c;
      double target_ms;
    };
    Bench const benches[] = {
        {"P1", {"1-D 32768 k2048", 1, {32768}, {2048}, {1}, {1}, {false}, 1, 16, 16, 128}, 1.00},
        {"P2", {"2-D 128x128 k32x32", 2, {128, 128}, {32, 32}, {1, 1}, {1, 1}, {false, false}, 1, 16, 16, 128}, 0.45},
        {"P3", {"3-D 16x64x64 k8x16x16", 3, {16, 64, 64}, {8, 16, 16}, {1, 1, 1}, {1, 1, 1}, {false, false, false}, 1, 16, 16, 128}, 4.0},
    };
    // dense: the same instance with every window the whole grid (its attainable rate);
    // bound: the FLOPs its tiles compute at that rate; "of bound": bound / measured.
    std::printf("\n%-3s %-22s %-6s %-13s %8s %8s %7s %9s %8s %8s\n", "", "problem", "family", "tiles", "ms",
                "TFLOP/s", "target", "dense TF", "bound", "of bound");
    for (auto const& bench : benches) {
      NaProblem const p = problem_of(bench.c, 128);
      NaProblem dense = p;
      for (int a = 0; a < p.rank; ++a) dense.axis[a].kernel = p.axis[a].extent;
      double pairs = 1;
      for (int a = 0; a < p.rank; ++a) pairs *= double(natten::axis_visible_pairs(p.axis[a]));
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
      for (auto const& inst : instances()) {
        if (inst.rank != p.rank || !inst.bf || inst.head_dim != 128) continue;
        if (!family.empty() && family != inst.family) continue;
        float const ms = time_ms(inst, p, tensors.t, 20);
        float const dense_ms = time_ms(inst, dense, tensors.t, 5);
        double const dense_rate = dense_flops / (dense_ms * 1e-3);
        double const bound_ms = per_pair * tile_pairs(p, inst.q_box, inst.kv_box) / dense_rate * 1e3;
        std::printf("%-3s %-22s %-6s %-13s %8.3f %8.1f %7.2f %9.1f %8.3f %7.0f%%\n", bench.name,
                    bench.c.name.c_str(), inst.family, inst.tiles.c_str(), ms, per_pair * pairs / (ms * 1e9),
                    bench.target_ms, dense_rate * 1e-12, bound_ms, 100.0 * bound_ms / ms);
      }
    }
  }
  return failed != 0;
}

#endif
