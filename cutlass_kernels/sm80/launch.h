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
    // Consumer Ampere/Ada parts offer ~99 KiB per block against 163-227 KiB on A100/H100: say
    // so instead of failing the launch.
    int device = 0, limit = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (err == cudaSuccess && smem > static_cast<size_t>(limit)) {
      throw std::invalid_argument(
          std::string("natten sm80 ") + what + ": this tile configuration needs " +
          std::to_string(smem / 1024) + " KiB of shared memory per block, the GPU offers " +
          std::to_string(limit / 1024) + " KiB (use smaller tiles or head dims, or another backend)");
    }
    if (err == cudaSuccess) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
    }
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
