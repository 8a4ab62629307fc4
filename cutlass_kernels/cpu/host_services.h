// What the CPU kernels need from the framework that hosts them: a thread pool and a matrix
// product. Kept abstract so kernel translation units compile without framework headers (the
// torch binding implements it with at::parallel_for and the BLAS that torch links).
#pragma once

#include <cstdint>
#include <functional>

namespace natten::cpu {

class HostServices {
 public:
  virtual ~HostServices() = default;

  virtual int num_threads() const = 0;

  // Calls fn(begin, end) on disjoint sub-ranges covering [0, n), possibly concurrently.
  virtual void parallel_for(int64_t n, int64_t grain,
                            std::function<void(int64_t, int64_t)> const& fn) const = 0;

  // Row-major C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C, op = transpose if set.
  virtual void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                    float const* a, int64_t lda, float const* b, int64_t ldb, float beta,
                    float* c, int64_t ldc) const = 0;
  virtual void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                    double const* a, int64_t lda, double const* b, int64_t ldb, double beta,
                    double* c, int64_t ldc) const = 0;
};

}  // namespace natten::cpu
