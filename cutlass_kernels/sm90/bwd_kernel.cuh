// Fused neighbourhood attention backward for SM90 (TMA + wgmma, warp-specialized): the main
// kernel, key-box stationary.
//
// One CTA per (key box or slice of additional keys, key/value head, batch entry); it walks the
// query boxes that see its keys (bwd_walk.cuh), over every query head of its GQA group, so dK and
// dV are summed in registers and written once, with no atomics. Warpgroup 0 produces: its first
// thread issues the TMA loads (K and V once, then Q and dO per step into a ring of stages), its
// second warp fills the step's table (query rows, lse, delta; a per-row gather TMA cannot
// do for a heads-last float32 tensor). A stage's full barrier waits for both, its empty barrier
// for every consumer thread. The two consumer warpgroups own 64 keys each and run the step's
// GEMMs (bwd_mainloop.cuh); each adds its dQ partial to the float32 buffer from registers
// (float2 atomics; or one bulk reduction per query row), unless dQ has a pass of its own
// (BackwardConfig's DqPath). setmaxnreg moves the producer's registers to the consumers.
// The epilogue stages dK (scaled) and dV in the K and V tiles and writes whole 16-byte pieces.
// A call computing a range of the queries (common/tile_geometry.cuh) walks only the range's
// queries; Q, dO and the step table's rows (lse, delta, dQ) are in the range's grid.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "sm90/bwd_mainloop.cuh"
#include "sm90/bwd_params.h"
#include "sm90/bwd_walk.cuh"
#include "sm90/tma_load.cuh"

