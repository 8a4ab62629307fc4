// Host-only check of the SM80 GEMM whose A operand is the accumulators of an earlier product
// (gemm_rs): the accumulator column that acc_as_a puts in the A slots of a K index and the
// shared-memory row that SmemRowsT reads into the B slots of that K index must be the same key,
// for every thread and slot. For TF32 both follow a K order other than the natural one, so a
// mistake on either side pairs a probability with the wrong value row. Exits non-zero on any
// mismatch.
#include <cstdio>
#include <vector>

#include "sm80/mma.cuh"

using namespace cute;
using namespace natten::sm80;

template <class Traits, int M, int N>
int mismatches() {
  constexpr int D = Traits::kHeadDim;
  typename Traits::TiledMma mma;
  // Tile row of every (unswizzled) shared-memory offset of an (N, D) tile: the swizzle permutes
  // offsets within a row, so rows can be read before it.
  auto const tile = typename Traits::template SmemRows<N>{}.layout_b();
  std::vector<int> row_of(cosize(tile));
  for (int r = 0; r < N; ++r) {
    for (int d = 0; d < D; ++d) row_of[tile(r, d)] = r;
  }
  auto const rows = make_tensor(row_of.data(), typename Traits::template SmemRowsT<N>{}.layout_b());
  // K index -> accumulator column (A side) and tile row (B side), over all threads and slots.
  std::vector<int> a_key(N, -1), b_key(N, -1);
  int bad = 0;
  auto record = [&](std::vector<int>& keys, int k, int key) {
    if (keys[k] >= 0 && keys[k] != key) ++bad;  // one K index, two keys
    keys[k] = key;
  };
  for (int tid = 0; tid < Traits::kThreads; ++tid) {
    auto thr = mma.get_thread_slice(tid);
    Tensor acc = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor held = make_tensor(acc.data(), acc_as_a<Traits>(acc.layout()));  // (row, column)
    Tensor a_slot = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));  // (row, k)
    for (int i = 0; i < size(a_slot); ++i) {
      if (get<0>(held(i)) != get<0>(a_slot(i))) ++bad;
      record(a_key, get<1>(a_slot(i)), get<1>(held(i)));
    }
    Tensor b_slot = thr.partition_B(make_identity_tensor(Shape<Int<D>, Int<N>>{}));  // (d, k)
    Tensor b_row = thr.partition_B(rows);
    for (int j = 0; j < size(b_slot); ++j) record(b_key, get<1>(b_slot(j)), b_row(j));
  }
  for (int k = 0; k < N; ++k) bad += a_key[k] != b_key[k] || a_key[k] < 0;
  std::printf("%s head dim %d, %dx%d: %d mismatches\n", Traits::kTf32 ? "tf32" : "16-bit", D, M, N, bad);
  return bad;
}

int main() {
  int bad = mismatches<MmaTraits<float, 32, 4>, 64, 64>();
  bad += mismatches<MmaTraits<float, 128, 4>, 64, 32>();
  bad += mismatches<MmaTraits<float, 64, 8>, 128, 64>();
  bad += mismatches<MmaTraits<__nv_bfloat16, 64, 4>, 64, 64>();
  bad += mismatches<MmaTraits<__half, 128, 4>, 64, 64>();
  return bad != 0;
}
