// Host-only check of the SM90 kernels' shared-memory layouts and register fragments (no GPU):
// compiled by nvcc (tests/test_sm90_backward_host.py), run on the host, CuTe computes every
// address.
//
// Forward: for each instantiated configuration's MmaQK and every consumer thread, score element v
// lies on row row0 + 8 * row_half(v) and column col0 + column_step(v), where (row0, col0) is
// element 0's position, col0 = 2 * (lane % 4) and row0 has bit 3 clear: what the forward's mask
// (sm90/fwd_mask.cuh) assumes and tests/cuda/sm90_forward_mask_check.cpp replays.
//
// Backward, for each shipped configuration (ranks 1-3, head dims 64 and 128, fp16 and bf16):
//
// Shared memory, writer vs. reader (byte offsets from a 1024-byte-aligned base, the swizzle
// applied to addresses as a tensor over a shared-memory pointer applies it for the GEMMs):
//   - K and V as TMA SWIZZLE_128B writes them (64-column boxes, chunk after chunk) vs. the S^T /
//     dP^T A operand view (SmemLayoutKV) and the dQ B operand view (SmemLayoutKtPiece, piece w);
//   - Q and dO per stage as TMA writes them vs. the score GEMMs' B view (SmemLayoutQ) and the dK /
//     dV GEMMs' transposed B view (SmemLayoutQt);
//   - dS^T as stage_ds writes it (ds_base_offset / ds_value_offset, for all 256 consumer threads
//     and every value, both buffers) vs. the dQ GEMM's A view (SmemLayoutDs);
//   - the epilogue's dK / dV staging (kv_tile_offset) vs. SmemLayoutKV.
// Registers:
//   - P^T / dS^T: the S^T accumulator value that the PLayout view puts in each A slot of the RS
//     GEMMs (dV += P^T.dO, dK += dS^T.Q) is the (key, query) element that slot multiplies;
//   - the S^T accumulators of the 256 consumer threads cover the (keys x queries) tile once,
//     warpgroup w holding keys 64w..64w+63; a thread's values lie on the two key rows the mask
//     reads (cols(0), cols(2)), and stage_ds's assumptions hold (pairs of adjacent queries,
//     first query < 8, other values 0/8 keys and multiples of 8 queries away);
//   - dK/dV accumulators of warpgroup w lie in its 64 key rows (the epilogue syncs per
//     warpgroup); the dQ accumulators of a warpgroup cover its 64 x kDqN partial once.
// Exit status non-zero on any mismatch.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "sm90/bwd_mainloop.cuh"
#include "sm90/fwd_mainloop.cuh"

using namespace cute;
using namespace natten;
using namespace natten::sm90;

namespace {

int bad = 0;
void expect(bool ok, char const* what, int a = 0, int b = 0, int c = 0) {
  if (!ok && bad++ < 20) std::printf("  mismatch: %s (%d, %d, %d)\n", what, a, b, c);
}

// Byte offset, from the start of a tile of `rows` rows, at which TMA (SWIZZLE_128B, boxes of 64
// 16-bit columns loaded one after the other, a 1024-byte-aligned destination) puts (r, c).
int tma_byte(int rows, int r, int c) {
  return (c / kChunkCols) * rows * 128 + r * 128 + (((c % kChunkCols) * 2) ^ ((r % 8) * 16));
}

template <class T>
struct Arena {  // a 1024-byte-aligned host buffer standing in for shared memory
  std::vector<char> raw;
  T* base;
  explicit Arena(size_t elements) : raw(elements * sizeof(T) + 1024) {
    base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw.data()) + 1023) / 1024 * 1024);
  }
  template <class Tensor_>
  int byte(Tensor_&& t) const {  // byte offset of a tensor element
    return int(reinterpret_cast<char const*>(&t) - reinterpret_cast<char const*>(base));
  }
};

