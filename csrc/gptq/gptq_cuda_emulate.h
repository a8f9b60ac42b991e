// Host replay of the CUDA GPTQ kernels, for the CPU tests only (slimformer._C._test_cuda_emulate_*):
// every block, warp and lane of the launch grid runs the same per-thread code as on the GPU
// (gptq_cuda_thread.h), followed by the kernels' reduction in the same order. What it cannot
// check is what only a GPU has: scheduling, barriers, atomics, real 128-bit loads and the
// hardware fp16/bf16 conversions of x and y (so x is fp32 here and y stays fp32).
#pragma once
#include <stdint.h>

#include <memory>
#include <vector>

#include "gptq/gptq_cuda_math.h"
#include "gptq/gptq_cuda_thread.h"

namespace slimformer {
namespace gptq {
namespace cuda {

struct HostX {
  const float* x;
  float operator()(int64_t i) const { return x[i]; }
};

struct HostSink {
  float* out;
  int64_t N;
  void operator()(int64_t k, int64_t n0, const float (&v)[kVec]) const {
    for (int c = 0; c < kVec; ++c) {
      if (n0 + c < N) out[k * N + n0 + c] = v[c];
    }
  }
};

template <int BITS, int ROWS>
void emulate_gemv_rows(const QuantWeights& w, const float* x, const int32_t* perm, const void* bias,
                       ScaleType bias_type, int64_t M, const GemvPlan& plan, float* y) {
  const int64_t N = w.N, units = units_of(w.K, BITS);
  std::vector<float> ws(plan.splits > 1 ? M * N : 0, 0.f);
  struct Reduction {  // the block's shared memory
    float v[kGemvWarps][ROWS][kBlockCols];
  };
  const auto storage = std::make_unique<Reduction>();
  auto& red = storage->v;
  for (int64_t bz = 0; bz < plan.row_tiles; ++bz) {
    const int64_t m0 = bz * ROWS;
    for (int64_t by = 0; by < plan.splits; ++by) {
      for (int64_t bx = 0; bx < plan.col_blocks; ++bx) {
        for (int warp = 0; warp < kGemvWarps; ++warp) {
          for (int lane = 0; lane < kWarpSize; ++lane) {
            float acc[ROWS][kVec] = {};
            const int64_t n0 = gemv_first_column(bx, lane);
            if (n0 < N) {
              accumulate_slice<BITS, ROWS>(w, HostX{x}, perm, M, m0, n0,
                                           gemv_warp_units(units, plan.splits, by, warp), acc);
            }
            for (int r = 0; r < ROWS; ++r) {
              for (int c = 0; c < kVec; ++c) red[warp][r][lane * kVec + c] = acc[r][c];
            }
          }
        }
        for (int e = 0; e < ROWS * kBlockCols; ++e) {
          const int64_t m = m0 + reduce_row(e), n = gemv_column(bx, reduce_col(e));
          if (m >= M || n >= N) continue;
          const float s = block_sum<ROWS>(red, e);
          if (plan.splits > 1) {
            ws[m * N + n] += s;
          } else {
            y[m * N + n] = s + bias_value(bias, bias_type, n);
          }
        }
      }
    }
  }
  if (plan.splits > 1) {
    for (int64_t i = 0; i < M * N; ++i) y[i] = ws[i] + bias_value(bias, bias_type, i % N);
  }
}

// y [M, N] fp32 as gemv_kernel (+ finish_kernel) computes it with `plan`, before the conversion
// to x's dtype. x: [M, K] fp32; perm, bias may be null.
inline void emulate_gemv(const QuantWeights& w, const float* x, const int32_t* perm, const void* bias,
                         ScaleType bias_type, int64_t M, const GemvPlan& plan, float* y) {
  with_bits(w.bits, [&](auto bits) {
    with_rows(plan.rows, [&](auto rows) {
      emulate_gemv_rows<decltype(bits)::value, decltype(rows)::value>(w, x, perm, bias, bias_type, M, plan, y);
    });
  });
}

// out [K, N] fp32 as dequant_kernel computes it.
inline void emulate_dequantize(const QuantWeights& w, float* out) {
  with_bits(w.bits, [&](auto bits) {
    constexpr int BITS = decltype(bits)::value;
    const int64_t units = units_of(w.K, BITS), grid_y = dequant_grid_y(units);
    HostSink sink{out, w.N};
    for (int64_t bx = 0; bx < dequant_grid_x(w.N); ++bx) {
      for (int64_t by = 0; by < grid_y; ++by) {
        for (int t = 0; t < kDequantThreads; ++t) {
          const int64_t n0 = dequant_first_column(bx, t);
          if (n0 >= w.N) continue;
          GroupCache gc;
          gc.g = -1;
          for (int64_t u = by; u < units; u += grid_y) dequant_unit<BITS>(w, u, n0, gc, sink);
        }
      }
    }
  });
}

}  // namespace cuda
}  // namespace gptq
}  // namespace slimformer
