// CUDA kernels of the GPTQ ops: launch geometry, shared-memory reduction and stores around the
// per-thread programs of gptq_cuda_thread.h (which the CPU tests replay). Torch-free.
//
// gemv_kernel (M <= 16): block = kGemvWarps warps x 32 lanes; a lane owns 4 columns, a warp one
//   slice of K, a block 128 columns x one row tile x one split of K. Warps reduce in shared memory
//   in a fixed order; with splits > 1 (small N on many SMs) blocks add into a zeroed fp32
//   workspace with atomicAdd and finish_kernel adds the bias and converts. The atomics make the
//   last bits of the result depend on block order when splits > 1.
// dequant_kernel: W [K, N] in fp16/bf16/fp32 for cuBLAS (large batch) and gptq_dequantize.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_types.cuh"
#include "gptq/gptq_cuda.h"

namespace slimformer {
namespace gptq {
namespace cuda {
namespace {

// Hardware conversions for x and outputs (common/cuda_types.cuh: one instruction, unlike the portable
// decoder in gptq_format.h, which the kernels keep for scales and bias: loaded once per group or column).
using cuda_types::from_float;
using cuda_types::to_float;
using cuda_types::TypeTag;
using cuda_types::with_type;

template <class T>
struct XLoad {
  const T* x;
  SF_HD float operator()(int64_t i) const { return to_float(x[i]); }
};

// Stores a thread's dequantized values W[k, n0 .. n0+3] into out [K, N], columns < N only.
template <class T>
struct OutSink {
  T* out;
  int64_t N;
  SF_HD void operator()(int64_t k, int64_t n0, const float (&v)[kVec]) const {
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      if (n0 + c < N) out[k * N + n0 + c] = from_float<T>(v[c]);
    }
  }
};

// At least kGemvMinBlocksPerSm blocks per SM: caps registers at 168; the 8-row tile needs ~136,
// and ptxas's own choice of 128 spilled.
template <int BITS, int ROWS, class T>
__global__ void __launch_bounds__(kGemvThreads, kGemvMinBlocksPerSm) gemv_kernel(GemvParams p) {
  __shared__ __align__(16) float red[kGemvWarps][ROWS][kBlockCols];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t n0 = gemv_first_column(blockIdx.x, lane);
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * ROWS;

  float acc[ROWS][kVec] = {};
  if (n0 < p.w.N) {  // no early return: every thread reaches __syncthreads
    const Range units = gemv_warp_units(units_of(p.w.K, BITS), gridDim.y, blockIdx.y, warp);
    accumulate_slice<BITS, ROWS>(p.w, XLoad<T>{static_cast<const T*>(p.x)}, p.perm, p.M, m0, n0, units, acc);
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    *reinterpret_cast<float4*>(&red[warp][r][lane * kVec]) = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
  }
  __syncthreads();

  T* y = static_cast<T*>(p.y);
  for (int e = threadIdx.x; e < ROWS * kBlockCols; e += kGemvThreads) {
    const int64_t m = m0 + reduce_row(e), n = gemv_column(blockIdx.x, reduce_col(e));
    if (m >= p.M || n >= p.w.N) continue;
    const float s = block_sum<ROWS>(red, e);
    if (p.workspace != nullptr) {
      atomicAdd(p.workspace + m * p.w.N + n, s);
    } else {
      y[m * p.w.N + n] = from_float<T>(s + bias_value(p.bias, p.bias_type, n));
    }
  }
}

// y = workspace + bias, converted to y's type (after a split-K gemv).
template <class T>
__global__ void __launch_bounds__(256) finish_kernel(const float* ws, const void* bias, ScaleType bias_type, T* y,
                                                     int64_t total, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    y[i] = from_float<T>(ws[i] + bias_value(bias, bias_type, i % N));
  }
}

template <int BITS, class T>
__global__ void __launch_bounds__(kDequantThreads) dequant_kernel(QuantWeights w, T* out) {
  const int64_t n0 = dequant_first_column(blockIdx.x, threadIdx.x);
  if (n0 >= w.N) return;  // no block-level synchronisation below
  GroupCache gc;
  gc.g = -1;
  OutSink<T> sink{out, w.N};
  const int64_t units = units_of(w.K, BITS);
  for (int64_t u = blockIdx.y; u < units; u += gridDim.y) dequant_unit<BITS>(w, u, n0, gc, sink);
}

}  // namespace

cudaError_t launch_gemv(const GemvParams& p, const GemvPlan& plan, cudaStream_t stream) {
  GemvParams q = p;
  if (plan.splits > 1) {
    const cudaError_t e = cudaMemsetAsync(p.workspace, 0, sizeof(float) * p.M * p.w.N, stream);
    if (e != cudaSuccess) return e;
  } else {
    q.workspace = nullptr;  // the kernel stores y (with bias) directly
  }
  const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.row_tiles));
  with_type(p.x_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_bits(p.w.bits, [&](auto bits) {
      with_rows(plan.rows, [&](auto rows) {
        gemv_kernel<decltype(bits)::value, decltype(rows)::value, T><<<grid, kGemvThreads, 0, stream>>>(q);
      });
    });
    if (plan.splits > 1) {
      const int64_t total = p.M * p.w.N;
      const unsigned blocks = static_cast<unsigned>(ceil_div(total, 256));
      finish_kernel<T><<<blocks, 256, 0, stream>>>(p.workspace, p.bias, p.bias_type, static_cast<T*>(p.y), total,
                                                   p.w.N);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_dequantize(const QuantWeights& w, void* out, ScaleType out_type, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(dequant_grid_x(w.N)),
                  static_cast<unsigned>(dequant_grid_y(units_of(w.K, w.bits))));
  with_type(out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_bits(w.bits, [&](auto bits) {
      dequant_kernel<decltype(bits)::value, T><<<grid, kDequantThreads, 0, stream>>>(w, static_cast<T*>(out));
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gptq
}  // namespace slimformer
