// Entry points of the `sm80` family (backend "cutlass-fna"): fused neighbourhood attention on
// tensor cores through CuTe (mma.sync, cp.async) for Ampere and every later GPU. Each
// (op, rank, element type, head dim, query box, key box) is instantiated in its own generated
// file; this header only declares, so plain C++ (the dispatch table, the binding) can include it.
//
// Element types __half, __nv_bfloat16 and float (TF32 tensor cores), fp32 accumulation; lse,
// d_lse in float32. Layouts as
// in common/na_params.h. D and Dv must be multiples of 8 and at most the instantiation's head
// dim (smaller ones are zero-padded on chip). Every function launches on `stream`, returns
// without synchronising, and throws std::invalid_argument for a problem it cannot serve and
// std::runtime_error when a launch fails.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/na_params.h"
#include "common/tile_params.h"

namespace natten::sm80 {

// Fused forward: writes out [B, *Sq, H, Dv] and lse [B, *Sq, H] (Sq: the query range's
// extents, NaProblem::q_offset).
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_forward(NaProblem const& p, FnaTensors const& t, cudaStream_t stream);

// Fused backward: writes d_q, d_k, d_v (and d_extra_k, d_extra_v when num_extra > 0).
// `workspace` holds fna_backward_workspace_floats(p) floats.
template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_backward(NaProblem const& p, FnaTensors const& t, float* workspace, cudaStream_t stream);

// delta [B, Nq, H] of the backward (Nq: the query range's tokens).
inline size_t fna_backward_workspace_floats(NaProblem const& p) {
  return static_cast<size_t>(p.batch * p.query_tokens() * p.heads);
}

}  // namespace natten::sm80
