// Entry points of the `sm90` family (backend "hopper-fna"): fused neighbourhood attention on
// Hopper tensor cores (wgmma, TMA), built for sm_90a only. Each (op, rank, element type, head
// dim, query box, key box) is instantiated in its own generated file; this header only declares,
// so plain C++ (the dispatch table, the binding) can include it.
//
// The ops have the signatures of every tiled family (autogen/registry.py: TILED_OPS), so the
// binding's tiled entry points serve them unchanged. Element types __half and __nv_bfloat16,
// fp32 accumulation; lse, d_lse in float32; layouts as in common/na_params.h. D and Dv must be
// multiples of 8 and at most the instantiation's head dim; tensors start on 16-byte boundaries;
// dilation at most 8 and a box extent times its dilation at most 256 on every axis (TMA limits).
// Every function launches on `stream`, returns without synchronising, and throws
// std::invalid_argument for a problem it cannot serve and std::runtime_error when a launch fails.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/na_params.h"
#include "common/tile_params.h"

namespace natten::sm90 {

// The backward's workspace: delta = rowsum(dO * O) - dLSE [B, *Sq, H], then, unless the problem
// asks for a deterministic backward (whose dQ pass writes dQ directly), dQ's float32 accumulator
// [B, *Sq, H, D] (Sq: the query range's extents, NaProblem::q_offset), whose rows are reduced into
// in 16-byte pieces (so its offset is a multiple of 4 floats).
inline int64_t fna_backward_delta_floats(NaProblem const& p) {
  return (p.batch * p.query_tokens() * p.heads + 3) / 4 * 4;
}
inline size_t fna_backward_workspace_floats(NaProblem const& p) {
  int64_t const dq_accum = p.deterministic ? 0 : p.batch * p.query_tokens() * p.heads * p.dim;
  return static_cast<size_t>(fna_backward_delta_floats(p) + dq_accum);
}

// Fused forward (writes out [B, *Sq, H, Dv] and lse [B, *Sq, H]) and backward (writes d_q, d_k, d_v,
// and d_extra_k, d_extra_v when num_extra > 0; `workspace` holds fna_backward_workspace_floats(p)
// floats). The backward's dQ is bitwise reproducible only when p.deterministic is set.
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_forward(NaProblem const& p, FnaTensors const& t, cudaStream_t stream);
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_backward(NaProblem const& p, FnaTensors const& t, float* workspace, cudaStream_t stream);

}  // namespace natten::sm90
