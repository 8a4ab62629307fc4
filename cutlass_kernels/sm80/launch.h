// Host side of every SM80 launch: grid limits, the shared-memory opt-in above 48 KiB, and
// launch errors turned into exceptions (the binding reports them as Python errors).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace natten::sm80 {

inline unsigned grid_x(int64_t n) {
  if (n > INT32_MAX) throw std::invalid_argument("natten sm80: problem needs more than 2^31 tiles");
  return static_cast<unsigned>(n);
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
            char const* what, Args const&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (grid.y > 65535 || grid.z > 65535) {
    throw std::invalid_argument(std::string("natten sm80 ") + what +
                                ": heads and batch must each be at most 65535");
  }
  cudaError_t err = cudaSuccess;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
  }
  if (err == cudaSuccess) {
    kernel<<<grid, threads, smem, stream>>>(args...);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("natten sm80 ") + what + ": launch failed: " +
                             cudaGetErrorString(err));
  }
}

}  // namespace natten::sm80
