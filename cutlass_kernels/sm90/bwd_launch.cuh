// Host entry of the SM90 backward: parameters and descriptors, then launches on one stream:
//   delta   rowsum(dO * O) - dLSE per (query of the range, head) into the workspace (the SM80
//           family's pass);
//   memset  dQ's float32 accumulator to zero;
//   main    the key-box-stationary kernel (bwd_kernel.cuh): dK, dV, and dQ partials added into
//           the accumulator;
//   convert the accumulator, scaled, to dQ.
// dQ's additions come from many CTAs in no fixed order, so that dQ is not bitwise reproducible
// (dK and dV are: one CTA sums each in a fixed order). A problem that asks for a deterministic
// backward (NaProblem::deterministic) runs instead
//   delta, main without dQ (DqPath::kSeparate), and the SM80 family's query-box-stationary dQ
//   kernel, which writes each dQ element from one CTA (or, with DqPath::kSeparateWgmma, the
//   Hopper dQ kernel of bwd_dq_kernel.cuh).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "sm80/fna_backward.cuh"
#include "sm80/launch.h"
#include "sm90/bwd_convert.cuh"
#include "sm90/bwd_dq_kernel.cuh"
#include "sm90/bwd_kernel.cuh"
#include "sm90/fwd_launch.cuh"

namespace natten::sm90 {

// The boxes of the deterministic path's dQ pass, per rank: with the SM80 family's dQ kernel its
// backward boxes, 64 queries against 64 keys (autogen/registry.py, SM80_OPS); with the Hopper
// dQ kernel the forward's 128-query boxes (two consumer warpgroups) against 64-key boxes, which
// keep S, dP and dQ's accumulators within the consumers' registers.
template <int Rank>
struct DqPassBoxes {
  template <class B1, class B2, class B3>
  using ByRank = std::conditional_t<Rank == 1, B1, std::conditional_t<Rank == 2, B2, B3>>;
  using Sm80Q = ByRank<Box<64>, Box<8, 8>, Box<4, 4, 4>>;
  using Sm80KV = Sm80Q;
  using WgmmaQ = ByRank<Box<128>, Box<16, 8>, Box<2, 8, 8>>;
  using WgmmaKV = ByRank<Box<64>, Box<8, 8>, Box<2, 4, 8>>;
};

// Writes d_q, d_k, d_v (and d_extra_k, d_extra_v when num_extra > 0) on `stream`; `workspace`
// holds fna_backward_workspace_floats(problem) floats (kernels.h). Throws std::invalid_argument
// for a problem this configuration cannot serve.
template <class Config, typename T>
void run_backward(NaProblem const& problem, FnaTensors const& t, float* workspace, cudaStream_t stream) {
  constexpr int Rank = Config::Rank, HeadDim = Config::D;
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  using E = typename Config::Element;
  if (Config::kWithDq && problem.deterministic) {
    // Its workspace (kernels.h) has no room for the dQ buffer.
    throw std::invalid_argument("natten sm90 fna_backward: a deterministic backward needs a separate dQ pass");
  }
  BackwardParams<Rank> const P = make_backward_params<Rank, QTile, KVTile>(problem, t, workspace, Config::kWithDq,
                                                                           HeadDim, tma_type<E>(), int(sizeof(E)));
  auto const& g = P.fwd.geo;
  if (g.batch == 0 || g.heads == 0 || g.tokens == 0) return;

  int64_t const rows = int64_t(g.batch) * g.q_tokens * g.heads;  // of q, out, d_out, d_q
  sm80::launch_backward_delta<T>(t.out, t.d_out, g.d_lse, g.delta, rows, g.dim_v, stream,
                                 "sm90 fna_backward (delta)");
  size_t const dq_floats = size_t(rows) * g.dim;
  if constexpr (Config::kWithDq) {
    cudaError_t const err = cudaMemsetAsync(P.dq_accum, 0, dq_floats * sizeof(float), stream);
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("natten sm90 fna_backward: clearing dQ failed: ") + cudaGetErrorString(err));
    }
  }

  int64_t kv_tiles = 1;
  for (int a = 0; a < Rank; ++a) kv_tiles *= int64_t(g.axis[a].kv_tiles) * g.axis[a].spec.dilation;
  int64_t const extra_slices = (int64_t(g.num_extra) + KVTile::kSize - 1) / KVTile::kSize;
  sm80::launch(fna_backward_kernel<Config>, dim3(sm80::grid_x(kv_tiles + extra_slices), g.heads_kv, g.batch),
               Config::kThreads, sizeof(BackwardSmem<Config>), stream, "sm90 fna_backward", P);

  if constexpr (Config::kWithDq) {
    int64_t const quads = int64_t(dq_floats / 4);
    int64_t const blocks = std::min<int64_t>((quads + 255) / 256, 132 * 16);
    sm80::launch(fna_backward_dq_convert_kernel<T>, dim3(unsigned(blocks)), 256, 0, stream,
                 "sm90 fna_backward (dQ convert)", static_cast<float const*>(P.dq_accum), static_cast<T*>(t.d_q),
                 quads, g.scale);
  } else if constexpr (Config::kDq == DqPath::kSeparate) {
    using Q = typename DqPassBoxes<Rank>::Sm80Q;
    using KV = typename DqPassBoxes<Rank>::Sm80KV;
    Params<Rank> dq = make_box_params<Rank, Q, KV>(problem, t, HeadDim, "sm90 fna_backward (dQ)");
    dq.delta = g.delta;
    sm80::launch_backward_dq<Rank, T, HeadDim, Q, KV>(dq, stream, "sm90 fna_backward (dQ)");
  } else {
    using Q = typename DqPassBoxes<Rank>::WgmmaQ;
    using KV = typename DqPassBoxes<Rank>::WgmmaKV;
    using Dq = DqConfig<Rank, T, HeadDim, Q, KV>;
    BackwardParams<Rank> const dq =
        make_backward_params<Rank, Q, KV>(problem, t, workspace, false, HeadDim, tma_type<E>(), int(sizeof(E)));
    int64_t q_tiles = 1;
    for (int a = 0; a < Rank; ++a) q_tiles *= int64_t(dq.fwd.geo.axis[a].q_tiles) * dq.fwd.geo.axis[a].spec.dilation;
    sm80::launch(fna_backward_dq_kernel<Dq>, dim3(sm80::grid_x(q_tiles), g.heads, g.batch), Dq::kThreads,
                 sizeof(ForwardSmem<Dq, 2>), stream, "sm90 fna_backward (dQ)", dq);
  }
}

template <int Rank, typename Element, int HeadDim, class QTile, class KVTile>
void run_fna_backward(NaProblem const& problem, FnaTensors const& t, float* workspace, cudaStream_t stream) {
  if (problem.deterministic) {
    run_backward<BackwardConfig<Rank, Element, HeadDim, QTile, KVTile, DqPath::kSeparate>, Element>(problem, t,
                                                                                                    workspace, stream);
  } else {
    run_backward<BackwardConfig<Rank, Element, HeadDim, QTile, KVTile>, Element>(problem, t, workspace, stream);
  }
}

}  // namespace natten::sm90
