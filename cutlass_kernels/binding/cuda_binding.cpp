// The CUDA entry points of natten._C (built only with CUDA): tensors to NaProblem + raw
// pointers on the current stream, then a generated dispatch table. The reference family has its
// own entry points; every tiled family (generated tiled_families.h) shares one pair, whose
// kernel the backend looks up once per plan (find_tiled_kernel).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "binding/binding_common.h"
#include "dispatch_reference.h"
#include "tiled_families.h"

namespace natten::binding {
namespace {

cudaStream_t stream_of(at::Tensor const& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Scratch buffers of the reference kernels hold their accumulation type (reference::Acc).
at::ScalarType accumulation_type(at::Tensor const& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

using TiledForward = void(NaProblem const&, FnaTensors const&, cudaStream_t);
using TiledBackward = void(NaProblem const&, FnaTensors const&, float*, cudaStream_t);

// One instantiation of a tiled family, found by key: the forward or the backward kernel.
struct TiledKernel {
  TiledForward* forward = nullptr;
  TiledBackward* backward = nullptr;
  size_t (*backward_workspace_floats)(NaProblem const&) = nullptr;
  bool query_range = false;  // the family computes query ranges (NaProblem::q_offset)
  KernelKey key{};
  std::string name;  // "sm80 fna_fwd", for errors
};

TiledKernel find_tiled_kernel(std::string const& family, std::string const& op,
                              pybind11::dict const& key_fields) {
  for (auto const* f = dispatch::tiled_families; f->name != nullptr; ++f) {
    if (family != f->name) continue;
    TiledKernel k;
    k.key = key_from_python(key_fields);
    k.name = family + " " + op;
    k.backward_workspace_floats = f->backward_workspace_floats;
    k.query_range = f->query_range;
    if (op == "fna_fwd") {
      k.forward = find_kernel(f->fna_fwd, k.key, k.name.c_str());
    } else {
      TORCH_CHECK(op == "fna_bwd", "natten: tiled families have no op ", op);
      k.backward = find_kernel(f->fna_bwd, k.key, k.name.c_str());
    }
    return k;
  }
  TORCH_CHECK(false, "natten: this build has no tiled kernel family ", family);
}

// The kernel serves the tensors' rank and dtype: a key from a stale manifest fails here, never
// in a kernel.
void check_key(TiledKernel const& kernel, NaProblem const& p, at::Tensor const& q) {
  TORCH_CHECK(kernel.key.rank == p.rank && kernel.key.dtype == dtype_of(q), "natten: ",
              kernel.name, " kernel for ", describe(kernel.key), " called with rank ", p.rank,
              " and ", dtype_name(dtype_of(q)));
}

void tiled_fna_forward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                       std::optional<at::Tensor> extra_v, Window const& w, double scale,
                       TiledKernel const& kernel, at::Tensor out, at::Tensor lse) {
  require_dense(c10::kCUDA, {&q, &k, &v, &out, &lse});
  TORCH_CHECK(kernel.forward != nullptr, "natten: ", kernel.name, " is not a forward kernel");
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale, kernel.query_range);
  check_key(kernel, p, q);
  kernel.forward(p, t, stream_of(q));
}

void tiled_fna_backward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                        std::optional<at::Tensor> extra_v, at::Tensor out, at::Tensor lse,
                        at::Tensor d_out, std::optional<at::Tensor> d_lse, Window const& w,
                        double scale, TiledKernel const& kernel, at::Tensor d_q, at::Tensor d_k,
                        at::Tensor d_v, std::optional<at::Tensor> d_extra_k,
                        std::optional<at::Tensor> d_extra_v) {
  require_dense(c10::kCUDA, {&q, &k, &v, &out, &lse, &d_out, &d_q, &d_k, &d_v});
  TORCH_CHECK(kernel.backward != nullptr, "natten: ", kernel.name, " is not a backward kernel");
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale, kernel.query_range);
  check_key(kernel, p, q);
  add_gradients(t, d_out, d_lse, d_q, d_k, d_v, d_extra_k, d_extra_v);
  // Read per call, as torch's own operators do: a family whose fastest backward adds partial sums
  // in a varying order then takes its deterministic path (and sizes its workspace for it).
  p.deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor workspace = at::empty({static_cast<int64_t>(kernel.backward_workspace_floats(p))},
                                   q.options().dtype(at::kFloat));
  kernel.backward(p, t, workspace.data_ptr<float>(), stream_of(q));
}

