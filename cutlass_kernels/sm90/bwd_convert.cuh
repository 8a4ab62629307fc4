// The last pass of the SM90 backward: dQ's float32 accumulator (bwd_params.h) to the element
// type, times the softmax scale (the main kernel adds unscaled dS.K partials).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace natten::sm90 {

// Four values per thread and iteration: the accumulator holds rows of D floats, D a multiple
// of 8, so every group of four is aligned and inside one row.
template <typename T>
__global__ void __launch_bounds__(256) fna_backward_dq_convert_kernel(float const* __restrict__ acc, T* __restrict__ d_q,
                                                                       int64_t quads, float scale) {
  using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < quads; i += int64_t(gridDim.x) * blockDim.x) {
    float4 const a = reinterpret_cast<float4 const*>(acc)[i];
    Pair lo, hi;
    if constexpr (std::is_same_v<T, __half>) {
      lo = __floats2half2_rn(a.x * scale, a.y * scale);
      hi = __floats2half2_rn(a.z * scale, a.w * scale);
    } else {
      lo = __floats2bfloat162_rn(a.x * scale, a.y * scale);
      hi = __floats2bfloat162_rn(a.z * scale, a.w * scale);
    }
    uint2 out;
    out.x = reinterpret_cast<uint32_t const&>(lo);
    out.y = reinterpret_cast<uint32_t const&>(hi);
    reinterpret_cast<uint2*>(d_q)[i] = out;
  }
}

}  // namespace natten::sm90
