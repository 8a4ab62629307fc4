// Fused neighbourhood attention forward for SM90 (TMA + wgmma, warp-specialized).
//
// One CTA per (query box, head, batch), as in the SM80 family, and the same walk: the key boxes
// covering the union of the box's query windows (starting at the union's first key, which TMA
// loads unaligned at no cost), then the additional keys. Warpgroup 0 is the producer: one
// thread issues the TMA loads of Q (once) and of K and V per step into a ring of stages, each
// guarded by a full/empty mbarrier pair (PipelineTmaAsync). The other warpgroups consume, 64
// query rows each: S = Q.K^T, the mask (fwd_mask.cuh) only on key boxes not fully inside every
// query's window, the online softmax, O += P.V. The next step's Q.K^T is issued before the current P.V, so each
// warpgroup's softmax runs while its previous P.V is on the tensor cores; optionally (kPingPong)
// the two consumers also take turns issuing their GEMMs. setmaxnreg moves the
// producer's registers to the consumers. The epilogue normalises O, stages it in the
// consumer's own slice of Q's shared memory and writes whole 16-byte pieces of each row, and
// writes the natural-log LSE.
//
// A call may compute a range of the queries (common/tile_geometry.cuh): the query boxes tile only
// its members of each dilation group, Q, O and the LSE are addressed in the range's grid, and
// windows, the key walk and the mask stay in the key grid's coordinates.
#pragma once

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "sm90/fwd_mainloop.cuh"
#include "sm90/tma_load.cuh"

