// Helpers shared by the torch binding translation units: tensors to NaProblem, dtype mapping
// and dispatch-table lookups. Argument validation happens in Python (natten/_checks.py)
// before any of this is reached; the TORCH_CHECKs guard the binding's own contract.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <utility>
#include <vector>

#include "common/na_params.h"
#include "kernel_key.h"

namespace natten::binding {

inline DType dtype_of(at::Tensor const& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "natten: unsupported dtype ", t.scalar_type());
  }
}

// Window parameters as passed from Python: one entry per axis. q_offset, per axis or empty
// (all zero), places the query tensor's rows in the key grid (NaProblem::q_offset); fused calls
// only.
struct Window {
  std::vector<int64_t> kernel, stride, dilation;
  std::vector<bool> causal;
  std::vector<int64_t> q_offset;
};

// Problem of a heads-last query-like tensor [B, *S, H, D] and a key-like one [B, *S, Hkv, *]
// (the grid is the key's).
inline NaProblem make_problem(at::Tensor const& q, at::Tensor const& kv, int64_t dim_v,
                              Window const& w) {
  int const rank = static_cast<int>(w.kernel.size());
  TORCH_CHECK(rank >= 1 && rank <= 3 && q.dim() == rank + 3 && kv.dim() == rank + 3,
              "natten: bad rank");
  NaProblem p;
  p.rank = rank;
  for (int a = 0; a < rank; ++a) {
    p.axis[a] = {kv.size(1 + a), w.kernel[a], w.stride[a], w.dilation[a],
                 static_cast<bool>(w.causal[a])};
  }
  p.batch = q.size(0);
  p.heads = q.size(rank + 1);
  p.dim = q.size(rank + 2);
  p.heads_kv = kv.size(rank + 1);
  p.dim_v = dim_v;
  return p;
}

inline void require_dense(c10::DeviceType device, std::initializer_list<at::Tensor const*> ts) {
  for (auto const* t : ts) {
    TORCH_CHECK(t->device().type() == device && t->is_contiguous(),
                "natten: expected dense tensors on ", device);
  }
}

inline void* ptr(std::optional<at::Tensor> const& t) { return t ? t->data_ptr() : nullptr; }

// The function of a generated dispatch table (tables end in a null entry) for a key; a miss
// names the family, the op and the key in words.
template <typename Fn>
Fn* find_kernel(KernelEntry<Fn> const* table, KernelKey const& key, char const* what) {
  for (; table->fn != nullptr; ++table) {
    if (same_key(table->key, key)) return table->fn;
  }
  TORCH_CHECK(false, "natten: this build has no ", what, " kernel for ", describe(key),
              " (see NATTEN_KERNEL_FILTER)");
}

// Families without tiles: their key is the rank and the dtype.
template <typename Fn>
Fn* find_kernel(KernelEntry<Fn> const* table, int rank, DType dtype, char const* what) {
  return find_kernel(table, KernelKey{rank, dtype}, what);
}

// Problem and pointers of a fused call; the backward adds its gradients to the result. The
// query tensor's extents and w.q_offset give the query range; a family whose kernels compute
// only whole grids passes query_range = false, which guards that contract (Python's backends
// decline ranges for it first).
inline std::pair<NaProblem, FnaTensors> fused_call(
    at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
    std::optional<at::Tensor> const& extra_k, std::optional<at::Tensor> const& extra_v,
    at::Tensor const& out, at::Tensor const& lse, Window const& w, double scale,
    bool query_range) {
  NaProblem p = make_problem(q, k, v.size(-1), w);
  TORCH_CHECK(w.q_offset.empty() || static_cast<int>(w.q_offset.size()) == p.rank,
              "natten: q_offset needs one entry per axis");
  for (int a = 0; a < p.rank; ++a) {
    p.q_offset[a] = w.q_offset.empty() ? 0 : w.q_offset[a];
    p.q_extent[a] = q.size(1 + a);
    TORCH_CHECK(p.q_offset[a] >= 0 && p.q_offset[a] + p.q_extent[a] <= p.axis[a].extent,
                "natten: the query range leaves the key grid on axis ", a);
  }
  TORCH_CHECK(query_range || p.whole_queries(),
              "natten: these kernels compute every query of the grid, not a range");
  p.scale = scale;
  p.num_extra = extra_k ? extra_k->size(1) : 0;
  FnaTensors t;
  t.q = q.data_ptr();
  t.k = k.data_ptr();
  t.v = v.data_ptr();
  t.extra_k = ptr(extra_k);
  t.extra_v = ptr(extra_v);
  t.out = out.data_ptr();
  t.lse = lse.data_ptr();
  return {p, t};
}

inline void add_gradients(FnaTensors& t, at::Tensor const& d_out,
                          std::optional<at::Tensor> const& d_lse, at::Tensor const& d_q,
                          at::Tensor const& d_k, at::Tensor const& d_v,
                          std::optional<at::Tensor> const& d_extra_k,
                          std::optional<at::Tensor> const& d_extra_v) {
  t.d_out = d_out.data_ptr();
  t.d_lse = ptr(d_lse);
  t.d_q = d_q.data_ptr();
  t.d_k = d_k.data_ptr();
  t.d_v = d_v.data_ptr();
  t.d_extra_k = ptr(d_extra_k);
  t.d_extra_v = ptr(d_extra_v);
}

// Problems of the unfused ops with their operands' pointers; each entry point adds its outputs
// (and the gradients it reads). attn [B,*S,H,K] plays the query's role in av's problem shape
// (its last dim is not D).
inline std::pair<NaProblem, NaUnfusedTensors> qk_operands(at::Tensor const& q, at::Tensor const& k,
                                                          Window const& w) {
  NaUnfusedTensors t;
  t.q = q.data_ptr();
  t.k = k.data_ptr();
  return {make_problem(q, k, k.size(-1), w), t};
}

inline std::pair<NaProblem, NaUnfusedTensors> av_operands(at::Tensor const& attn, at::Tensor const& v,
                                                          Window const& w) {
  NaProblem p = make_problem(attn, v, v.size(-1), w);
  p.dim = v.size(-1);
  NaUnfusedTensors t;
  t.attn = attn.data_ptr();
  t.v = v.data_ptr();
  return {p, t};
}

// CUDA functions of the module, defined in cuda_binding.cpp when built with CUDA.
void register_cuda(pybind11::module_& m);

}  // namespace natten::binding