template <class Config>
void check_config(char const* name) {
  using Element = typename Config::Element;
  constexpr int M = Config::M, N = Config::N, D = Config::D, S = Config::kStages;
  constexpr int kDqK = Config::kDqK, kDqN = Config::kDqN;
  int const before = bad;

  // K, V: TMA vs. SmemLayoutKV, SmemLayoutKtPiece, kv_tile_offset.
  {
    Arena<Element> a(N * D);
    Tensor sK = make_tensor(make_smem_ptr(a.base), typename Config::SmemLayoutKV{});
    Tensor sKt = make_tensor(make_smem_ptr(a.base), typename Config::SmemLayoutKtPiece{});
    for (int r = 0; r < N; ++r) {
      for (int c = 0; c < D; ++c) {
        expect(a.byte(sK(r, c)) == tma_byte(N, r, c), "K tile vs TMA", r, c);
        expect(2 * kv_tile_offset<N>(r, c) == tma_byte(N, r, c), "epilogue staging vs TMA", r, c);
      }
    }
    for (int w = 0; w < 2; ++w) {
      for (int c = 0; c < kDqN; ++c) {
        for (int k = 0; k < kDqK; ++k) {
          // Piece w: dQ columns 64w.. over all keys (head dim 128), or all columns over keys 64w..
          int const key = Config::kDqSplitsKeys ? 64 * w + k : k;
          int const col = Config::kDqSplitsKeys ? c : 64 * w + c;
          expect(a.byte(sKt(c, k, w)) == tma_byte(N, key, col), "K^T piece vs TMA", w, c, k);
        }
      }
    }
  }
  // Q, dO: TMA per stage vs. SmemLayoutQ and SmemLayoutQt.
  {
    Arena<Element> a(M * D * S);
    Tensor sQ = make_tensor(make_smem_ptr(a.base), typename Config::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(a.base), typename Config::SmemLayoutQt{});
    for (int st = 0; st < S; ++st) {
      for (int m = 0; m < M; ++m) {
        for (int d = 0; d < D; ++d) {
          int const want = st * M * D * 2 + tma_byte(M, m, d);  // the producer's (stage * D + c * 64) * M
          expect(a.byte(sQ(m, d, st)) == want, "Q tile vs TMA", st, m, d);
          expect(a.byte(sQt(d, m, st)) == want, "Q^T view vs TMA", st, m, d);
        }
      }
    }
  }
  // Registers and dS^T.
  typename Config::MmaS mma_s;
  typename Config::MmaKV mma_kv;
  typename Config::MmaDq mma_dq;
  Arena<Element> ds(2 * M * N);
  Tensor sDs = make_tensor(make_smem_ptr(ds.base), typename Config::SmemLayoutDs{});
  std::vector<int> covered(N * M, 0), ds_written(2 * M * N, 0);
  for (int ct = 0; ct < 256; ++ct) {
    int const w = ct / 128;
    auto thr_s = mma_s.get_thread_slice(ct);
    auto thr_kv = mma_kv.get_thread_slice(ct);
    Tensor cols = thr_s.partition_C(make_identity_tensor(Shape<Int<N>, Int<M>>{}));
    static_assert(decltype(size(cols))::value == M / 2);
    for (int v = 0; v < size(cols); ++v) {
      int const k = get<0>(cols(v)), q = get<1>(cols(v));
      ++covered[k * M + q];
      expect(k / 64 == w, "S^T row outside the warpgroup's keys", ct, v, k);
      // The mask (bwd_mask.cuh) and its host replay (sm90_backward_walk_check.cpp) place element
      // v at key row key0 + 8 row_half(v) and query column col0 + column_step(v).
      int const lane = ct % 32, key0 = 64 * w + 16 * (ct % 128 / 32) + lane / 4, col0 = 2 * (lane % 4);
      expect(k == key0 + 8 * row_half(v) && q == col0 + column_step(v), "mask element position", ct, v);
      if (v % 2 == 1) expect(get<0>(cols(v - 1)) == k && get<1>(cols(v - 1)) + 1 == q, "pair not adjacent", ct, v);
    }
    // PLayout: accumulator value held in A slot i vs. the element that slot multiplies.
    Tensor a_slot = thr_kv.partition_A(make_identity_tensor(Shape<Int<N>, Int<M>>{}));
    auto const playout = typename Config::PLayout{};
    static_assert(decltype(size(a_slot))::value == decltype(size(playout))::value);
    for (int i = 0; i < size(a_slot); ++i) {
      int const v = playout(i);
      expect(cols(v) == a_slot(i), "P^T register not the A slot's element", ct, i, v);
    }
    // dK/dV accumulators in the warpgroup's rows, columns in pairs.
    Tensor cols_kv = thr_kv.partition_C(make_identity_tensor(Shape<Int<N>, Int<D>>{}));
    for (int v = 0; v < size(cols_kv); ++v) {
      expect(get<0>(cols_kv(v)) / 64 == w, "dK/dV row outside the warpgroup's keys", ct, v);
      if (v % 2 == 0) expect(get<1>(cols_kv(v)) % 2 == 0 && get<1>(cols_kv(v + 1)) == get<1>(cols_kv(v)) + 1 &&
                             get<0>(cols_kv(v + 1)) == get<0>(cols_kv(v)), "dK/dV pair", ct, v);
    }
    // stage_ds: the thread's 32-bit stores vs. the dQ GEMM's A view, both buffers.
    int const key0 = get<0>(cols(0)), q0 = get<1>(cols(0));
    expect(q0 < 8 && q0 % 2 == 0, "stage_ds: first query", ct, q0);
    for (int u = 0; u < 2; ++u) {
      int const base = ds_base_offset<Config>(key0, q0, u);
      for (int i = 0; i < size(cols) / 2; ++i) {
        int const k = get<0>(cols(2 * i)), q = get<1>(cols(2 * i));
        int const dk = k - key0, dq = q - q0;
        expect((dk == 0 || dk == 8) && dq % 8 == 0 && dq >= 0 && dq < 64, "stage_ds: value spacing", ct, i);
        int const off = ds_value_offset(base, dk, dq);
        int const piece = u * Config::kDsParts + k / kDqK;
        expect(2 * off == ds.byte(sDs(q, k % kDqK, piece)), "dS^T store vs dQ A view", ct, i, u);
        expect(2 * (off + 1) == ds.byte(sDs(q + 1, k % kDqK, piece)), "dS^T store (odd query) vs dQ A view", ct, i, u);
        if (off >= 0 && off + 1 < 2 * M * N) {
          ++ds_written[off];
          ++ds_written[off + 1];
        }
      }
    }
  }
  for (int i = 0; i < N * M; ++i) expect(covered[i] == 1, "S^T element not held exactly once", i / M, i % M);
  for (int i = 0; i < 2 * M * N; ++i) expect(ds_written[i] == 1, "dS^T buffer element not written exactly once", i);
  // dQ accumulators: each warpgroup's 64 x kDqN partial once.
  std::vector<int> dq_cov(64 * kDqN, 0);
  for (int t = 0; t < 128; ++t) {
    Tensor cols_dq = mma_dq.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<kDqN>>{}));
    for (int v = 0; v < size(cols_dq); ++v) {
      int const r = get<0>(cols_dq(v)), c = get<1>(cols_dq(v));
      ++dq_cov[r * kDqN + c];
      if (v % 2 == 0) expect(c % 2 == 0 && get<1>(cols_dq(v + 1)) == c + 1 && get<0>(cols_dq(v + 1)) == r, "dQ pair", t, v);
    }
  }
  for (int i = 0; i < 64 * kDqN; ++i) expect(dq_cov[i] == 1, "dQ element not held exactly once", i / kDqN, i % kDqN);
  // The bulk reductions: 16-byte aligned staging rows and sizes.
  expect(Config::kDqPitch * 4 % 16 == 0 && kDqN * 4 % 16 == 0, "dQ staging rows not 16-byte multiples");
  std::printf("%-28s stages %d: %s\n", name, S, bad == before ? "ok" : "MISMATCH");
}


