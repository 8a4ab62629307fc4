// The dQ pass of the SM90 backward's deterministic path on Hopper tensor cores
// (DqPath::kSeparateWgmma): query-box stationary like the forward, whose walk, loads
// (produce_query_box_cta, with dO as a second query tile), mask and row stores it shares. Per key
// box, each consumer warpgroup (64 query rows) computes
//   S = Q.K^T and dP = dO.V^T   (both operands from shared memory)
//   P = exp2(S scale log2 e - lse log2 e), from the forward's LSE, masked where invisible
//   dS = P (dP - delta)         (delta = rowsum(dO * O) - dLSE, from the delta pass)
//   dQ += dS.K                  (dS from registers, K through the transposed view P.V reads V by)
// and writes dQ times the scale once, at the end. Every dQ element has one writer, which adds its
// keys in walk order: dQ is the same bit for bit on every run.
#pragma once

#include "sm90/bwd_params.h"
#include "sm90/fwd_kernel.cuh"

namespace natten::sm90 {

// The forward's shapes and GEMMs (MmaQK serves S and dP, MmaPV serves dQ), with fewer key/value
// stages: Q and dO both stay in shared memory.
template <int Rank_, class Element_, int HeadDim, class QTile_, class KVTile_>
struct DqConfig : ForwardConfig<Rank_, Element_, HeadDim, QTile_, KVTile_> {
  using Base = ForwardConfig<Rank_, Element_, HeadDim, QTile_, KVTile_>;
  using Element = typename Base::Element;
  static constexpr int M = Base::M, N = Base::N, D = Base::D;
  static constexpr int kFreeBytes = Base::kSmemLimit - 2 * M * D * int(sizeof(Element)) - 2048;
  static constexpr int kStages = kFreeBytes / Base::kStageBytes > 4 ? 4 : kFreeBytes / Base::kStageBytes;
  static_assert(kStages >= 2, "tile shapes too large for two key/value stages next to Q and dO");
  using SmemLayoutKV = decltype(tile_to_shape(typename Base::Atom{}, Shape<Int<N>, Int<D>, Int<kStages>>{}));
  // Here K's bytes, as the (D, N) B operand of dQ += dS.K.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<D>, Int<N>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  static_assert(Base::kConsumers == 2, "128-query boxes: two consumer warpgroups");
};

template <class Config>
__global__ void __launch_bounds__(Config::kThreads, 1)
    fna_backward_dq_kernel(__grid_constant__ BackwardParams<Config::Rank> const params) {
#if NATTEN_SM90_DEVICE_CODE
  constexpr int Rank = Config::Rank;
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  using Element = typename Config::Element;
  constexpr int M = Config::M, N = Config::N, D = Config::D;
  using Smem = ForwardSmem<Config, 2>;
  using Pipeline = typename Smem::Pipeline;
  extern __shared__ __align__(1024) char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  auto const& p = params.fwd.geo;

  int const warpgroup = threadIdx.x / 128;
  QueryBoxPipes<Config, Smem> pipes(sm, warpgroup);
  auto& k_pipe = pipes.k_pipe;
  auto& v_pipe = pipes.v_pipe;

  sm80::QueryBoxCta<Rank, QTile, KVTile> cta;
  if (!cta.init(p)) return;  // uniform over the CTA
  auto const& walk = cta.walk;
  Element* const q_tile = sm.q.data();
  Element* const d_out_tile = sm.q.data() + M * D;

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x != 0) return;
    Element* const q_dst[2] = {q_tile, d_out_tile};
    CUtensorMap const* const q_maps[2] = {&params.fwd.q_map, &params.d_out_map};
    produce_query_box_cta<Config>(params.fwd, cta, q_maps, q_dst, pipes.q_full, k_pipe, v_pipe, sm.k.data(),
                                  sm.v.data());
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  int const ct = threadIdx.x - 128;  // thread index among the consumers
  int const consumer = warpgroup - 1;
  typename Config::MmaQK mma_s;
  typename Config::MmaPV mma_dq;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_dq = mma_dq.get_thread_slice(ct);
  Tensor sQ = make_tensor(make_smem_ptr(q_tile), typename Config::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(d_out_tile), typename Config::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(sm.k.data()), typename Config::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v.data()), typename Config::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(sm.k.data()), typename Config::SmemLayoutVt{});
  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));     // (MMA, 1, D/16)
  Tensor tSrdO = thr_s.make_fragment_A(thr_s.partition_A(sdO));
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));     // (MMA, 1, D/16, stages)
  Tensor tSrV = thr_s.make_fragment_B(thr_s.partition_B(sV));
  Tensor tDQrK = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));  // (MMA, 1, N/16, stages)
  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<M>, Int<D>>{});
  Tensor cols_s = thr_s.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));

  // This thread's two query rows: log2(e) * lse and delta (a row past the range's run of its
  // group, or one that saw no key, gets probabilities 0).
  float lse_log2[2], delta[2];
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    int const token = box_query_token<Rank, QTile>(p, cta.g, cta.q_origin, get<0>(cols_s(2 * i)));
    int64_t const row = (int64_t(cta.b) * p.q_tokens + token) * p.heads + cta.h;
    float const lse = token < 0 ? -INFINITY : p.lse[row];
    lse_log2[i] = lse == -INFINITY ? INFINITY : lse * 1.4426950408889634f;
    delta[i] = token < 0 ? 0.f : p.delta[row];
  }
  typename Config::Mask mask;
  mask.init(p, cta.g, cta.q_origin, walk.first, get<0>(cols_s(0)), get<1>(cols_s(0)));

  // As in the forward, the GEMM that consumes a step's registers (here dQ += dS.K) is issued
  // behind the next step's S and dP, so that the exponentials run while it is on the tensor
  // cores. k_held is the key stage that GEMM reads: released once it has completed.
  typename Pipeline::PipelineState k_state, v_state, k_held;
  typename KeyWalk<Rank, QTile, KVTile>::Cursor at;
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<M>, Int<N>>{});
  Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<M>, Int<N>>{});
  Tensor ds_regs = make_tensor<Element>(Shape<Int<N / 2>>{});
  Tensor tDQrDs = make_tensor(ds_regs.data(), typename Config::PLayout{});
  auto scores = [&]() {
    k_pipe.consumer_wait(k_state);
    warpgroup_gemm<true>(mma_s, tSrQ, tSrK(_, _, _, k_state.index()), acc_s);
    v_pipe.consumer_wait(v_state);
    warpgroup_gemm<true>(mma_s, tSrdO, tSrV(_, _, _, v_state.index()), acc_dp);
  };
  auto dq_gemm = [&]() {
    warpgroup_fence_operand(tDQrDs);
    warpgroup_gemm<false>(mma_dq, tDQrDs, tDQrK(_, _, _, k_held.index()), acc_dq);
  };
  // Once step n's S and dP have completed: dS (float32) into acc_dp; V of the step is released.
  auto gradients = [&](int n) {
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);
    v_pipe.consumer_release(v_state);
    ++v_state;
    // Scaled before the mask: a scale <= 0 would turn a masked -inf into +inf or NaN.
    CUTE_UNROLL
    for (int v = 0; v < size(acc_s); ++v) acc_s(v) *= p.scale_log2;
    mask_step<Rank, N>(acc_s, cols_s, walk, at, mask, n, p.num_extra);
    CUTE_UNROLL
    for (int v = 0; v < size(acc_s); ++v) {
      int const i = row_half(v);
      acc_dp(v) = fast_exp2(acc_s(v) - lse_log2[i]) * (acc_dp(v) - delta[i]);
    }
  };

  clear(acc_dq);
  pipes.q_full.wait(0);
  scores();
  warpgroup_wait<0>();
  gradients(0);
  to_operand(acc_dp, ds_regs);
  for (int n = 1; n < cta.steps; ++n) {
    k_held = k_state;
    ++k_state;
    scores();
    dq_gemm();
    warpgroup_wait<1>();  // S and dP of step n are done; the dQ GEMM of step n - 1 may still run
    gradients(n);         // leaves ds_regs, which that GEMM reads, alone
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dq);
    warpgroup_fence_operand(tDQrDs);
    k_pipe.consumer_release(k_held);
    to_operand(acc_dp, ds_regs);
  }
  k_held = k_state;
  dq_gemm();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_dq);
  k_pipe.consumer_release(k_held);

  CUTE_UNROLL
  for (int v = 0; v < size(acc_dq); ++v) acc_dq(v) *= p.scale;
  Tensor cols_dq = thr_dq.partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
  store_query_rows<Config>(acc_dq, cols_dq, q_tile, static_cast<Element*>(p.d_q), p.dim, consumer, ct % 128, cta, p);
#endif
}

}  // namespace natten::sm90
