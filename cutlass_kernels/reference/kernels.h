// Entry points of the `reference` backend: plain CUDA kernels (no tensor cores) for every GPU
// from SM75, the always-correct fallback of the GPU families. Each (op, rank, element type)
// is instantiated in its own generated file; this header only declares, so a plain C++
// translation unit (the dispatch table, the binding) can include it.
//
// Element types: float, double, __half, __nv_bfloat16. Accumulation, softmax statistics, lse,
// d_lse and the scratch buffers are of the accumulation type Acc<T>: double for double, float
// for the rest. Layouts as in common/na_params.h. Head dims D, Dv up to 512.
// Every function launches on `stream`, returns without synchronising, and throws
// std::invalid_argument for a problem it cannot serve and std::runtime_error when a launch
// fails.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/na_params.h"

namespace natten::reference {

// Largest head dim (D and Dv) the kernels hold in registers: 32 lanes x 16 elements.
constexpr int64_t kMaxHeadDim = 512;

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Fused forward: writes out [B, *S, H, Dv] and lse [B, *S, H].
template <int Rank, typename T>
void fna_forward(NaProblem const& p, FnaTensors const& t, cudaStream_t stream);

// Fused backward: writes d_q, d_k, d_v (and d_extra_k, d_extra_v when num_extra > 0).
// `workspace` holds fna_backward_workspace_floats(p) elements of Acc<T> (the dispatch
// signature types it float* for every T); it need not be zeroed.
template <int Rank, typename T>
void fna_backward(NaProblem const& p, FnaTensors const& t, float* workspace,
                  cudaStream_t stream);

// Number of slices the queries are split into for the gradients of the additional keys and
// values (every query sees every additional key, so one warp per key would walk all N
// queries alone). A function of the problem only, so results do not depend on the GPU.
inline int64_t fna_backward_extra_splits(NaProblem const& p) {
  if (p.num_extra <= 0) return 0;
  int64_t const warps = p.batch * p.num_extra * p.heads_kv;  // warps without splitting
  int64_t const wanted = (16384 + warps - 1) / (warps > 0 ? warps : 1);
  int64_t const by_tokens = (p.tokens() + 255) / 256;  // at least 256 queries a slice
  int64_t s = wanted < by_tokens ? wanted : by_tokens;
  s = s < 64 ? s : 64;
  return s < 1 ? 1 : s;
}

// Workspace of fna_backward, in elements of Acc<T>: delta [B, N, H], then, when the additional
// keys are split over several slices, per-slice partial gradients [splits, B, E, Hkv, D + Dv].
inline size_t fna_backward_workspace_floats(NaProblem const& p) {
  int64_t n = p.batch * p.tokens() * p.heads;
  int64_t const splits = fna_backward_extra_splits(p);
  if (splits > 1) n += splits * p.batch * p.num_extra * p.heads_kv * (p.dim + p.dim_v);
  return static_cast<size_t>(n);
}

// Unfused: attn = q.k^T over each window (+ rpb), -inf at invisible offsets, no scaling.
template <int Rank, typename T>
void na_qk_forward(NaProblem const& p, NaUnfusedTensors const& t, cudaStream_t stream);

// Slices the (batch, token) rows are split into for the bias gradient (a sum over all of them
// per head and bias entry): enough warps to fill a GPU, at least 1024 rows a slice. A function of
// the problem only, so results do not depend on the GPU.
inline int64_t na_qk_backward_rpb_splits(NaProblem const& p) {
  int64_t const entries = p.heads * p.rpb_size();
  int64_t const wanted = (16384 + entries - 1) / (entries > 0 ? entries : 1);
  int64_t const by_rows = (p.batch * p.tokens() + 1023) / 1024;
  int64_t s = wanted < by_rows ? wanted : by_rows;
  s = s < 256 ? s : 256;
  return s < 1 ? 1 : s;
}
inline size_t na_qk_backward_rpb_workspace(NaProblem const& p) {
  return static_cast<size_t>(na_qk_backward_rpb_splits(p) * p.heads * p.rpb_size());
}

// Gradients of na_qk_forward: t.d_out holds d_attn; writes t.d_q and t.d_k. When
// `rpb_workspace` is not null (na_qk_backward_rpb_workspace(p) elements of Acc<T>, typed float*
// by the dispatch signature; need not be zeroed), the bias gradient [H, 2k_1-1, ...] is left in
// its first elements, in Acc<T>; the caller converts it into t.d_rpb's type (t.d_rpb is not
// read).
template <int Rank, typename T>
void na_qk_backward(NaProblem const& p, NaUnfusedTensors const& t, float* rpb_workspace,
                    cudaStream_t stream);

// Unfused: out = attn.v over each window (invisible offsets skipped, whatever they hold).
template <int Rank, typename T>
void na_av_forward(NaProblem const& p, NaUnfusedTensors const& t, cudaStream_t stream);

// Gradients of na_av_forward: t.d_out holds d_out; writes t.d_attn (0 at invisible offsets)
// and t.d_v.
template <int Rank, typename T>
void na_av_backward(NaProblem const& p, NaUnfusedTensors const& t, cudaStream_t stream);

}  // namespace natten::reference
