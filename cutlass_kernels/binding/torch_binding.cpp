// The torch binding of natten._C: the module definition, the CPU kernels' entry points and
// the window helpers. Kernel translation units never see torch headers; this file turns
// tensors into NaProblem + raw pointers and calls the generated dispatch table.
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "binding/binding_common.h"
#include "common/na_window.h"
#include "cpu/portable_gemm.h"
#include "dispatch_cpu.h"

// The BLAS that torch links (MKL on x86 wheels) exports the Fortran entry points; they are weak
// here so that a torch without them still loads and the kernels use portable_gemm instead.
extern "C" {
void sgemm_(char const*, char const*, int const*, int const*, int const*, float const*,
            float const*, int const*, float const*, int const*, float const*, float*,
            int const*) __attribute__((weak));
void dgemm_(char const*, char const*, int const*, int const*, int const*, double const*,
            double const*, int const*, double const*, int const*, double const*, double*,
            int const*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // the by-value C entry point
}

namespace natten::binding {
namespace {

class TorchHostServices final : public cpu::HostServices {
 public:
  int num_threads() const override { return at::get_num_threads(); }

  void parallel_for(int64_t n, int64_t grain,
                    std::function<void(int64_t, int64_t)> const& fn) const override {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      // torch turns MKL's dynamic threading off, so a BLAS call inside a worker would start a
      // nested team and oversubscribe the cores; each worker's calls stay on its own thread.
      int const previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
      fn(begin, end);
      if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
    });
  }

  // BLAS is column-major: a row-major product C = op(A) op(B) is the column-major product
  // C^T = op(B)^T op(A)^T over the same buffers.
  template <typename A, typename Blas>
  static void gemm_rm(Blas blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha,
                      A const* a, int64_t lda, A const* b, int64_t ldb, A beta, A* c,
                      int64_t ldc) {
    if (blas == nullptr) {
      cpu::portable_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
    char const op_a = ta ? 'T' : 'N', op_b = tb ? 'T' : 'N';
    int const im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    int const ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb);
    int const ildc = static_cast<int>(ldc);
    blas(&op_b, &op_a, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }

  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, float const* a,
            int64_t lda, float const* b, int64_t ldb, float beta, float* c,
            int64_t ldc) const override {
    gemm_rm(&sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, double const* a,
            int64_t lda, double const* b, int64_t ldb, double beta, double* c,
            int64_t ldc) const override {
    gemm_rm(&dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
};

cpu::CpuTileConfig tile_config(std::vector<int64_t> const& q_tile, int64_t kv_chunk) {
  cpu::CpuTileConfig c;
  for (size_t a = 0; a < q_tile.size(); ++a) c.q_tile[a] = q_tile[a];
  c.kv_chunk = kv_chunk;
  return c;
}

// out [B,*S,H,Dv] and lse [B,*S,H] are preallocated by the caller.
void fna_forward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                 std::optional<at::Tensor> extra_v, Window const& w, double scale,
                 std::vector<int64_t> q_tile, int64_t kv_chunk, at::Tensor out, at::Tensor lse) {
  require_dense(c10::kCPU, {&q, &k, &v, &out, &lse});
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale, true);
  auto fn = find_kernel(cpu::dispatch::fna_fwd, p.rank, dtype_of(q), "cpu fused forward");
  fn(p, t, tile_config(q_tile, kv_chunk), TorchHostServices{});
}

void fna_backward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                  std::optional<at::Tensor> extra_v, at::Tensor out, at::Tensor lse,
                  at::Tensor d_out, std::optional<at::Tensor> d_lse, Window const& w,
                  double scale, std::vector<int64_t> q_tile, int64_t kv_chunk, at::Tensor d_q,
                  at::Tensor d_k, at::Tensor d_v, std::optional<at::Tensor> d_extra_k,
                  std::optional<at::Tensor> d_extra_v) {
  require_dense(c10::kCPU, {&q, &k, &v, &out, &lse, &d_out, &d_q, &d_k, &d_v});
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale, true);
  add_gradients(t, d_out, d_lse, d_q, d_k, d_v, d_extra_k, d_extra_v);
  auto fn = find_kernel(cpu::dispatch::fna_bwd, p.rank, dtype_of(q), "cpu fused backward");
  fn(p, t, tile_config(q_tile, kv_chunk), TorchHostServices{});
}

void na_qk_forward(at::Tensor q, at::Tensor k, std::optional<at::Tensor> rpb, Window const& w,
                   at::Tensor attn) {
  require_dense(c10::kCPU, {&q, &k, &attn});
  auto [p, t] = qk_operands(q, k, w);
  t.rpb = ptr(rpb);
  t.out = attn.data_ptr();
  find_kernel(cpu::dispatch::na_qk_fwd, p.rank, dtype_of(q), "cpu qk")(p, t, TorchHostServices{});
}

