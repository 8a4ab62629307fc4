// Fused neighbourhood attention backward for Hopper (sm_90a): the family's entry point. It
// validates the problem with the shared tile geometry (common/tile_params.h) as every tiled
// family does; the kernels themselves do not exist yet, so it then declines every problem, and the
// registry instantiates none of it (hopper-fna declines calls that need gradients).
#pragma once

#include <stdexcept>

#include "sm90/kernels.h"

namespace natten::sm90 {

template <int Rank, typename T, int HeadDim, class QBox, class KVBox>
void fna_backward(NaProblem const& problem, FnaTensors const& t, float*, cudaStream_t) {
  make_box_params<Rank, QBox, KVBox>(problem, t, HeadDim, "sm90 fna_backward");
  throw std::invalid_argument(
      "natten sm90 fna_backward: the Hopper backward kernels are not implemented yet");
}

}  // namespace natten::sm90
