// What the two SM90 harnesses (sm90_forward_check.cu, sm90_backward_check.cu) share: the split of
// their instantiations into parts, the cases they check and time, host and device buffers, the
// timing loop and the command line. Each harness keeps its own float64 reference, checks and
// tables.
//
// A harness lists its instantiations once, as NATTEN_INSTANCES(X) with
// X(part, family, rank, element, head dim, query tile, key tile), and names each family's entry
// point NATTEN_ENTRY_<family>(R, T, HD, Q, KV). NATTEN_PART 0 is the harness (this header's
// harness part); part k > 0 instantiates the rows of part k (NATTEN_INSTANTIATE_IN_PART).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/na_params.h"
#include "common/tile_params.h"

using bf16 = __nv_bfloat16;
using fp16 = __half;
// Tile shapes of the instance lists, as aliases (an X row's arguments have no commas).
using natten::Box;
using B64 = Box<64>;
using B128 = Box<128>;
using B8x8 = Box<8, 8>;
using B8x16 = Box<8, 16>;
using B16x8 = Box<16, 8>;
using B2x4x8 = Box<2, 4, 8>;
using B2x8x8 = Box<2, 8, 8>;
using B4x4x4 = Box<4, 4, 4>;
using B4x4x8 = Box<4, 4, 8>;

