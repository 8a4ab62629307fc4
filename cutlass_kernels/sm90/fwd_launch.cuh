// Host entry of the SM90 forward: parameters and descriptors, then the launch.
#pragma once

#include <cuda_runtime.h>

#include "sm80/launch.h"
#include "sm90/fwd_kernel.cuh"

namespace natten::sm90 {

template <class Element>
constexpr CUtensorMapDataType tma_type() {
  return std::is_same_v<Element, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                       : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// Writes out [B, *Sq, H, Dv] and lse [B, *Sq, H] (float32, natural log; Sq the query range's
// extents, NaProblem::q_offset) on `stream`; throws
// std::invalid_argument for a problem this configuration cannot serve.
template <class Config>
void run_forward(NaProblem const& problem, FnaTensors const& t, cudaStream_t stream) {
  constexpr int Rank = Config::Rank, HeadDim = Config::D;
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  using E = typename Config::Element;
  ForwardParams<Rank> const P =
      make_forward_params<Rank, QTile, KVTile>(problem, t, HeadDim, tma_type<E>(), int(sizeof(E)));
  auto const& g = P.geo;
  if (g.batch == 0 || g.heads == 0 || g.tokens == 0) return;
  int64_t q_tiles = 1;
  for (int a = 0; a < Rank; ++a) q_tiles *= int64_t(g.axis[a].q_tiles) * g.axis[a].spec.dilation;
  sm80::launch(fna_forward_kernel<Config>, dim3(sm80::grid_x(q_tiles), g.heads, g.batch), Config::kThreads,
               sizeof(ForwardSmem<Config>), stream, "sm90 fna_forward", P);
}

// Two consumer warpgroups (128-query boxes) take turns on the tensor cores: on an H200 that was
// 14% faster on P2, 2% on P3 and even on P1 (benchmarks/NOTES.md, hopper-fna forward v2).
template <int Rank, typename Element, int HeadDim, class QTile, class KVTile>
void run_fna_forward(NaProblem const& problem, FnaTensors const& t, cudaStream_t stream) {
  run_forward<ForwardConfig<Rank, Element, HeadDim, QTile, KVTile, QTile::kSize == 128>>(problem, t, stream);
}

}  // namespace natten::sm90
