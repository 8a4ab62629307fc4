// The TMA loads of the SM90 kernels: a box of a grid tensor ([B, *S, heads, dim], described by
// fwd_params.h's grid_map) or rows of the additional keys/values, 64 head-dim columns at a time.
#pragma once

#include <cute/arch/copy_sm90_tma.hpp>

#include "sm90/fwd_params.h"

namespace natten::sm90 {

constexpr uint64_t kCacheNormal = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);

// One TMA load of 64 head-dim columns starting at `col` of the box whose grid positions start at
// pos (per axis, outermost first) in merged head/batch row hb.
template <int Rank>
__device__ __forceinline__ void load_box(CUtensorMap const* map, uint64_t* bar, void* smem, int col,
                                         int const* pos, int hb) {
  if constexpr (Rank == 1) {
    cute::SM90_TMA_LOAD_3D::copy(map, bar, kCacheNormal, smem, col, pos[0], hb);
  } else if constexpr (Rank == 2) {
    cute::SM90_TMA_LOAD_4D::copy(map, bar, kCacheNormal, smem, col, pos[1], pos[0], hb);
  } else {
    cute::SM90_TMA_LOAD_5D::copy(map, bar, kCacheNormal, smem, col, pos[2], pos[1], pos[0], hb);
  }
}

// One TMA load of 64 head-dim columns starting at `col` of the additional keys (or values) from
// `first` on, of merged batch/head row hb (fwd_params.h's extra_map).
__device__ __forceinline__ void load_extra(CUtensorMap const* map, uint64_t* bar, void* smem, int col,
                                           int first, int hb) {
  cute::SM90_TMA_LOAD_3D::copy(map, bar, kCacheNormal, smem, col, first, hb);
}

}  // namespace natten::sm90
