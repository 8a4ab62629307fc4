// The CUDA entry points of natten._C (built only with CUDA): tensors to NaProblem + raw
// pointers on the current stream, then the generated dispatch table of the kernel family.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "binding/binding_common.h"
#include "dispatch_reference.h"
#if __has_include("dispatch_sm80.h")
#define NATTEN_WITH_SM80
#include "dispatch_sm80.h"
#endif

namespace natten::binding {
namespace {

cudaStream_t stream_of(at::Tensor const& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Scratch buffers of the reference kernels hold their accumulation type (reference::Acc).
at::ScalarType accumulation_type(at::Tensor const& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void fna_forward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                 std::optional<at::Tensor> extra_v, Window const& w, double scale, at::Tensor out,
                 at::Tensor lse) {
  require_dense(c10::kCUDA, {&q, &k, &v, &out, &lse});
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale);
  auto fn = find_kernel(reference::dispatch::fna_fwd, p.rank, dtype_of(q), "reference forward");
  fn(p, t, stream_of(q));
}

void fna_backward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                  std::optional<at::Tensor> extra_v, at::Tensor out, at::Tensor lse,
                  at::Tensor d_out, std::optional<at::Tensor> d_lse, Window const& w,
                  double scale, at::Tensor d_q, at::Tensor d_k, at::Tensor d_v,
                  std::optional<at::Tensor> d_extra_k, std::optional<at::Tensor> d_extra_v) {
  require_dense(c10::kCUDA, {&q, &k, &v, &out, &lse, &d_out, &d_q, &d_k, &d_v});
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale);
  add_gradients(t, d_out, d_lse, d_q, d_k, d_v, d_extra_k, d_extra_v);
  at::Tensor workspace = at::empty({static_cast<int64_t>(reference::fna_backward_workspace_floats(p))},
                                   q.options().dtype(accumulation_type(q)));
  auto fn = find_kernel(reference::dispatch::fna_bwd, p.rank, dtype_of(q), "reference backward");
  fn(p, t, static_cast<float*>(workspace.data_ptr()), stream_of(q));
}

void na_qk_forward(at::Tensor q, at::Tensor k, std::optional<at::Tensor> rpb, Window const& w,
                   at::Tensor attn) {
  require_dense(c10::kCUDA, {&q, &k, &attn});
  c10::cuda::CUDAGuard guard(q.device());
  auto const [p, t] = qk_call(q, k, rpb, attn, w);
  find_kernel(reference::dispatch::na_qk_fwd, p.rank, dtype_of(q), "reference qk")(p, t,
                                                                                  stream_of(q));
}

void na_qk_backward(at::Tensor d_attn, at::Tensor q, at::Tensor k, Window const& w,
                    at::Tensor d_q, at::Tensor d_k, std::optional<at::Tensor> d_rpb) {
  require_dense(c10::kCUDA, {&d_attn, &q, &k, &d_q, &d_k});
  c10::cuda::CUDAGuard guard(q.device());
  auto const [p, t] = qk_backward_call(d_attn, q, k, d_q, d_k, w);
  // The bias gradient sums over batch and tokens: accumulate in the accumulation type, then
  // convert.
  std::optional<at::Tensor> accum;
  if (d_rpb) accum = at::zeros(d_rpb->sizes(), d_rpb->options().dtype(accumulation_type(q)));
  find_kernel(reference::dispatch::na_qk_bwd, p.rank, dtype_of(q), "reference qk backward")(
      p, t, accum ? static_cast<float*>(accum->data_ptr()) : nullptr, stream_of(q));
  if (d_rpb) d_rpb->copy_(*accum);
}

void na_av_forward(at::Tensor attn, at::Tensor v, Window const& w, at::Tensor out) {
  require_dense(c10::kCUDA, {&attn, &v, &out});
  c10::cuda::CUDAGuard guard(v.device());
  auto const [p, t] = av_call(attn, v, out, w);
  find_kernel(reference::dispatch::na_av_fwd, p.rank, dtype_of(v), "reference av")(p, t,
                                                                                  stream_of(v));
}

