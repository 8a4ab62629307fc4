// Host side of the SM90 forward: problem parameters and the TMA descriptors its loads use.
//
// Q, K and V are described as they lie in memory, heads-last [B, *S, H, D], so there is no
// permutation pass: one descriptor dimension per token axis (innermost first, as TMA numbers
// them), the head dim split into 64-column boxes (a 128-byte swizzle span of 16-bit elements),
// and heads and batch merged into one dimension of stride D (coordinate h + b * tokens * H).
// A box of the token grid then arrives as one load per 64 columns, rows numbered row-major over
// the box like the grid itself, zero-filled where it leaves the grid. Dilation is a traversal
// stride on each axis: the box of a dilation group spans extent * dilation grid positions and
// loads every dilation-th one, so groups need no gather either. Q (and the backward's dO) lie on
// the query range's grid (NaProblem::q_offset; the key grid for the whole axis), K and V on the
// key grid: a query box's grid position is its key-grid position less q_offset.
//
// Torch-free and CuTe-free; needs only the CUDA headers (the driver's descriptor encoder is
// looked up at run time, so nothing links against libcuda).
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/tile_params.h"

namespace natten::sm90 {

// Head-dim columns per TMA box and per swizzle atom: 128 bytes of a 16-bit element.
constexpr int kChunkCols = 64;

template <int Rank>
struct ForwardParams {
  Params<Rank> geo;  // shapes, per-axis windows and tile counts, pointers, scale
  CUtensorMap q_map;
  CUtensorMap k_map;
  CUtensorMap v_map;
  CUtensorMap extra_k_map;  // unused (zero) without additional keys
  CUtensorMap extra_v_map;
};

[[noreturn]] inline void fail(char const* op, std::string const& what) {
  throw std::invalid_argument(std::string("natten sm90 ") + op + ": " + what);
}

using EncodeTiledFn = decltype(&cuTensorMapEncodeTiled);

inline EncodeTiledFn encode_tiled() {
  static EncodeTiledFn const fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    cudaError_t const err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiledFn>(f)
                                                                      : nullptr;
  }();
  if (fn == nullptr) throw std::runtime_error("natten sm90: the driver offers no cuTensorMapEncodeTiled");
  return fn;
}

// One TMA descriptor. dims/strides/box/step are innermost first; strides in bytes, for dims 1..
inline CUtensorMap encode(char const* op, CUtensorMapDataType type, int rank, void const* base,
                          uint64_t const* dims, uint64_t const* strides, uint32_t const* box,
                          uint32_t const* step) {
  CUtensorMap map{};
  CUresult const r = encode_tiled()(&map, type, static_cast<cuuint32_t>(rank), const_cast<void*>(base),
                                    dims, strides, box, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                    CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) fail(op, "cuTensorMapEncodeTiled failed with error " + std::to_string(int(r)));
  return map;
}

// Descriptor of a grid tensor [B, *S, heads, dim] whose boxes are `Tile`s of one dilation group;
// with `queries`, of a tensor of the query range's grid [B, *Sq, heads, dim].
template <int Rank, class Tile>
CUtensorMap grid_map(char const* op, CUtensorMapDataType type, int elem_bytes, void const* base,
                     Params<Rank> const& g, int heads, int dim, bool queries) {
  uint64_t dims[5], strides[4];
  uint32_t box[5], step[5];
  int n = 0;
  dims[n] = uint64_t(dim);
  box[n] = kChunkCols;
  step[n] = 1;
  ++n;
  for (int a = Rank - 1; a >= 0; --a, ++n) {
    auto const& ax = g.axis[a];
    dims[n] = uint64_t(queries ? ax.q_extent : ax.spec.extent);
    strides[n - 1] = uint64_t(queries ? ax.q_token_stride : ax.token_stride) * heads * dim * elem_bytes;
    box[n] = uint32_t(Tile::extent(a) * ax.spec.dilation);
    step[n] = uint32_t(ax.spec.dilation);
  }
  dims[n] = uint64_t(g.batch) * uint64_t(queries ? g.q_tokens : g.tokens) * heads;
  strides[n - 1] = uint64_t(dim) * elem_bytes;
  box[n] = 1;
  step[n] = 1;
  ++n;
  return encode(op, type, n, base, dims, strides, box, step);
}

