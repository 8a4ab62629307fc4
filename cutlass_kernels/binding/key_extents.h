// Tile-shape fields of the generated KernelKey (kernel_key.h): three extents, the unused trailing
// axes 1 (0 in every axis for families without tiles).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace natten {

inline bool same_extents(int const (&a)[3], int const (&b)[3]) {
  return a[0] == b[0] && a[1] == b[1] && a[2] == b[2];
}

// "8x16" for the first `rank` extents.
inline std::string extents_text(int const (&e)[3], int rank) {
  std::string text = std::to_string(e[0]);
  for (int a = 1; a < rank; ++a) text += "x" + std::to_string(e[a]);
  return text;
}

inline void set_extents(int (&out)[3], std::vector<int64_t> const& shape) {
  if (shape.empty() || shape.size() > 3) {
    throw std::invalid_argument("natten: a tile shape has 1 to 3 extents, got " +
                                std::to_string(shape.size()));
  }
  for (size_t a = 0; a < 3; ++a) out[a] = a < shape.size() ? static_cast<int>(shape[a]) : 1;
}

}  // namespace natten