void na_av_backward(at::Tensor d_out, at::Tensor attn, at::Tensor v, Window const& w,
                    at::Tensor d_attn, at::Tensor d_v) {
  require_dense(c10::kCUDA, {&d_out, &attn, &v, &d_attn, &d_v});
  c10::cuda::CUDAGuard guard(v.device());
  auto const [p, t] = av_backward_call(d_out, attn, v, d_attn, d_v, w);
  find_kernel(reference::dispatch::na_av_bwd, p.rank, dtype_of(v), "reference av backward")(
      p, t, stream_of(v));
}

#ifdef NATTEN_WITH_SM80
// Tiled families: (rank, dtype, head dim, query box, key box) -> function.
template <typename Entry>
auto find_tiled_kernel(Entry const* table, NaProblem const& p, DType dtype, int64_t head_dim,
                       std::vector<int64_t> const& q_tile, std::vector<int64_t> const& kv_tile,
                       char const* what) {
  auto same = [&](int const* box, std::vector<int64_t> const& want) {
    for (int a = 0; a < 3; ++a) {
      if (box[a] != (a < p.rank ? want.at(a) : 1)) return false;
    }
    return true;
  };
  for (; table->fn != nullptr; ++table) {
    if (table->rank == p.rank && table->dtype == dtype && table->head_dim == head_dim &&
        same(table->q_tile, q_tile) && same(table->kv_tile, kv_tile)) {
      return table->fn;
    }
  }
  TORCH_CHECK(false, "natten: this build has no ", what, " kernel for rank ", p.rank, ", dtype ",
              static_cast<int>(dtype), ", head dim ", head_dim, " and these tile shapes");
}

void sm80_fna_forward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                      std::optional<at::Tensor> extra_v, Window const& w, double scale,
                      int64_t head_dim, std::vector<int64_t> q_tile, std::vector<int64_t> kv_tile,
                      at::Tensor out, at::Tensor lse) {
  require_dense(c10::kCUDA, {&q, &k, &v, &out, &lse});
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale);
  auto fn = find_tiled_kernel(sm80::dispatch::fna_fwd, p, dtype_of(q), head_dim, q_tile, kv_tile,
                              "sm80 forward");
  fn(p, t, stream_of(q));
}

void sm80_fna_backward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                       std::optional<at::Tensor> extra_v, at::Tensor out, at::Tensor lse,
                       at::Tensor d_out, std::optional<at::Tensor> d_lse, Window const& w,
                       double scale, int64_t head_dim, std::vector<int64_t> q_tile,
                       std::vector<int64_t> kv_tile, at::Tensor d_q, at::Tensor d_k, at::Tensor d_v,
                       std::optional<at::Tensor> d_extra_k, std::optional<at::Tensor> d_extra_v) {
  require_dense(c10::kCUDA, {&q, &k, &v, &out, &lse, &d_out, &d_q, &d_k, &d_v});
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale);
  add_gradients(t, d_out, d_lse, d_q, d_k, d_v, d_extra_k, d_extra_v);
  at::Tensor workspace = at::empty({static_cast<int64_t>(sm80::fna_backward_workspace_floats(p))},
                                   q.options().dtype(at::kFloat));
  auto fn = find_tiled_kernel(sm80::dispatch::fna_bwd, p, dtype_of(q), head_dim, q_tile, kv_tile,
                              "sm80 backward");
  fn(p, t, workspace.data_ptr<float>(), stream_of(q));
}
#endif

}  // namespace

void register_cuda(pybind11::module_& m) {
#ifdef NATTEN_WITH_SM80
  m.def("sm80_fna_forward", &sm80_fna_forward);
  m.def("sm80_fna_backward", &sm80_fna_backward);
#endif
  m.def("reference_fna_forward", &fna_forward);
  m.def("reference_fna_backward", &fna_backward);
  m.def("reference_na_qk_forward", &na_qk_forward);
  m.def("reference_na_qk_backward", &na_qk_backward);
  m.def("reference_na_av_forward", &na_av_forward);
  m.def("reference_na_av_backward", &na_av_backward);
}

}  // namespace natten::binding
