// CUDA kernels of the binary-weight ops: launch geometry, staging, barriers, shuffles, ballots and
// stores around the per-thread math of binary_cuda_math.h (which the CPU tests replay through the
// _test_binary_cuda_* hooks). Torch-free. Geometry: see the comment at the top of binary_cuda_math.h.
//
// Bounds: qweight is read only at word_index(row, w) with row < row_tiles(N) * 16 (pad rows exist in
// layout v1) and w < words_per_row(K); x only at m < M, k < K; abits only at m < M, w < words.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "binary/binary_cuda.h"
#include "common/cuda_types.cuh"
#include "common/int_tag.h"

namespace slimformer {
namespace binary {
namespace cuda {
namespace {

using cuda_types::from_float;
using cuda_types::to_float;
using cuda_types::TypeTag;
using cuda_types::with_type;

template <class F>
void with_token_tile(int tm, F&& f) {
  switch (tm) {
    case 1: f(IntTag<1>{}); break;
    case 2: f(IntTag<2>{}); break;
    case 4: f(IntTag<4>{}); break;
    default: f(IntTag<kMaxTokenTile>{}); break;
  }
}

__device__ __forceinline__ float bias_at(const float* bias, int64_t n) { return bias != nullptr ? bias[n] : 0.0f; }

// ---- W1A-fp gemv ----
template <int TM, class T>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(GemvParams p) {
  __shared__ __align__(16) float xs[TM * kXTokenStride];
  __shared__ float red[kGemvWarps][TM][kTileRows];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t tile = blockIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * TM;
  const int64_t words = words_per_row(p.w.K);
  const Range wr = split_range(words, gridDim.y, blockIdx.y);
  const T* x = static_cast<const T*>(p.x);
  const int64_t row = tile * kTileRows + lane_row(lane);  // < row_tiles * 16: always in qweight

  float acc[TM];
#pragma unroll
  for (int m = 0; m < TM; ++m) acc[m] = 0.0f;

  for (int64_t c0 = wr.begin; c0 < wr.end; c0 += kChunkWords) {
    // Weight words first (they do not depend on the stage), so their latency overlaps the staging.
    uint32_t wv[kGemvSteps];
    bool ok[kGemvSteps];
#pragma unroll
    for (int s = 0; s < kGemvSteps; ++s) {
      const int64_t w = c0 + gemv_local_word(warp, s, lane);
      ok[s] = w < wr.end;
      wv[s] = ok[s] ? __ldg(p.w.qweight + word_index(row, w, words)) : 0u;
    }
    __syncthreads();  // the previous chunk's reads of xs are done
    for (int e = threadIdx.x; e < TM * kChunkInputs; e += kGemvThreads) {
      const int64_t src = stage_source(e, m0, c0, p.M, p.w.K);
      xs[x_smem_index(stage_token(e), stage_input(e))] = src >= 0 ? to_float(x[src]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kGemvSteps; ++s) {
      if (ok[s]) accumulate_word<TM>(xs, gemv_local_word(warp, s, lane), wv[s], acc);
    }
  }

  // Lanes r and r + 16 hold the two halves of row r; then the warps, in order, in shared memory.
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const float v = acc[m] + __shfl_xor_sync(kFullMask, acc[m], kTileRows);
    if (lane_half(lane) == 0) red[warp][m][lane_row(lane)] = v;
  }
  __syncthreads();
  if (threadIdx.x < TM * kTileRows) {
    const int e = threadIdx.x;
    const int64_t m = m0 + reduce_token(e), n = tile * kTileRows + reduce_row(e);
    if (m < p.M && n < p.w.N) {
      float s = red[0][reduce_token(e)][reduce_row(e)];
#pragma unroll
      for (int j = 1; j < kGemvWarps; ++j) s += red[j][reduce_token(e)][reduce_row(e)];
      if (p.workspace != nullptr) {
        atomicAdd(p.workspace + m * p.w.N + n, s);
      } else {
        static_cast<T*>(p.y)[m * p.w.N + n] = from_float<T>(gemv_epilogue(s, p.w.alpha[n], bias_at(p.w.bias, n)));
      }
    }
  }
}

// y = alpha * workspace + bias in y's type (after a split-K gemv).
template <class T>
__global__ void __launch_bounds__(256) finish_kernel(const float* ws, const float* alpha, const float* bias, T* y,
                                                     int64_t total, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t n = i % N;
    y[i] = from_float<T>(gemv_epilogue(ws[i], alpha[n], bias_at(bias, n)));
  }
}

// S [N, K] as +-1 in T.
template <class T>
__global__ void __launch_bounds__(kUnpackThreads) unpack_kernel(const uint32_t* qw, int64_t N, int64_t K, T* out) {
  const int64_t total = N * K, words = words_per_row(K);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t n = i / K, k = i % K;
    const uint32_t word = __ldg(qw + word_index(n, k / kWordBits, words));
    out[i] = from_float<T>(sign_of_bit(word, static_cast<int>(k % kWordBits)));
  }
}

// ---- W1A1 ----

// One warp per activation word, grid-strided (the loop bound is warp-uniform, so every lane of a
// warp reaches the ballot together).
template <class T>
__global__ void __launch_bounds__(kPackThreads) pack_kernel(const T* x, const float* act_shift, int64_t M, int64_t K,
                                                            uint32_t* abits) {
  const float shift = *act_shift;
  const int64_t words = words_per_row(K), total = M * words;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; g < total;
       g += warps) {
    const int64_t m = pack_token(g, words), w = pack_word_of(g, words);
    const bool valid = lane < pack_valid(w, K);
    const float v = valid ? to_float(x[m * K + w * kWordBits + lane]) : 0.0f;
    const uint32_t word = __ballot_sync(kFullMask, act_bit(v, shift, valid));
    if (lane == 0) abits[g] = word;
  }
}

template <class T>
__global__ void __launch_bounds__(kA1Threads) a1_kernel(A1Params p) {
  __shared__ __align__(16) uint32_t wsm[kA1ChunkWords * kA1Rows];
  __shared__ uint32_t asm_[kA1Tokens * kAWordStride];
  const int64_t group = blockIdx.x;
  const int64_t tiles = row_tiles(p.w.N), words = words_per_row(p.w.K), token_tiles = a1_token_tiles(p.M);
  const int tx = a1_tx(threadIdx.x), ty = a1_ty(threadIdx.x);
  const float scale = *p.act_scale, shift = *p.act_shift;
  const int K = static_cast<int>(p.w.K);  // the adapter limits K to < 2^24

  for (int64_t tt = blockIdx.y; tt < token_tiles; tt += gridDim.y) {  // uniform across the block
    const int64_t m0 = tt * kA1Tokens;
    int pc[4][4] = {}, rpc[4] = {};
    for (int64_t c0 = 0; c0 < words; c0 += kA1ChunkWords) {
      __syncthreads();  // the previous chunk's (or token tile's) reads are done
      for (int e = threadIdx.x; e < kA1TileGroup * kA1ChunkWords * kTileRows; e += kA1Threads) {
        const int64_t src = a1_weight_source(e, group, c0, tiles, words);
        wsm[a1_weight_slot(e)] = src >= 0 ? __ldg(p.w.qweight + src) : 0u;
      }
      for (int e = threadIdx.x; e < kA1Tokens * kA1ChunkWords; e += kA1Threads) {
        const int64_t src = a1_act_source(e, m0, c0, p.M, words);
        asm_[a1_act_slot(e)] = src >= 0 ? p.abits[src] : 0u;
      }
      __syncthreads();
#pragma unroll 8
      for (int wl = 0; wl < kA1ChunkWords; ++wl) a1_step(asm_, wsm, wl, tx, ty, pc, rpc);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty * kA1ThreadTokens + j;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t n = group * kA1Rows + tx * kA1ThreadRows + i;
        if (m < p.M && n < p.w.N) {
          static_cast<T*>(p.y)[m * p.w.N + n] =
              from_float<T>(a1_epilogue(K, pc[j][i], rpc[i], p.w.alpha[n], scale, shift, bias_at(p.w.bias, n)));
        }
      }
    }
  }
}

