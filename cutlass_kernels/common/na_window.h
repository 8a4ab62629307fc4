// Neighbourhood arithmetic of docs/semantics.md, per axis.
//
// The single definition of which keys a query sees. CPU kernels, every GPU family and the
// test suite (through the extension's `window` helper) all call these functions, so the
// semantics cannot drift between backends.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NA_HOST_DEVICE inline
#endif

namespace natten {

// Window arithmetic is written once, for any signed integer type: host code and the reference
// kernels use int64_t; the tensor-core kernels use int, where a division costs a few dozen
// instructions instead of a hundred and more (their prologues run this per CTA).
template <class T>
struct NonDeduced {
  using type = T;
};
template <class T>
using Same = typename NonDeduced<T>::type;

// One axis of a neighbourhood attention problem.
template <class I>
struct BasicAxisSpec {
  I extent;    // L: tokens along the axis
  I kernel;    // k: window size
  I stride;    // s: queries of one stride group share a window
  I dilation;  // d: keys are taken from the query's residue class mod d
  bool causal;
};
using AxisSpec = BasicAxisSpec<int64_t>;

// The keys one query sees along one axis, in dilation-group coordinates.
// `start` is the key that window offset 0 refers to (unfused ops index attention weights by
// offset from it); keys `first..last` are visible. Non-causal windows always hold exactly
// `kernel` keys; causal ones hold fewer near the start of the axis.
template <class I>
struct BasicAxisWindow {
  I start;
  I first;
  I last;
};
using AxisWindow = BasicAxisWindow<int64_t>;

// The constraints on one axis (docs/semantics.md). natten/_checks.py enforces them before any
// kernel runs; GPU entry points re-check them as their own contract.
NA_HOST_DEVICE bool axis_is_valid(AxisSpec const& a) {
  return a.extent >= 1 && a.kernel >= 1 && a.dilation >= 1 && a.stride >= 1 &&
         a.stride <= a.kernel && a.kernel * a.dilation <= a.extent;
}

template <class I>
NA_HOST_DEVICE I na_min(I a, Same<I> b) {
  return a < b ? a : b;
}
template <class I>
NA_HOST_DEVICE I na_max(I a, Same<I> b) {
  return a > b ? a : b;
}

// Length of the dilation group that holds residue `residue` (0 <= residue < dilation).
template <class I>
NA_HOST_DEVICE I group_length(BasicAxisSpec<I> const& a, Same<I> residue) {
  if (a.dilation == 1) return a.extent;
  return a.extent / a.dilation + (residue < a.extent % a.dilation ? 1 : 0);
}

// Members of the dilation group of `residue` (mod `dilation`) at axis coordinates below x: the
// group coordinate of its first member at or after x. A query range [x0, x1) holds one run of
// each group, group coordinates [group_members_below(x0), group_members_below(x1)).
template <class I>
NA_HOST_DEVICE I group_members_below(I x, Same<I> residue, Same<I> dilation) {
  return x <= residue ? 0 : (x - residue + dilation - 1) / dilation;
}

// Window of the query at group coordinate `xi` inside a group of length `group_len`.
template <class I>
NA_HOST_DEVICE BasicAxisWindow<I> axis_window(BasicAxisSpec<I> const& a, Same<I> group_len,
                                              Same<I> xi) {
  I const k = a.kernel;
  I const s = a.stride;
  I const stride_start = s == 1 ? xi : (xi / s) * s;  // the first query of xi's stride group
  if (a.causal) {
    I const lead = na_min<I>(stride_start + s - 1, group_len - 1);
    I const first = na_max<I>(lead - k + 1, 0);
    return {first, first, xi};
  }
  // Even windows lean left: one more key before the centre than after it.
  I const left = k / 2;
  I const right = (k % 2) ? k / 2 : k / 2 - 1;
  I const lead = na_min<I>(stride_start + s / 2, group_len - 1);
  I const centre = na_max<I>(left, na_min<I>(lead, group_len - 1 - right));
  return {centre - left, centre - left, centre + right};
}

// The keys a tile of queries xi in [x_first, x_last] (non-empty) reaches along one axis: the
// union of their windows, [first, last], and the keys every one of them sees, [full_first,
// full_last] (empty when full_first > full_last). Both window bounds are non-decreasing in xi and
// consecutive windows overlap or touch (stride <= kernel), so the union is one contiguous range
// spanned by the two end queries, and so is the intersection. The one definition of a query
// tile's key range: the CPU tiles, the walks of the tiled GPU families, and (through the
// extension's `tile_key_ranges`) the flex backend's block mask and the tile cost rules.
template <class I>
struct BasicTileKeyRange {
  I first;
  I last;
  I full_first;
  I full_last;
};
using TileKeyRange = BasicTileKeyRange<int64_t>;

template <class I>
NA_HOST_DEVICE BasicTileKeyRange<I> tile_key_range(BasicAxisSpec<I> const& a, Same<I> group_len,
                                                   Same<I> x_first, Same<I> x_last) {
  BasicAxisWindow<I> const w0 = axis_window(a, group_len, x_first);
  BasicAxisWindow<I> const w1 = axis_window(a, group_len, x_last);
  return {w0.first, w1.last, w1.first, w0.last};
}

// Queries of one dilation group that see key `yi`, as group coordinates [first, last]
// (empty when first > last). A query sees yi iff window.first <= yi <= window.last; both bounds
// are non-decreasing in the query coordinate, so the queries with window.last >= yi form a
// suffix of the group and those with window.first <= yi a prefix, and their intersection is
// one contiguous range. Each end is found by binary search over axis_window itself, so the
// inverse can never disagree with the forward definition.
template <class I>
struct BasicAxisRange {
  I first;
  I last;
};
using AxisRange = BasicAxisRange<int64_t>;

template <class I>
NA_HOST_DEVICE BasicAxisRange<I> axis_inverse_window(BasicAxisSpec<I> const& a, Same<I> group_len,
                                                     Same<I> yi) {
  // Smallest xi in [0, group_len] with window(xi).last >= yi (group_len: none).
  I lo = 0, hi = group_len;
  while (lo < hi) {
    I const mid = lo + (hi - lo) / 2;
    if (axis_window(a, group_len, mid).last >= yi) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  I const first = lo;
  // Smallest xi in [0, group_len] with window(xi).first > yi; the range ends just before it.
  lo = 0;
  hi = group_len;
  while (lo < hi) {
    I const mid = lo + (hi - lo) / 2;
    if (axis_window(a, group_len, mid).first > yi) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return {first, lo - 1};
}

// Number of (query, key) pairs visible along one axis, summed over all queries of the axis.
// Visibility is a product over axes, so the total over a grid is the product of these.
NA_HOST_DEVICE int64_t axis_visible_pairs(AxisSpec const& a) {
  int64_t total = 0;
  for (int64_t r = 0; r < a.dilation; ++r) {
    int64_t const lg = group_length(a, r);
    for (int64_t xi = 0; xi < lg; ++xi) {
      AxisWindow const w = axis_window(a, lg, xi);
      total += w.last - w.first + 1;
    }
  }
  return total;
}

}  // namespace natten
