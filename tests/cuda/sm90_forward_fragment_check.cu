// Host-only check (nvcc, CuTe computes every coordinate; no GPU) of what the SM90 forward's mask
// (sm90/fwd_mask.cuh) and the kernel assume of the score accumulators of Q.K^T: for each
// instantiated configuration's MmaQK and every consumer thread, element v lies on row
// row0 + 8 * row_half(v) and column col0 + column_step(v), where (row0, col0) is element 0's
// position, col0 = 2 * (lane % 4) and row0 has bit 3 clear (BitMask's row sharing needs it).
// tests/cuda/sm90_forward_mask_check.cpp replays the masks on exactly these positions.
// Exit status non-zero on any mismatch.
#include <cstdio>

#include "sm90/fwd_mainloop.cuh"

using namespace cute;
using namespace natten;
using namespace natten::sm90;

namespace {

int bad = 0;

template <class Config>
void check(char const* name) {
  constexpr int M = Config::M, N = Config::N;
  int const before = bad;
  typename Config::MmaQK mma;
  for (int ct = 0; ct < 128 * Config::kConsumers; ++ct) {
    Tensor cols = mma.get_thread_slice(ct).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    int const row0 = get<0>(cols(0)), col0 = get<1>(cols(0));
    bool ok = col0 == 2 * (ct % 4) && (row0 & 8) == 0 && row0 / 64 == ct / 128;
    for (int v = 0; v < size(cols); ++v) {
      ok = ok && get<0>(cols(v)) == row0 + 8 * row_half(v) && get<1>(cols(v)) == col0 + column_step(v);
    }
    if (!ok && bad++ < 20) std::printf("  mismatch: %s thread %d\n", name, ct);
  }
  std::printf("%-24s %s\n", name, bad == before ? "ok" : "MISMATCH");
}

}  // namespace

int main() {
  using bf16 = __nv_bfloat16;
  check<ForwardConfig<1, bf16, 128, Box<128>, Box<128>>>("1-D 128/128");
  check<ForwardConfig<1, bf16, 128, Box<128>, Box<64>>>("1-D 128/64");
  check<ForwardConfig<1, bf16, 64, Box<64>, Box<128>>>("1-D 64/128");
  check<ForwardConfig<1, bf16, 64, Box<128>, Box<256>>>("1-D 128/256");
  check<ForwardConfig<2, bf16, 128, Box<16, 8>, Box<16, 8>>>("2-D 16x8/16x8");
  check<ForwardConfig<2, bf16, 128, Box<16, 8>, Box<8, 8>>>("2-D 16x8/8x8");
  check<ForwardConfig<3, bf16, 128, Box<2, 8, 8>, Box<2, 8, 8>>>("3-D 2x8x8/2x8x8");
  check<ForwardConfig<3, bf16, 128, Box<4, 4, 8>, Box<4, 4, 4>>>("3-D 4x4x8/4x4x4");
  std::printf("%s: %d mismatches\n", bad == 0 ? "PASS" : "FAIL", bad);
  return bad != 0;
}