unsigned grid_for(int64_t work, int threads, int64_t cap = 65535) {
  const int64_t b = ceil_div(work, threads);
  return static_cast<unsigned>(b < 1 ? 1 : (b < cap ? b : cap));
}

}  // namespace

cudaError_t launch_gemv(const GemvParams& p, const GemvPlan& plan, cudaStream_t stream) {
  GemvParams q = p;
  if (plan.splits > 1) {
    const cudaError_t e = cudaMemsetAsync(p.workspace, 0, sizeof(float) * p.M * p.w.N, stream);
    if (e != cudaSuccess) return e;
  } else {
    q.workspace = nullptr;  // the kernel stores y directly
  }
  const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.token_blocks));
  with_type(p.x_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_token_tile(plan.tm, [&](auto tm) {
      gemv_kernel<decltype(tm)::value, T><<<grid, kGemvThreads, 0, stream>>>(q);
    });
    if (plan.splits > 1) {
      const int64_t total = p.M * p.w.N;
      finish_kernel<T><<<grid_for(total, 256), 256, 0, stream>>>(p.workspace, p.w.alpha, p.w.bias,
                                                                 static_cast<T*>(p.y), total, p.w.N);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_unpack(const uint32_t* qweight, int64_t N, int64_t K, void* out, DType out_type,
                          cudaStream_t stream) {
  with_type(out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    unpack_kernel<T><<<grid_for(N * K, kUnpackThreads), kUnpackThreads, 0, stream>>>(qweight, N, K,
                                                                                    static_cast<T*>(out));
  });
  return cudaGetLastError();
}

cudaError_t launch_gemm_a1(const A1Params& p, cudaStream_t stream) {
  const int64_t words = words_per_row(p.w.K);
  const int64_t warps = p.M * words;
  with_type(p.x_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    pack_kernel<T><<<grid_for(warps * kWarpSize, kPackThreads), kPackThreads, 0, stream>>>(
        static_cast<const T*>(p.x), p.act_shift, p.M, p.w.K, p.abits);
    const int64_t ty = a1_token_tiles(p.M);
    const dim3 grid(static_cast<unsigned>(a1_row_groups(p.w.N)), static_cast<unsigned>(ty < kMaxGridYZ ? ty : kMaxGridYZ));
    a1_kernel<T><<<grid, kA1Threads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace binary
}  // namespace slimformer
