// The warp of the CUDA kernels and the warp-level helpers more than one kernel family uses, each next
// to its host replay (for the test hooks, which run what the GPU runs: GUIDE.md section 5b). Torch-
// free; compiles without CUDA (the device-only functions exist only under nvcc).
#pragma once
#include <stdint.h>

#include "common/hostdev.h"

namespace slimformer {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp (the *_sync intrinsics' mask)

SF_HD int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

#if defined(__CUDACC__)
// Sum over the warp by an xor butterfly (offsets 16, 8, 4, 2, 1): every lane ends with the same sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
#endif

// warp_sum over 32 emulated lanes, the same additions in the same order.
inline float warp_sum_host(const float* v32) {
  float a[kWarpSize], t[kWarpSize];
  for (int l = 0; l < kWarpSize; ++l) a[l] = v32[l];
  for (int off = 16; off > 0; off >>= 1) {
    for (int l = 0; l < kWarpSize; ++l) t[l] = a[l] + a[l ^ off];
    for (int l = 0; l < kWarpSize; ++l) a[l] = t[l];
  }
  return a[0];
}

}  // namespace slimformer
