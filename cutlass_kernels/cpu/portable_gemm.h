// A plain row-major matrix product: the fallback when no BLAS is reachable, and the one
// stand-alone harnesses use. Loop order i-k-j keeps the inner loop contiguous so it vectorises.
#pragma once

#include <cstdint>

namespace natten::cpu {

template <typename A>
void portable_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, A const* a,
                   int64_t lda, A const* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    A* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = beta == A(0) ? A(0) : crow[j] * beta;
    for (int64_t p = 0; p < k; ++p) {
      A const av = alpha * (ta ? a[p * lda + i] : a[i * lda + p]);
      if (tb) {
        for (int64_t j = 0; j < n; ++j) crow[j] += av * b[j * ldb + p];
      } else {
        A const* brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
      }
    }
  }
}

}  // namespace natten::cpu