namespace natten::sm90 {

// Shared memory of a query-box-stationary kernel: kQTiles tiles of the query box (Q; the dQ
// pass's Q and dO), one after the other, the first also the output's staging tile; the key and
// value stages.
template <class Config, int kQTiles = 1>
struct ForwardSmem {
  using Element = typename Config::Element;
  using Pipeline = cutlass::PipelineTmaAsync<Config::kStages>;
  cute::array_aligned<Element, Config::M * Config::D * kQTiles, 1024> q;
  cute::array_aligned<Element, Config::N * Config::D * Config::kStages, 1024> k;
  cute::array_aligned<Element, Config::N * Config::D * Config::kStages, 1024> v;
  typename Pipeline::SharedStorage k_pipe;
  typename Pipeline::SharedStorage v_pipe;
  alignas(8) uint64_t q_full;  // a transaction barrier: the query box's tiles landed
};

// The pipelines of the key and value stages and the query tiles' barrier, set up by every thread
// of the CTA (thread 0 initialises the barriers; the constructor ends with __syncthreads).
template <class Config, class Smem>
struct QueryBoxPipes {
  using Pipeline = typename Smem::Pipeline;
  Pipeline k_pipe, v_pipe;
  cutlass::arch::ClusterTransactionBarrier& q_full;
  static __device__ typename Pipeline::Params params(int warpgroup) {
    typename Pipeline::Params pipe{};
    pipe.transaction_bytes = uint32_t(Config::N * Config::D * sizeof(typename Config::Element));
    pipe.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pipe.is_leader = threadIdx.x == 0;
    pipe.num_consumers = 128 * Config::kConsumers;
    return pipe;
  }
  __device__ QueryBoxPipes(Smem& sm, int warpgroup)
      : k_pipe(sm.k_pipe, params(warpgroup), Shape<_1, _1, _1>{}),
        v_pipe(sm.v_pipe, params(warpgroup), Shape<_1, _1, _1>{}),
        q_full(*reinterpret_cast<cutlass::arch::ClusterTransactionBarrier*>(&sm.q_full)) {
    if (threadIdx.x == 0) {
      q_full.init(1);
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();
  }
};

// The epilogue's stores: this consumer warpgroup's 64 rows of `acc` (already scaled), staged in
// its own rows of the first query tile with that tile's swizzle (a 16-byte piece of a row stays
// whole; the warpgroup's last GEMM reading them has completed), then written as whole 16-byte
// pieces to `dst` rows [B, *Sq, H, dim] of the box's queries.
template <class Config, class Acc, class Cols, class Cta>
__device__ __forceinline__ void store_query_rows(Acc const& acc, Cols const& cols, typename Config::Element* stage,
                                                 typename Config::Element* dst, int dim, int consumer, int t,
                                                 Cta const& cta, Params<Config::Rank> const& p) {
  constexpr int M = Config::M, D = Config::D;
  using Element = typename Config::Element;
  auto staged = [&](int r, int c) {
    int const off = (c / kChunkCols) * M * kChunkCols + r * kChunkCols + c % kChunkCols;
    return off ^ ((off >> 3) & 0x38);
  };
  CUTE_UNROLL
  for (int v = 0; v < size(acc); v += 2) {
    int const r = get<0>(cols(v)), c = get<1>(cols(v));
    uint32_t packed;
    if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
      __nv_bfloat162 const h = __floats2bfloat162_rn(acc(v), acc(v + 1));
      packed = reinterpret_cast<uint32_t const&>(h);
    } else {
      __half2 const h = __floats2half2_rn(acc(v), acc(v + 1));
      packed = reinterpret_cast<uint32_t const&>(h);
    }
    *reinterpret_cast<uint32_t*>(stage + staged(r, c)) = packed;
  }
  asm volatile("bar.sync %0, 128;" ::"r"(1 + consumer));  // this warpgroup's rows are staged
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  CUTE_UNROLL
  for (int i = t; i < 64 * kPieces; i += 128) {
    int const r = consumer * 64 + i / kPieces, c = (i % kPieces) * 8;
    int const token = box_query_token<Config::Rank, typename Config::QTile>(p, cta.g, cta.q_origin, r);
    if (token >= 0 && c < dim) {
      int64_t const row = (int64_t(cta.b) * p.q_tokens + token) * p.heads + cta.h;
      *reinterpret_cast<uint4*>(dst + row * dim + c) = *reinterpret_cast<uint4 const*>(stage + staged(r, c));
    }
  }
}

// The mask of step n's scores s (a thread's accumulators, `cols` their coordinates): a key box not
// fully inside every query's window gets its bit mask, the last slice of the additional keys its
// columns past the end; both -inf. Moves the cursor `at` to the next step.
template <int Rank, int N, class Walk, class Mask, class S, class Cols>
__device__ __forceinline__ void mask_step(S& s, Cols const& cols, Walk const& walk, typename Walk::Cursor& at,
                                          Mask const& mask, int n, int num_extra) {
  if (n < walk.tiles) {
    int o[Rank];
    walk.origin(at, o);
    if (!walk.full(o)) mask.apply(s, at.index, -INFINITY);
  } else {
    int const left = num_extra - (n - walk.tiles) * N;
    if (left < N) mask_extra(s, cols, left, -INFINITY);
  }
  walk.advance(at);
}

// The producer thread of a query-box-stationary kernel (the forward; the backward's Hopper dQ
// pass): the query box's tiles (one per map, each into its destination, all on `q_full`) once,
// then per step of the walk the key and value boxes (or slices of the additional keys) into the
// stages of k_pipe and v_pipe.
template <class Config, int kQTiles, class Cta, class Pipeline>
__device__ __forceinline__ void produce_query_box_cta(ForwardParams<Config::Rank> const& params, Cta const& cta,
                                                      CUtensorMap const* const (&q_maps)[kQTiles],
                                                      typename Config::Element* const (&q_dst)[kQTiles],
                                                      cutlass::arch::ClusterTransactionBarrier& q_full,
                                                      Pipeline& k_pipe, Pipeline& v_pipe,
                                                      typename Config::Element* k_base,
                                                      typename Config::Element* v_base) {
  constexpr int Rank = Config::Rank;
  constexpr int M = Config::M, N = Config::N, D = Config::D, kChunks = Config::kChunks;
  using Element = typename Config::Element;
  auto const& p = params.geo;
  auto const& walk = cta.walk;
  // Dilation residue of each axis: the group's first token has coordinate `residue` there.
  int residue[Rank], pos[Rank];
  CUTE_UNROLL
  for (int a = 0; a < Rank; ++a) {
    residue[a] = (cta.g.first_token / p.axis[a].token_stride) % p.axis[a].spec.extent;
  }
  int const hb_q = cta.h + cta.b * int(p.q_tokens) * p.heads;
  int const hb_kv = cta.hk + cta.b * int(p.tokens) * p.heads_kv;
  int const hb_extra = cta.hk + cta.b * p.num_extra * p.heads_kv;
  q_full.arrive_and_expect_tx(uint32_t(kQTiles * M * D * sizeof(Element)));
  CUTE_UNROLL
  for (int a = 0; a < Rank; ++a) pos[a] = query_box_position(p, cta.g, a, cta.q_origin[a]);
  CUTE_UNROLL
  for (int i = 0; i < kQTiles; ++i) {
    CUTE_UNROLL
    for (int c = 0; c < kChunks; ++c) {
      load_box<Rank>(q_maps[i], reinterpret_cast<uint64_t*>(&q_full), q_dst[i] + c * M * kChunkCols, c * kChunkCols,
                     pos, hb_q);
    }
  }
  auto state = cutlass::make_producer_start_state<Pipeline>();
  typename KeyWalk<Rank, typename Config::QTile, typename Config::KVTile>::Cursor at;
  for (int n = 0; n < cta.steps; ++n) {
    int o[Rank];
    walk.origin(at, o);
    walk.advance(at);
    CUTE_UNROLL
    for (int a = 0; a < Rank; ++a) pos[a] = residue[a] + o[a] * p.axis[a].spec.dilation;
    int const extra_first = (n - walk.tiles) * N;
    int const stage = state.index();
    auto load_step = [&](Pipeline& pipe_, Element* base, CUtensorMap const* grid, CUtensorMap const* extra) {
      pipe_.producer_acquire(state);
      uint64_t* bar = pipe_.producer_get_barrier(state);
      CUTE_UNROLL
      for (int c = 0; c < kChunks; ++c) {
        Element* dst = base + stage * N * D + c * N * kChunkCols;
        if (n < walk.tiles) {
          load_box<Rank>(grid, bar, dst, c * kChunkCols, pos, hb_kv);
        } else {
          SM90_TMA_LOAD_3D::copy(extra, bar, kCacheNormal, dst, c * kChunkCols, extra_first, hb_extra);
        }
      }
    };
    load_step(k_pipe, k_base, &params.k_map, &params.extra_k_map);
    load_step(v_pipe, v_base, &params.v_map, &params.extra_v_map);
    ++state;
  }
}

template <class Config>
__global__ void __launch_bounds__(Config::kThreads, 1)
    fna_forward_kernel(__grid_constant__ ForwardParams<Config::Rank> const params) {
#if NATTEN_SM90_DEVICE_CODE
  constexpr int Rank = Config::Rank;
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  using Element = typename Config::Element;
  constexpr int M = Config::M, N = Config::N, D = Config::D;
  using Smem = ForwardSmem<Config>;
  using Pipeline = typename Smem::Pipeline;
  extern __shared__ __align__(1024) char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  auto const& p = params.geo;

  int const warpgroup = threadIdx.x / 128;
  QueryBoxPipes<Config, Smem> pipes(sm, warpgroup);
  auto& k_pipe = pipes.k_pipe;
  auto& v_pipe = pipes.v_pipe;

  sm80::QueryBoxCta<Rank, QTile, KVTile> cta;
  bool const active = cta.init(p);  // uniform over the CTA
  if (!active) return;
  auto const& walk = cta.walk;
  int const steps = cta.steps;

  if (warpgroup == 0) {
    if constexpr (Config::kConsumers == 2) cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x != 0) return;
    Element* const q_dst[1] = {sm.q.data()};
    CUtensorMap const* const q_maps[1] = {&params.q_map};
    produce_query_box_cta<Config>(params, cta, q_maps, q_dst, pipes.q_full, k_pipe, v_pipe, sm.k.data(),
                                  sm.v.data());
    return;
  }

