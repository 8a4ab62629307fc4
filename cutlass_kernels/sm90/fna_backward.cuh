// Fused neighbourhood attention backward for Hopper (sm_90a): the family's entry point. The
// kernels are the TMA + wgmma backward of bwd_launch.cuh (design in its files and in
// benchmarks/NOTES.md); this only gives them the signature every tiled family's backward has.
#pragma once

#include "sm90/bwd_launch.cuh"
#include "sm90/kernels.h"

namespace natten::sm90 {

template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_backward(NaProblem const& problem, FnaTensors const& t, float* workspace, cudaStream_t stream) {
  run_fna_backward<Rank, T, HeadDim, QBox, KVBox>(problem, t, workspace, stream);
}

}  // namespace natten::sm90