void fna_forward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> extra_k,
                 std::optional<at::Tensor> extra_v, Window const& w, double scale, at::Tensor out,
                 at::Tensor lse) {
  require_dense(c10::kCUDA, {&q, &k, &v, &out, &lse});
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale, false);
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
  auto [p, t] = fused_call(q, k, v, extra_k, extra_v, out, lse, w, scale, false);
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
  auto [p, t] = qk_operands(q, k, w);
  t.rpb = ptr(rpb);
  t.out = attn.data_ptr();
  find_kernel(reference::dispatch::na_qk_fwd, p.rank, dtype_of(q), "reference qk")(p, t,
                                                                                  stream_of(q));
}

void na_qk_backward(at::Tensor d_attn, at::Tensor q, at::Tensor k, Window const& w,
                    at::Tensor d_q, at::Tensor d_k, std::optional<at::Tensor> d_rpb) {
  require_dense(c10::kCUDA, {&d_attn, &q, &k, &d_q, &d_k});
  c10::cuda::CUDAGuard guard(q.device());
  auto [p, t] = qk_operands(q, k, w);
  t.d_out = d_attn.data_ptr();
  t.d_q = d_q.data_ptr();
  t.d_k = d_k.data_ptr();
  // The bias gradient sums over batch and tokens: in the accumulation type, then converted.
  std::optional<at::Tensor> accum;
  if (d_rpb) {
    accum = at::empty({static_cast<int64_t>(reference::na_qk_backward_rpb_workspace(p))},
                      d_rpb->options().dtype(accumulation_type(q)));
  }
  find_kernel(reference::dispatch::na_qk_bwd, p.rank, dtype_of(q), "reference qk backward")(
      p, t, accum ? static_cast<float*>(accum->data_ptr()) : nullptr, stream_of(q));
  if (d_rpb) d_rpb->copy_(accum->narrow(0, 0, d_rpb->numel()).view(d_rpb->sizes()));
}

void na_av_forward(at::Tensor attn, at::Tensor v, Window const& w, at::Tensor out) {
  require_dense(c10::kCUDA, {&attn, &v, &out});
  c10::cuda::CUDAGuard guard(v.device());
  auto [p, t] = av_operands(attn, v, w);
  t.out = out.data_ptr();
  find_kernel(reference::dispatch::na_av_fwd, p.rank, dtype_of(v), "reference av")(p, t,
                                                                                  stream_of(v));
}

void na_av_backward(at::Tensor d_out, at::Tensor attn, at::Tensor v, Window const& w,
                    at::Tensor d_attn, at::Tensor d_v) {
  require_dense(c10::kCUDA, {&d_out, &attn, &v, &d_attn, &d_v});
  c10::cuda::CUDAGuard guard(v.device());
  auto [p, t] = av_operands(attn, v, w);
  t.d_out = d_out.data_ptr();
  t.d_attn = d_attn.data_ptr();
  t.d_v = d_v.data_ptr();
  find_kernel(reference::dispatch::na_av_bwd, p.rank, dtype_of(v), "reference av backward")(
      p, t, stream_of(v));
}

}  // namespace

void register_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<TiledKernel>(m, "TiledKernel")
      .def_readonly("name", &TiledKernel::name)
      .def("__repr__", [](TiledKernel const& k) { return k.name + " kernel for " + describe(k.key); });
  m.def("find_tiled_kernel", &find_tiled_kernel, py::arg("family"), py::arg("op"), py::arg("key"),
        "The kernel of a tiled family for a manifest key's fields (a miss names the key in words)");
  m.def("tiled_fna_forward", &tiled_fna_forward);
  m.def("tiled_fna_backward", &tiled_fna_backward);
  m.def("reference_fna_forward", &fna_forward);
  m.def("reference_fna_backward", &fna_backward);
  m.def("reference_na_qk_forward", &na_qk_forward);
  m.def("reference_na_qk_backward", &na_qk_backward);
  m.def("reference_na_av_forward", &na_av_forward);
  m.def("reference_na_av_backward", &na_av_backward);
}

}  // namespace natten::binding