#define NATTEN_SELECT_1(...) __VA_ARGS__
#define NATTEN_SELECT_0(...)
#define NATTEN_CAT(a, b) a##b
#define NATTEN_SELECT(c) NATTEN_CAT(NATTEN_SELECT_, c)
// NATTEN_PART_EQ_k: 1 in the translation unit of part k, else 0 (parts 1-8).
#if NATTEN_PART == 1
#define NATTEN_PART_EQ_1 1
#else
#define NATTEN_PART_EQ_1 0
#endif
#if NATTEN_PART == 2
#define NATTEN_PART_EQ_2 1
#else
#define NATTEN_PART_EQ_2 0
#endif
#if NATTEN_PART == 3
#define NATTEN_PART_EQ_3 1
#else
#define NATTEN_PART_EQ_3 0
#endif
#if NATTEN_PART == 4
#define NATTEN_PART_EQ_4 1
#else
#define NATTEN_PART_EQ_4 0
#endif
#if NATTEN_PART == 5
#define NATTEN_PART_EQ_5 1
#else
#define NATTEN_PART_EQ_5 0
#endif
#if NATTEN_PART == 6
#define NATTEN_PART_EQ_6 1
#else
#define NATTEN_PART_EQ_6 0
#endif
#if NATTEN_PART == 7
#define NATTEN_PART_EQ_7 1
#else
#define NATTEN_PART_EQ_7 0
#endif
#if NATTEN_PART == 8
#define NATTEN_PART_EQ_8 1
#else
#define NATTEN_PART_EQ_8 0
#endif
// The explicit instantiation of one X row in its own part; Signature is the entry's parameter list.
#define NATTEN_INSTANTIATE_IN_PART(part, family, R, T, HD, Q, KV, ...) \
  NATTEN_SELECT(NATTEN_PART_EQ_##part)(template void NATTEN_ENTRY_##family(R, T, HD, Q, KV)(__VA_ARGS__);)

#if NATTEN_PART == 0

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using natten::AxisSpec;
using natten::FnaTensors;
using natten::NaProblem;

#define CUDA_CHECK(x)                                                                          \
  do {                                                                                         \
    cudaError_t const e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

template <class T>
std::string tile_name() {
  std::string s;
  for (int a = 0; a < 3; ++a) {
    if (a > 0 && T::extent(a) == 1 && (a == 2 || T::extent(2) == 1)) break;
    s += (a ? "x" : "") + std::to_string(T::extent(a));
  }
  return s;
}

// One instantiation as a harness lists it; Runner is its entry point's type.
template <class Runner>
struct Instance {
  char const* family;
  int rank;
  bool bf;  // bfloat16 (else float16)
  int head_dim;
  std::string tiles;
  Runner run;
  int q_box[3], kv_box[3];
};
// The Instance of one X row.
#define NATTEN_INSTANCE(part, family, R, T, HD, Q, KV)                                          \
  {#family,                                                                                     \
   R,                                                                                           \
   std::is_same_v<T, bf16>,                                                                     \
   HD,                                                                                          \
   tile_name<Q>() + "/" + tile_name<KV>(),                                                      \
   &NATTEN_ENTRY_##family(R, T, HD, Q, KV),                                                     \
   {Q::extent(0), Q::extent(1), Q::extent(2)},                                                  \
   {KV::extent(0), KV::extent(1), KV::extent(2)}},

struct Case {
  std::string name;
  int rank;
  int64_t extent[3], kernel[3], stride[3] = {1, 1, 1}, dilation[3] = {1, 1, 1};
  bool causal[3] = {false, false, false};
  int64_t batch = 1, heads = 2, heads_kv = 2, dim = 0, extra = 0;
  double scale = 0;    // 0: head_dim ** -0.5
  bool d_lse = false;  // the backward also gets a gradient of the LSE
};

inline NaProblem problem_of(Case const& c, int head_dim) {
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

// The small problems both harnesses check: borders, odd and even windows, stride, dilation, causal
// per axis, batch 2, GQA, additional keys, a head dim below the instantiation's, a negative
// scale, a gradient of the LSE, and problems of the benchmark's kinds.
inline std::vector<Case> check_cases(int rank) {
  std::vector<Case> cs;
  auto add = [&](Case c) {
    c.rank = rank;
    cs.push_back(c);
  };
  if (rank == 1) {
    add({"L500 k65 (borders, 4+ boxes)", 1, {500}, {65}});
    add({"L300 k64 even, B2", 1, {300}, {64}, {1}, {1}, {false}, 2});
    add({"L777 k33 s8", 1, {777}, {33}, {8}});
    add({"L600 k31 d2", 1, {600}, {31}, {1}, {2}});
    add({"L515 k100 causal", 1, {515}, {100}, {1}, {1}, {true}});
    add({"L400 k40 causal s5 d2", 1, {400}, {40}, {5}, {2}, {true}});
    add({"L256 k17 GQA 4/1 + 77 extra", 1, {256}, {17}, {1}, {1}, {false}, 1, 4, 1, 0, 77});
    add({"L1000 k255 dim 56, scale -0.3", 1, {1000}, {255}, {1}, {1}, {false}, 1, 2, 2, 56, 0, -0.3});
    add({"L333 k48 s16 + 200 extra, d_lse", 1, {333}, {48}, {16}, {1}, {false}, 2, 2, 1, 0, 200, 0, true});
  } else if (rank == 2) {
    add({"40x36 k13x9 (borders)", 2, {40, 36}, {13, 9}});
    add({"33x31 k8x6 even, B2", 2, {33, 31}, {8, 6}, {1, 1}, {1, 1}, {false, false}, 2});
    add({"48x40 k10x12 s3x4", 2, {48, 40}, {10, 12}, {3, 4}});
    add({"50x45 k7x5 d3x2", 2, {50, 45}, {7, 5}, {1, 1}, {3, 2}});
    add({"37x29 k9x7 causal 0/1", 2, {37, 29}, {9, 7}, {1, 1}, {1, 1}, {false, true}});
    add({"30x30 k6x6 causal both s2", 2, {30, 30}, {6, 6}, {2, 2}, {1, 1}, {true, true}});
    add({"24x20 k5x5 GQA 6/2 + 130 extra", 2, {24, 20}, {5, 5}, {1, 1}, {1, 1}, {false, false}, 1, 6, 2, 0, 130});
    add({"64x64 k32x32 (P2 kind), d_lse", 2, {64, 64}, {32, 32}, {1, 1}, {1, 1}, {false, false}, 1, 2, 2, 0, 0, 0, true});
  } else {
    add({"10x12x20 k5x7x9 (borders)", 3, {10, 12, 20}, {5, 7, 9}});
    add({"9x11x13 k4x6x8 even", 3, {9, 11, 13}, {4, 6, 8}});
    add({"12x16x18 k4x8x6 s2x4x3 d1x1x2", 3, {12, 16, 18}, {4, 8, 6}, {2, 4, 3}, {1, 1, 2}});
    add({"8x12x12 k3x5x5 causal 1/0/0, B2", 3, {8, 12, 12}, {3, 5, 5}, {1, 1, 1}, {1, 1, 1}, {true, false, false}, 2});
    add({"8x10x12 k4x4x6 causal 0/1/1 s1x2x3", 3, {8, 10, 12}, {4, 4, 6}, {1, 2, 3}, {1, 1, 1}, {false, true, true}});
    add({"6x10x14 k3x3x5 d2x3x2 + 20 extra", 3, {6, 10, 14}, {3, 3, 5}, {1, 1, 1}, {2, 3, 2}, {false, false, false}, 1, 2, 2, 0, 20});
    add({"8x12x12 k3x5x5 GQA 4/2", 3, {8, 12, 12}, {3, 5, 5}, {1, 1, 1}, {1, 1, 1}, {false, false, false}, 1, 4, 2});
    add({"12x24x24 k6x12x12 (P3 kind)", 3, {12, 24, 24}, {6, 12, 12}});
  }
  return cs;
}

// The benchmark's P1-P3 (benchmarks/problems.py), bf16 at head dim 128, with a target in ms.
struct Bench {
  char const* name;
  Case c;
  double target_ms;
};
inline std::vector<Bench> bench_problems(double p1_ms, double p2_ms, double p3_ms) {
  return {
      {"P1", {"1-D 32768 k2048", 1, {32768}, {2048}, {1}, {1}, {false}, 1, 16, 16, 128}, p1_ms},
      {"P2", {"2-D 128x128 k32x32", 2, {128, 128}, {32, 32}, {1, 1}, {1, 1}, {false, false}, 1, 16, 16, 128}, p2_ms},
      {"P3", {"3-D 16x64x64 k8x16x16", 3, {16, 64, 64}, {8, 16, 16}, {1, 1, 1}, {1, 1, 1}, {false, false, false}, 1, 16, 16, 128}, p3_ms},
  };
}

// Visible pairs of a problem per batch entry and head (visibility is a product over axes).
inline double visible_pairs(NaProblem const& p) {
  double pairs = 1;
  for (int a = 0; a < p.rank; ++a) pairs *= double(natten::axis_visible_pairs(p.axis[a]));
  return pairs;
}

// Visible keys of query x (flat token): the product over axes of each axis' window.
inline std::vector<int64_t> visible_keys(NaProblem const& p, int64_t x) {
  int64_t coord[3], rem = x;
  for (int a = p.rank - 1; a >= 0; --a) {
    coord[a] = rem % p.axis[a].extent;
    rem /= p.axis[a].extent;
  }
  std::vector<int64_t> keys(1, 0);
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
  return keys;
}

inline double to_double(bf16 x) { return double(__bfloat162float(x)); }
inline double to_double(fp16 x) { return double(__half2float(x)); }
template <class T>
__host__ __device__ T from_float(float x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return __float2bfloat16(x);
  } else {
    return __float2half(x);
  }
}

// A device buffer of T (or float) holding given values; `exact` is what the device holds, as
// doubles.
template <class T>
struct Buffer {
  std::vector<double> exact;
  T* dev = nullptr;
  size_t n = 0;
  explicit Buffer(std::vector<double> const& values) : n(values.size()) {
    std::vector<T> host(n);
    exact.resize(n);
    for (size_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        host[i] = float(values[i]);
        exact[i] = host[i];
      } else {
        host[i] = from_float<T>(float(values[i]));
        exact[i] = to_double(host[i]);
      }
    }
    if (n) {
      CUDA_CHECK(cudaMalloc(&dev, n * sizeof(T)));
      CUDA_CHECK(cudaMemcpy(dev, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  // An output: poisoned with NaN (every element must be written).
  explicit Buffer(size_t count) : n(count) {
    if (n) {
      CUDA_CHECK(cudaMalloc(&dev, n * sizeof(T)));
      CUDA_CHECK(cudaMemset(dev, 0xff, n * sizeof(T)));
    }
  }
  Buffer(Buffer const&) = delete;
  ~Buffer() { cudaFree(dev); }
  // The device values as doubles; counts the non-finite ones into `bad`.
  std::vector<double> read(size_t& bad) const {
    std::vector<T> host(n);
    if (n) CUDA_CHECK(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        out[i] = host[i];
      } else {
        out[i] = to_double(host[i]);
      }
      bad += !std::isfinite(out[i]);
    }
    return out;
  }
};

inline std::vector<double> random_values(size_t n, std::mt19937& rng) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> x(n);
  for (double& v : x) v = dist(rng);
  return x;
}

inline double rel_error(std::vector<double> const& got, std::vector<double> const& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
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
__global__ void fill_constant(float* x, size_t n, float value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) x[i] = value;
}

// Device memory of one timed problem, freed together: random T (seed > 0), zeros, or a constant.
struct DeviceArena {
  std::vector<void*> owned;
  template <class T>
  void* random(size_t count, uint32_t seed) {
    void* d = zeros(count * sizeof(T));
    fill_random<T><<<1024, 256>>>(static_cast<T*>(d), count, seed);
    return d;
  }
  void* zeros(size_t bytes) {
    void* d;
    CUDA_CHECK(cudaMalloc(&d, bytes));
    CUDA_CHECK(cudaMemset(d, 0, bytes));
    owned.push_back(d);
    return d;
  }
  float* constant(size_t count, float value) {
    auto* d = static_cast<float*>(zeros(count * sizeof(float)));
    fill_constant<<<1024, 256>>>(d, count, value);
    return d;
  }
  DeviceArena() = default;
  DeviceArena(DeviceArena const&) = delete;
  ~DeviceArena() {
    for (void* d : owned) cudaFree(d);
  }
};

// Median of `iters` timed runs of `work` (CUDA events around each), after `warmup` untimed ones.
// Each instance timed twice, in list order and then in reverse: an instance's time can depend
// on what ran before it (clocks, caches), which one fixed order would hide. (first, second) per
// instance.
template <class Inst, class Time>
std::vector<std::pair<float, float>> time_both_orders(std::vector<Inst const*> const& insts, Time&& time) {
  std::vector<std::pair<float, float>> ms(insts.size());
  for (size_t i = 0; i < insts.size(); ++i) ms[i].first = time(*insts[i]);
  for (size_t i = insts.size(); i-- > 0;) ms[i].second = time(*insts[i]);
  return ms;
}

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

// The command line: [--checks] [--timings] [--quick] [--family F] [--self-test] (checks and
// timings of every family by default; --quick: one check per instance).
struct Options {
  bool checks = true, timings = true, quick = false, self_test = false;
  std::string family;  // empty: every family
  Options(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--checks")) timings = false;
      if (!std::strcmp(argv[i], "--timings")) checks = false;
      if (!std::strcmp(argv[i], "--quick")) quick = true;
      if (!std::strcmp(argv[i], "--self-test")) self_test = true;
      if (!std::strcmp(argv[i], "--family") && i + 1 < argc) family = argv[++i];
    }
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // whole lines even if a hang gets the run killed
  }
  // Whether the instance's family is the one asked for (any, if none was).
  bool selects(char const* inst_family) const { return family.empty() || family == inst_family; }
};

// Checks every case of check_cases on every selected instance but the SM80 family's (timed only):
// check(instance, case, rng) -> passed. Returns {cases run, cases failed}.
template <class Runner, class Check>
std::pair<int, int> run_checks(std::vector<Instance<Runner>> const& all, Options const& opt, Check&& check) {
  int run = 0, failed = 0;
  std::mt19937 rng(1234);
  for (auto const& inst : all) {
    if (!std::strncmp(inst.family, "sm80", 4) || !opt.selects(inst.family)) continue;
    auto cases = check_cases(inst.rank);
    if (opt.quick) cases.resize(1);
    for (auto const& c : cases) {
      failed += !check(inst, c, rng);
      ++run;
    }
  }
  return {run, failed};
}

inline void print_device() {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
}

#endif  // NATTEN_PART == 0