  // Consumers.
  if constexpr (Config::kConsumers == 2) cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  int const ct = threadIdx.x - 128;  // thread index among the consumers
  typename Config::MmaQK mma_qk;
  typename Config::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ct);
  auto thr_pv = mma_pv.get_thread_slice(ct);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q.data()), typename Config::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(sm.k.data()), typename Config::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(sm.v.data()), typename Config::SmemLayoutVt{});
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));  // (MMA, 1, D/16)
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));  // (MMA, 1, D/16, stages)
  Tensor tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(sVt));  // (MMA, 1, N/16, stages)
  Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<M>, Int<N>>{});
  Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<M>, Int<D>>{});
  Tensor p_regs = make_tensor<Element>(Shape<Int<N / 2>>{});
  Tensor tOrP = make_tensor(p_regs.data(), typename Config::PLayout{});
  static_assert(size(acc_s) == N / 2 && size(acc_o) == D / 2, "one 64-row slice per warpgroup");
  static_assert(std::is_same_v<decltype(shape(tOrP)),
                               decltype(shape(thr_pv.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}))))>,
                "P's register view matches the A operand of P.V");
  Tensor cols_s = thr_qk.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));

  // This thread's two query rows (their tokens in the range's grid, for the epilogue) and its
  // mask of partial boxes.
  int row_token[2];
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) row_token[i] = box_query_token<Rank, QTile>(p, cta.g, cta.q_origin, get<0>(cols_s(2 * i)));
  typename Config::Mask mask;
  mask.init(p, cta.g, cta.q_origin, walk.first, get<0>(cols_s(0)), get<1>(cols_s(0)));

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, alpha[2];
  bool const fold_scale = p.scale_log2 > 0.f;
  typename KeyWalk<Rank, QTile, KVTile>::Cursor mask_at;
  // Scores of step n -> probabilities (left in acc_s) and the output rescale factors (alpha).
  auto softmax_step = [&](int n) {
    if (!fold_scale) {  // scale <= 0 reorders or flattens scores: scale before masking with -inf
      CUTE_UNROLL
      for (int v = 0; v < size(acc_s); ++v) acc_s(v) *= p.scale_log2;
    }
    mask_step<Rank, N>(acc_s, cols_s, walk, mask_at, mask, n, p.num_extra);
    online_softmax(acc_s, row_max, row_sum, alpha, fold_scale ? p.scale_log2 : 1.f);
  };

  typename Pipeline::PipelineState k_state, v_state;
  auto qk = [&]() {
    k_pipe.consumer_wait(k_state);
    warpgroup_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, k_state.index()), acc_s);
  };
  auto pv = [&]() {
    v_pipe.consumer_wait(v_state);
    warpgroup_fence_operand(tOrP);
    warpgroup_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, v_state.index()), acc_o);
  };

  // Ping-pong turns: a consumer waits for its named barrier (1 + 2 + consumer) before issuing
  // and then arrives on the other's; consumer 1 hands the first turn to consumer 0.
  int const consumer = warpgroup - 1;
  auto my_turn = [&] {
    if constexpr (Config::kPingPong) asm volatile("bar.sync %0, 256;" ::"r"(3 + consumer));
  };
  auto your_turn = [&] {
    if constexpr (Config::kPingPong) asm volatile("bar.arrive %0, 256;" ::"r"(4 - consumer));
  };
  if (consumer == 1) your_turn();

  clear(acc_o);
  pipes.q_full.wait(0);
  my_turn();
  qk();
  your_turn();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_s);  // no read of the scores may move above the wait
  k_pipe.consumer_release(k_state);
  ++k_state;
  softmax_step(0);
  to_operand(acc_s, p_regs);
  for (int n = 1; n < steps; ++n) {
    my_turn();
    qk();
    pv();
    your_turn();
    warpgroup_wait<1>();  // Q.K^T(n) is done; P.V(n - 1) may still run
    warpgroup_fence_operand(acc_s);
    k_pipe.consumer_release(k_state);
    ++k_state;
    softmax_step(n);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
    warpgroup_fence_operand(tOrP);
    v_pipe.consumer_release(v_state);
    ++v_state;
    rescale(acc_o, alpha);
    to_operand(acc_s, p_regs);
  }
  my_turn();
  pv();
  your_turn();
  if (consumer == 0) my_turn();  // takes consumer 1's last hand-over: no barrier is left half-arrived
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_o);
  v_pipe.consumer_release(v_state);

  // Epilogue: normalise; LSE from lane 0 of each quad (the quad shares a row).
  float inv[2];
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    float const l = quad_sum(row_sum[i]);
    inv[i] = l > 0.f ? 1.f / l : 0.f;
    if (ct % 4 == 0 && row_token[i] >= 0) {
      float const lse = l > 0.f ? row_max[i] * 0.6931471805599453f + logf(l) : -INFINITY;  // log2 -> ln
      p.lse[(int64_t(cta.b) * p.q_tokens + row_token[i]) * p.heads + cta.h] = lse;
    }
  }
  rescale(acc_o, inv);
  Tensor cols_o = thr_pv.partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
  store_query_rows<Config>(acc_o, cols_o, sm.q.data(), static_cast<Element*>(p.out), p.dim_v, consumer, ct % 128, cta,
                           p);
#endif
}

}  // namespace natten::sm90