void na_qk_backward(at::Tensor d_attn, at::Tensor q, at::Tensor k, Window const& w,
                    at::Tensor d_q, at::Tensor d_k, std::optional<at::Tensor> d_rpb) {
  require_dense(c10::kCPU, {&d_attn, &q, &k, &d_q, &d_k});
  auto [p, t] = qk_operands(q, k, w);
  t.d_out = d_attn.data_ptr();
  t.d_q = d_q.data_ptr();
  t.d_k = d_k.data_ptr();
  t.d_rpb = ptr(d_rpb);
  find_kernel(cpu::dispatch::na_qk_bwd, p.rank, dtype_of(q), "cpu qk backward")(
      p, t, TorchHostServices{});
}

void na_av_forward(at::Tensor attn, at::Tensor v, Window const& w, at::Tensor out) {
  require_dense(c10::kCPU, {&attn, &v, &out});
  auto [p, t] = av_operands(attn, v, w);
  t.out = out.data_ptr();
  find_kernel(cpu::dispatch::na_av_fwd, p.rank, dtype_of(v), "cpu av")(p, t, TorchHostServices{});
}

void na_av_backward(at::Tensor d_out, at::Tensor attn, at::Tensor v, Window const& w,
                    at::Tensor d_attn, at::Tensor d_v) {
  require_dense(c10::kCPU, {&d_out, &attn, &v, &d_attn, &d_v});
  auto [p, t] = av_operands(attn, v, w);
  t.d_out = d_out.data_ptr();
  t.d_attn = d_attn.data_ptr();
  t.d_v = d_v.data_ptr();
  find_kernel(cpu::dispatch::na_av_bwd, p.rank, dtype_of(v), "cpu av backward")(
      p, t, TorchHostServices{});
}

std::tuple<int64_t, int64_t, int64_t> axis_window_at(int64_t extent, int64_t kernel,
                                                     int64_t stride, int64_t dilation, bool causal,
                                                     int64_t x) {
  AxisSpec const a{extent, kernel, stride, dilation, causal};
  AxisWindow const w = axis_window(a, group_length(a, x % dilation), x / dilation);
  return {w.start, w.first, w.last};
}

// Per query tile of `tile` coordinates, dilation group by group: the keys the tile reaches and
// those all its queries see (common/na_window.h: tile_key_range), as
// (first, last, full_first, full_last) in group coordinates.
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> tile_key_ranges(
    int64_t extent, int64_t kernel, int64_t stride, int64_t dilation, bool causal, int64_t tile) {
  AxisSpec const a{extent, kernel, stride, dilation, causal};
  TORCH_CHECK(axis_is_valid(a) && tile >= 1, "natten: invalid axis or tile");
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> ranges;
  for (int64_t r = 0; r < dilation; ++r) {
    int64_t const length = group_length(a, r);
    for (int64_t x = 0; x < length; x += tile) {
      TileKeyRange const k = tile_key_range(a, length, x, std::min(x + tile, length) - 1);
      ranges.emplace_back(k.first, k.last, k.full_first, k.full_last);
    }
  }
  return ranges;
}

int64_t visible_pairs(int64_t extent, int64_t kernel, int64_t stride, int64_t dilation,
                      bool causal) {
  return axis_visible_pairs(AxisSpec{extent, kernel, stride, dilation, causal});
}

}  // namespace
}  // namespace natten::binding

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace natten::binding;
  namespace py = pybind11;
  py::class_<Window>(m, "Window")
      .def(py::init([](std::vector<int64_t> k, std::vector<int64_t> s, std::vector<int64_t> d,
                       std::vector<bool> c, std::vector<int64_t> q_offset) {
             return Window{k, s, d, c, q_offset};
           }),
           py::arg("kernel_size"), py::arg("stride"), py::arg("dilation"), py::arg("is_causal"),
           py::arg("q_offset") = std::vector<int64_t>{});
  m.def("cpu_fna_forward", &fna_forward);
  m.def("cpu_fna_backward", &fna_backward);
  m.def("cpu_na_qk_forward", &na_qk_forward);
  m.def("cpu_na_qk_backward", &na_qk_backward);
  m.def("cpu_na_av_forward", &na_av_forward);
  m.def("cpu_na_av_backward", &na_av_backward);
  m.def("axis_window", &axis_window_at, py::arg("extent"), py::arg("kernel"), py::arg("stride"),
        py::arg("dilation"), py::arg("causal"), py::arg("x"),
        "(start, first, last) of the window of coordinate x, in dilation-group coordinates");
  m.def("tile_key_ranges", &tile_key_ranges, py::arg("extent"), py::arg("kernel"),
        py::arg("stride"), py::arg("dilation"), py::arg("causal"), py::arg("tile"),
        "(first, last, full_first, full_last) keys of every query tile, dilation group by group");
  m.def("axis_visible_pairs", &visible_pairs, py::arg("extent"), py::arg("kernel"),
        py::arg("stride"), py::arg("dilation"), py::arg("causal"),
        "visible (query, key) pairs along one axis, summed over its queries");
#ifdef NATTEN_WITH_CUDA
  register_cuda(m);
#endif
  m.attr("with_cuda") = py::bool_(
#ifdef NATTEN_WITH_CUDA
      true
#else
      false
#endif
  );
}