namespace natten::sm90 {

template <class Config>
struct BackwardSmem {
  using Element = typename Config::Element;
  static constexpr int M = Config::M, N = Config::N, D = Config::D, kStages = Config::kStages;
  cute::array_aligned<Element, N * D, 1024> k;  // also dK's staging tile
  cute::array_aligned<Element, N * D, 1024> v;  // also dV's staging tile
  cute::array_aligned<Element, M * D * kStages, 1024> q;
  cute::array_aligned<Element, M * D * kStages, 1024> d_out;
  cute::array_aligned<Element, Config::kWithDq ? 2 * M * N : 1, 1024> ds;  // dS^T, double-buffered across steps
  cute::array_aligned<float, Config::kDq == DqPath::kBulk ? Config::kConsumers * 64 * Config::kDqPitch : 1, 128> dq;
  StepTable<Config::Rank, M> table[kStages];
  KeyTable<Config::Rank, N> keys;
  // The CTA's walk, found once by thread 0 and read by every role where it needs it: held in
  // registers it would not fit the producer's 40 (rank 3) and would take the consumers' (which
  // the accumulators need).
  KeyBoxCta<Config::Rank, typename Config::QTile, typename Config::KVTile> cta;
  int has_keys;  // KeyBoxCta::init
  alignas(8) uint64_t kv_full;  // a transaction barrier: K and V landed
  alignas(8) uint64_t full[kStages];
  alignas(8) uint64_t empty[kStages];
};

// Named barriers (0 is __syncthreads): 1 joins both consumer warpgroups, 2 + w one of them.
constexpr int kBothConsumersBarrier = 1;
__device__ __forceinline__ void sync_consumers() {
  asm volatile("bar.sync %0, 256;" ::"r"(kBothConsumersBarrier));
}
__device__ __forceinline__ void sync_warpgroup(int w) { asm volatile("bar.sync %0, 128;" ::"r"(2 + w)); }

constexpr float kLog2e = 1.4426950408889634f;

template <class Config>
__global__ void __launch_bounds__(Config::kThreads, 1)
    fna_backward_kernel(__grid_constant__ BackwardParams<Config::Rank> const params) {
#if NATTEN_SM90_DEVICE_CODE
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  using Element = typename Config::Element;
  using Smem = BackwardSmem<Config>;
  constexpr int Rank = Config::Rank, M = Config::M, N = Config::N, D = Config::D;
  constexpr int kChunks = Config::kChunks, kStages = Config::kStages;
  static_assert(sizeof(Smem) <= Config::kSmemLimit, "shared memory of the stages and tables");
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  extern __shared__ __align__(1024) char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  auto const& p = params.fwd.geo;

  int const warpgroup = threadIdx.x / 128;
  int const warp = threadIdx.x / 32;
  int const lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    FullBarrier::init(&sm.kv_full, 1);
    for (int i = 0; i < kStages; ++i) {
      FullBarrier::init(&sm.full[i], 1 + 32);  // the TMA thread and the table warp's lanes
      EmptyBarrier::init(&sm.empty[i], 128 * Config::kConsumers);
    }
    cutlass::arch::fence_barrier_init();
    sm.has_keys = sm.cta.init(p);
  }
  __syncthreads();
  if (!sm.has_keys) return;  // the key box starts past its group's end
  auto const& cta = sm.cta;

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    auto acquire = [&](int s) {
      if (s >= kStages) EmptyBarrier::wait(&sm.empty[s % kStages], ((s / kStages) - 1) & 1);
    };
    if (warp == 0 && lane == 0) {
      // Keys and values, once.
      uint32_t const kv_bytes = uint32_t(2 * N * D * sizeof(Element));
      FullBarrier::arrive_and_expect_tx(&sm.kv_full, kv_bytes);
      int pos[Rank];
      CUTE_UNROLL
      for (int a = 0; a < Rank; ++a) {
        int const residue = (cta.g.first_token / p.axis[a].token_stride) % p.axis[a].spec.extent;
        pos[a] = residue + cta.k_origin[a] * p.axis[a].spec.dilation;
      }
      int const hb_kv = cta.hk + cta.b * int(p.tokens) * p.heads_kv;
      int const hb_extra = cta.hk + cta.b * p.num_extra * p.heads_kv;
      CUTE_UNROLL
      for (int c = 0; c < kChunks; ++c) {
        Element* k_dst = sm.k.data() + c * N * kChunkCols;
        Element* v_dst = sm.v.data() + c * N * kChunkCols;
        if (cta.extra_first < 0) {
          load_box<Rank>(&params.fwd.k_map, &sm.kv_full, k_dst, c * kChunkCols, pos, hb_kv);
          load_box<Rank>(&params.fwd.v_map, &sm.kv_full, v_dst, c * kChunkCols, pos, hb_kv);
        } else {
          load_extra(&params.fwd.extra_k_map, &sm.kv_full, k_dst, c * kChunkCols, cta.extra_first, hb_extra);
          load_extra(&params.fwd.extra_v_map, &sm.kv_full, v_dst, c * kChunkCols, cta.extra_first, hb_extra);
        }
      }
      // Queries and output gradients, per step.
      uint32_t const q_bytes = uint32_t(2 * M * D * sizeof(Element));
      for (int s = 0; s < cta.steps; ++s) {  // read per step: no register holds the walk
        QueryStep<Rank> const qs = cta.step(p, s);
        int const stage = s % kStages;
        acquire(s);
        FullBarrier::arrive_and_expect_tx(&sm.full[stage], q_bytes);
        CUTE_UNROLL
        for (int a = 0; a < Rank; ++a) pos[a] = query_box_position(p, qs.g, a, qs.origin[a]);
        int const hb_q = qs.h + cta.b * int(p.q_tokens) * p.heads;
        CUTE_UNROLL
        for (int c = 0; c < kChunks; ++c) {
          int const off = (stage * D + c * kChunkCols) * M;  // stage, then chunk: SmemLayoutQ
          load_box<Rank>(&params.fwd.q_map, &sm.full[stage], sm.q.data() + off, c * kChunkCols, pos, hb_q);
          load_box<Rank>(&params.d_out_map, &sm.full[stage], sm.d_out.data() + off, c * kChunkCols, pos, hb_q);
        }
      }
    } else if (warp == 1) {
      for (int s = 0; s < cta.steps; ++s) {
        QueryStep<Rank> const qs = cta.step(p, s);
        int const stage = s % kStages;
        auto& tab = sm.table[stage];
        acquire(s);
        for (int r = lane; r < M; r += 32) {
          int const t = box_query_token<Rank, QTile>(p, qs.g, qs.origin, r);
          int64_t const i = (int64_t(cta.b) * p.q_tokens + t) * p.heads + qs.h;
          tab.row[r] = t < 0 ? -1 : i;
          tab.lse_log2[r] = t < 0 ? 0.f : p.lse[i] * kLog2e;
          tab.delta[r] = t < 0 ? 0.f : p.delta[i];
        }
        if (lane == 0) {
          tab.full = qs.full;
          CUTE_UNROLL
          for (int a = 0; a < Rank; ++a) {
            tab.origin[a] = qs.origin[a];
            tab.q_end[a] = qs.g.q_end[a];
          }
        }
        FullBarrier::arrive(&sm.full[stage]);
      }
    }
    return;
  }

  // Consumers.
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  int const steps = cta.steps;
  int const ct = threadIdx.x - 128;  // thread index among the consumers
  int const w = ct / 128;            // consumer warpgroup: keys 64 w .. 64 w + 63
  int const t = ct % 128;
  typename Config::MmaS mma_s;
  typename Config::MmaKV mma_kv;
  typename Config::MmaDq mma_dq;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_kv = mma_kv.get_thread_slice(ct);
  auto thr_dq = mma_dq.get_thread_slice(t);
  Tensor sK = make_tensor(make_smem_ptr(sm.k.data()), typename Config::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v.data()), typename Config::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(sm.q.data()), typename Config::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sm.d_out.data()), typename Config::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(sm.q.data()), typename Config::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(sm.d_out.data()), typename Config::SmemLayoutQt{});
  Tensor sDs = make_tensor(make_smem_ptr(sm.ds.data()), typename Config::SmemLayoutDs{});
  Tensor sKt = make_tensor(make_smem_ptr(sm.k.data()), typename Config::SmemLayoutKtPiece{});
  Tensor tSrK = thr_s.make_fragment_A(thr_s.partition_A(sK));      // (MMA, 1, D/16)
  Tensor tSrV = thr_s.make_fragment_A(thr_s.partition_A(sV));
  Tensor tSrQ = thr_s.make_fragment_B(thr_s.partition_B(sQ));      // (MMA, 1, D/16, stages)
  Tensor tSrdO = thr_s.make_fragment_B(thr_s.partition_B(sdO));
  Tensor tKVrQ = thr_kv.make_fragment_B(thr_kv.partition_B(sQt));  // (MMA, 1, M/16, stages)
  Tensor tKVrdO = thr_kv.make_fragment_B(thr_kv.partition_B(sdOt));
  Tensor tDQrDs = thr_dq.make_fragment_A(thr_dq.partition_A(sDs));  // (MMA, 1, kDqK/16, pieces)
  Tensor tDQrK = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));   // (MMA, 1, kDqK/16, 2)
  Tensor acc_dv = partition_fragment_C(mma_kv, Shape<Int<N>, Int<D>>{});
  Tensor acc_dk = partition_fragment_C(mma_kv, Shape<Int<N>, Int<D>>{});
  static_assert(size(acc_dk) == D / 2, "64 key rows per warpgroup");
  Tensor cols_s = thr_s.partition_C(make_identity_tensor(Shape<Int<N>, Int<M>>{}));
  Tensor cols_dq = thr_dq.partition_C(make_identity_tensor(Shape<_64, Int<Config::kDqN>>{}));

  if (ct < N) {
    int first[Rank], last[Rank];
    cta.key_queries(p, ct, first, last);
    CUTE_UNROLL
    for (int a = 0; a < Rank; ++a) {
      sm.keys.first[a][ct] = first[a];
      sm.keys.last[a][ct] = last[a];
    }
    sm.keys.row[ct] = cta.key_row(p, ct);
    if (ct == 0) sm.keys.extra = cta.extra_first >= 0;
  }
  sync_consumers();
  int const ds_piece = Config::kDqSplitsKeys ? w : 0;
  int const dq_col = Config::kDqSplitsKeys ? 0 : w * Config::kDqN;
  int const dq_bytes = 4 * max(0, min(Config::kDqN, p.dim - dq_col));
  float* const staging = Config::kDq == DqPath::kBulk ? sm.dq.data() + w * 64 * Config::kDqPitch : nullptr;
  float* const dq_accum = params.dq_accum;

  clear(acc_dv);
  clear(acc_dk);
  FullBarrier::wait(&sm.kv_full, 0);
  for (int s = 0; s < steps; ++s) {
    int const stage = s % kStages;
    auto const& tab = sm.table[stage];
    FullBarrier::wait(&sm.full[stage], (s / kStages) & 1);
    // The step's own accumulators and operands, declared per step: the GEMMs' register operands
    // are read-write to the compiler, and nothing is to carry them from one step to the next.
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<N>, Int<M>>{});
    Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<N>, Int<M>>{});
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<_64, Int<Config::kDqN>>{});
    Tensor p_regs = make_tensor<Element>(Shape<Int<M / 2>>{});
    Tensor ds_regs = make_tensor<Element>(Shape<Int<M / 2>>{});
    Tensor tKVrP = make_tensor(p_regs.data(), typename Config::PLayout{});
    Tensor tKVrDs = make_tensor(ds_regs.data(), typename Config::PLayout{});
    static_assert(size(acc_s) == M / 2, "64 key rows per warpgroup");
    static_assert(std::is_same_v<decltype(shape(tKVrP)),
                                 decltype(shape(thr_kv.partition_A(make_identity_tensor(Shape<Int<N>, Int<M>>{}))))>,
                  "P^T's register view matches the A operand of dV += P^T.dO");
    warpgroup_gemm<true>(mma_s, tSrK, tSrQ(_, _, _, stage), acc_s);
    bool const masked = !tab.full;
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    probabilities<QTile, KVTile>(acc_s, cols_s, tab, sm.keys, p.scale_log2, masked);
    // dP^T is issued only now. Issued beside S^T, so that the exponentials and the mask run while
    // it is on the tensor cores, it measured the same on P1-P3 (benchmarks/NOTES.md) and its
    // accumulators, live through the mask beside dK and dV, spill at head dim 128.
    warpgroup_gemm<true>(mma_s, tSrV, tSrdO(_, _, _, stage), acc_dp);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dp);
    score_gradients(acc_s, acc_dp, cols_s, tab);
    to_operand(acc_s, p_regs);
    to_operand(acc_dp, ds_regs);
    warpgroup_fence_operand(tKVrP);
    warpgroup_fence_operand(tKVrDs);
    warpgroup_gemm<false>(mma_kv, tKVrP, tKVrdO(_, _, _, stage), acc_dv);
    // dS^T to shared memory for dQ while dV runs, and before dK's GEMM takes ds_regs as its A
    // operand: PTX leaves any access to the A registers of a wgmma in flight undefined (until a
    // wait_group covering it), reads included. Buffer s % 2: the other warpgroup may still read
    // the previous step's, never this one's (it passed the barrier below at step s - 1 only after
    // its dQ GEMM of step s - 2 had completed).
    if constexpr (Config::kWithDq) {
      stage_ds<Config>(ds_regs, cols_s, sm.ds.data(), s & 1);
      fence_shared_async();
    }
    warpgroup_fence_operand(tKVrDs);  // the stores' reads of ds_regs stay above the GEMM
    warpgroup_gemm<false>(mma_kv, tKVrDs, tKVrQ(_, _, _, stage), acc_dk);
    if constexpr (!Config::kWithDq) {
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dv);
      warpgroup_fence_operand(acc_dk);
      warpgroup_fence_operand(tKVrP);
      warpgroup_fence_operand(tKVrDs);
      EmptyBarrier::arrive(&sm.empty[stage]);
      continue;
    }
    if constexpr (Config::kDqSplitsKeys) {
      sync_warpgroup(w);
    } else {
      sync_consumers();
    }
    warpgroup_gemm<true>(mma_dq, tDQrDs(_, _, _, (s & 1) * Config::kDsParts + ds_piece), tDQrK(_, _, _, w), acc_dq);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(acc_dq);
    warpgroup_fence_operand(tKVrP);
    warpgroup_fence_operand(tKVrDs);
    if constexpr (Config::kDq == DqPath::kAtomic) {
      // The thread's two rows of the partial (r0 and r0 + 8), read before the stage is released.
      int const r0 = get<0>(cols_dq(0));
      int64_t const rows[2] = {tab.row[r0], tab.row[r0 + 8]};
      EmptyBarrier::arrive(&sm.empty[stage]);
      CUTE_UNROLL
      for (int v = 0; v < size(acc_dq); v += 2) {
        int64_t const row = rows[row_half(v)];
        int const c = dq_col + get<1>(cols_dq(v));
        if (row >= 0 && c < p.dim) {
          atomicAdd(reinterpret_cast<float2*>(dq_accum + row * p.dim + c), make_float2(acc_dq(v), acc_dq(v + 1)));
        }
      }
      continue;
    }
    // Row t < 64 of the dQ partial is this thread's to reduce: its destination is read before the
    // stage is released, and only now, so that it does not occupy registers through the
    // elementwise work above (the step's register peak).
    int64_t const q_row = t < M ? tab.row[t] : -1;
    EmptyBarrier::arrive(&sm.empty[stage]);

    // dQ partial: staged once the previous step's reductions have read the staging rows.
    if (t < M) bulk_wait_read();
    sync_warpgroup(w);
    stage_dq<Config>(acc_dq, cols_dq, staging);
    fence_shared_async();
    sync_warpgroup(w);
    if (t < M && q_row >= 0 && dq_bytes > 0) {
      bulk_reduce_add(dq_accum + q_row * p.dim + dq_col, staging + t * Config::kDqPitch, dq_bytes);
    }
  }
  if (Config::kDq == DqPath::kBulk && t < M) bulk_wait();

  // Epilogue: K and V are free once both warpgroups are done with them (the dQ GEMM reads the
  // other warpgroup's keys). Stage with the tiles' swizzle: a 16-byte piece of a row stays whole.
  sync_consumers();
  auto staged = [&](int r, int c) { return kv_tile_offset<N>(r, c); };
  Tensor cols_kv = thr_kv.partition_C(make_identity_tensor(Shape<Int<N>, Int<D>>{}));
  CUTE_UNROLL
  for (int v = 0; v < size(acc_dk); v += 2) {
    int const r = get<0>(cols_kv(v)), c = get<1>(cols_kv(v));
    *reinterpret_cast<uint32_t*>(sm.k.data() + staged(r, c)) = pack2<Element>(acc_dk(v) * p.scale, acc_dk(v + 1) * p.scale);
    *reinterpret_cast<uint32_t*>(sm.v.data() + staged(r, c)) = pack2<Element>(acc_dv(v), acc_dv(v + 1));
  }
  sync_warpgroup(w);
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  Element* d_k = static_cast<Element*>(sm.keys.extra ? p.d_extra_k : p.d_k);
  Element* d_v = static_cast<Element*>(sm.keys.extra ? p.d_extra_v : p.d_v);
  CUTE_UNROLL
  for (int i = t; i < 64 * kPieces; i += 128) {
    int const r = w * 64 + i / kPieces, c = (i % kPieces) * 8;
    int64_t const row = sm.keys.row[r];
    if (row < 0) continue;
    if (c < p.dim) {
      *reinterpret_cast<uint4*>(d_k + row * p.dim + c) = *reinterpret_cast<uint4 const*>(sm.k.data() + staged(r, c));
    }
    if (c < p.dim_v) {
      *reinterpret_cast<uint4*>(d_v + row * p.dim_v + c) = *reinterpret_cast<uint4 const*>(sm.v.data() + staged(r, c));
    }
  }
#endif
}

}  // namespace natten::sm90