// Descriptor of the additional keys or values [B, E, heads_kv, dim], boxes of `rows` keys.
inline CUtensorMap extra_map(char const* op, CUtensorMapDataType type, int elem_bytes, void const* base,
                             int batch, int num_extra, int heads_kv, int dim, int rows) {
  uint64_t const dims[3] = {uint64_t(dim), uint64_t(num_extra), uint64_t(batch) * num_extra * heads_kv};
  uint64_t const strides[2] = {uint64_t(heads_kv) * dim * elem_bytes, uint64_t(dim) * elem_bytes};
  uint32_t const box[3] = {kChunkCols, uint32_t(rows), 1};
  uint32_t const step[3] = {1, 1, 1};
  return encode(op, type, 3, base, dims, strides, box, step);
}

// Validates what the TMA forward needs beyond the checks of natten/_checks.py and fills its parameters.
// `head_dim` is the instantiation's: D and Dv may be smaller (multiples of 8, zero-filled by the
// loads) as in the SM80 family. `op` names the caller in error messages (the backward reuses
// this for the descriptors it shares with the forward).
template <int Rank, class QTile, class KVTile>
ForwardParams<Rank> make_forward_params(NaProblem const& p, FnaTensors const& t, int head_dim,
                                        CUtensorMapDataType type, int elem_bytes,
                                        char const* op = "fna_forward") {
  if (p.rank != Rank) fail(op, "problem rank " + std::to_string(p.rank) + " != kernel rank");
  if (p.dim > head_dim || p.dim_v > head_dim || p.dim % 8 != 0 || p.dim_v % 8 != 0 || p.dim <= 0 ||
      p.dim_v <= 0) {
    fail(op, "head dims " + std::to_string(p.dim) + "/" + std::to_string(p.dim_v) +
                 " must be positive multiples of 8 and at most " + std::to_string(head_dim));
  }
  for (int a = 0; a < Rank; ++a) {
    int64_t const d = p.axis[a].dilation;
    // TMA traversal strides go up to 8 and a box spans at most 256 positions of an axis.
    if (d > 8 || (d > 1 && QTile::extent(a) * d > 256) || (d > 1 && KVTile::extent(a) * d > 256)) {
      fail(op, "dilation " + std::to_string(d) + " on axis " + std::to_string(a) +
                   " exceeds what a TMA box of this tile shape can stride over (at most 8, tile extent * "
                   "dilation at most 256)");
    }
  }
  auto aligned = [](void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  bool const extra_aligned = p.num_extra == 0 || (aligned(t.extra_k) && aligned(t.extra_v));
  if (!aligned(t.q) || !aligned(t.k) || !aligned(t.v) || !aligned(t.out) || !extra_aligned) {
    fail(op, "q, k, v, out and the additional keys/values must start on 16-byte boundaries");
  }
  int const q_box[3] = {QTile::extent(0), QTile::extent(1), QTile::extent(2)};
  int const kv_box[3] = {KVTile::extent(0), KVTile::extent(1), KVTile::extent(2)};
  ForwardParams<Rank> P{};
  P.geo = make_params<Rank>(p, t, head_dim, q_box, kv_box, op);
  auto const& g = P.geo;
  // The merged head/batch coordinate of the last batch entry's last head must fit an int.
  if (int64_t(g.batch) * g.tokens * g.heads > INT32_MAX || int64_t(g.batch) * g.num_extra * g.heads_kv > INT32_MAX) {
    fail(op, "batch * tokens * heads exceeds 2^31 - 1 (TMA coordinates are 32-bit)");
  }
  if (g.batch == 0 || g.heads == 0 || g.tokens == 0) return P;
  P.q_map = grid_map<Rank, QTile>(op, type, elem_bytes, t.q, g, g.heads, g.dim, true);
  P.k_map = grid_map<Rank, KVTile>(op, type, elem_bytes, t.k, g, g.heads_kv, g.dim, false);
  P.v_map = grid_map<Rank, KVTile>(op, type, elem_bytes, t.v, g, g.heads_kv, g.dim_v, false);
  if (g.num_extra > 0) {
    P.extra_k_map = extra_map(op, type, elem_bytes, t.extra_k, g.batch, g.num_extra, g.heads_kv, g.dim, KVTile::kSize);
    P.extra_v_map = extra_map(op, type, elem_bytes, t.extra_v, g.batch, g.num_extra, g.heads_kv, g.dim_v, KVTile::kSize);
  }
  return P;
}

}  // namespace natten::sm90