template <class Config>
void check_forward_scores(char const* name) {
  constexpr int M = Config::M, N = Config::N;
  int const before = bad;
  typename Config::MmaQK mma;
  for (int ct = 0; ct < 128 * Config::kConsumers; ++ct) {
    Tensor cols = mma.get_thread_slice(ct).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    int const row0 = get<0>(cols(0)), col0 = get<1>(cols(0));
    expect(col0 == 2 * (ct % 4) && (row0 & 8) == 0 && row0 / 64 == ct / 128, "score element 0", ct);
    for (int v = 0; v < size(cols); ++v) {
      expect(get<0>(cols(v)) == row0 + 8 * row_half(v) && get<1>(cols(v)) == col0 + column_step(v),
             "score element position", ct, v);
    }
  }
  std::printf("forward %-20s %s\n", name, bad == before ? "ok" : "MISMATCH");
}

}  // namespace

int main() {
  using bf16 = __nv_bfloat16;
  // The shipped pairs (the positions depend on the boxes' sizes only), one query box of 64 tokens
  // (one consumer) and key boxes of 64 and 256.
  check_forward_scores<ForwardConfig<1, bf16, 128, Box<128>, Box<128>>>("128/128, 16x8/16x8, 2x8x8/2x8x8");
  check_forward_scores<ForwardConfig<1, bf16, 64, Box<64>, Box<128>>>("64/128");
  check_forward_scores<ForwardConfig<1, bf16, 128, Box<128>, Box<64>>>("128/64");
  check_forward_scores<ForwardConfig<1, bf16, 64, Box<128>, Box<256>>>("128/256");
  check_config<BackwardConfig<1, __nv_bfloat16, 128, Box<64>, Box<128>>>("1-D hd128 bf16 64/128");
  check_config<BackwardConfig<1, __half, 64, Box<64>, Box<128>>>("1-D hd64 fp16 64/128");
  check_config<BackwardConfig<2, __half, 128, Box<8, 8>, Box<16, 8>>>("2-D hd128 fp16 8x8/16x8");
  check_config<BackwardConfig<2, __nv_bfloat16, 64, Box<8, 8>, Box<16, 8>>>("2-D hd64 bf16 8x8/16x8");
  check_config<BackwardConfig<3, __nv_bfloat16, 128, Box<4, 4, 4>, Box<4, 4, 8>>>("3-D hd128 bf16 4x4x4/4x4x8");
  check_config<BackwardConfig<3, __half, 64, Box<4, 4, 4>, Box<4, 4, 8>>>("3-D hd64 fp16 4x4x4/4x4x8");
  std::printf("%s: %d mismatches\n", bad == 0 ? "PASS" : "FAIL", bad);
  return bad != 0;
}
