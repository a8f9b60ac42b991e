// Qualifiers for code shared by CPU and CUDA kernels. Bit and index math lives in such
// functions so that CPU tests exercise exactly what the GPU runs (GUIDE.md section 5b).
#pragma once

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif
