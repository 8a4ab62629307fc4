// Fused neighbourhood attention forward for Hopper (sm_90a): the family's entry point. The
// kernel is the TMA + wgmma forward of fwd_launch.cuh (design in its files and in
// benchmarks/NOTES.md); this only gives it the signature every tiled family's forward has.
#pragma once

#include "sm90/fwd_launch.cuh"
#include "sm90/kernels.h"

namespace natten::sm90 {

template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_forward(NaProblem const& problem, FnaTensors const& t, cudaStream_t stream) {
  run_fna_forward<Rank, T, HeadDim, QBox, KVBox>(problem, t, stream);
}

}  // namespace natten::sm90
