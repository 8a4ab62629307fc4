// What the host-only checks need to include the kernels' device headers (common/, sm90/'s walk
// and mask code) with any C++17 compiler: the CUDA qualifiers defined away and the device
// min/max as std's. Include before those headers.
#pragma once

#include <algorithm>

#define __device__
#define __host__
#define __forceinline__ inline
using std::max;
using std::min;
