// What one thread of the CUDA GPTQ kernels computes, as __host__ __device__ templates: the kernels
// in gptq_cuda.cu wrap them in launch geometry and shared-memory reduction, and the host replay
// in gptq_cuda_emulate.h runs the very same code on the CPU for the tests. Compiles without CUDA
// or torch; only the 128-bit load is device-specific.
#pragma once
#include <stdint.h>

#include <type_traits>

#include "gptq/gptq_cuda_math.h"
#include "gptq/gptq_format.h"

namespace slimformer {
namespace gptq {
namespace cuda {

// Packed weights, as in gptq_format.h; device pointers on the GPU.
struct QuantWeights {
  const int32_t* qweight;  // [K*bits/32, N]
  const int32_t* qzeros;   // [G, zeros_stride]
  const void* scales;      // [G, N], scale_type
  const int32_t* g_idx;    // [K]; values are clamped into [0, G)
  ScaleType scale_type;
  int64_t K, N, G, zeros_stride;
  int bits;
  int zero_offset;    // 1: "gptq" (v1), 0: "gptq_v2"
  bool vector_loads;  // vector_loads_ok(N, qweight)
};

// Compile-time unit shape (the constexpr twins of values_per_unit / words_per_unit).
template <int BITS>
struct Unit {
  static constexpr int kValues = BITS == 3 ? 32 : 32 / BITS;
  static constexpr int kWords = BITS == 3 ? 3 : 1;
};

// One qweight word for each of a thread's kVec columns.
struct Words4 {
  uint32_t v[kVec];
};

// Row `row` of qweight at columns [n0, n0 + kVec), for n0 < N; missing columns read as 0.
SF_HD Words4 load_words4(const QuantWeights& w, int64_t row, int64_t n0) {
  const int32_t* p = w.qweight + row * w.N + n0;
#if defined(__CUDA_ARCH__)
  if (w.vector_loads) {  // N % 4 == 0, so all four columns exist
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    return {{q.x, q.y, q.z, q.w}};
  }
#endif
  Words4 r;
  SF_UNROLL
  for (int c = 0; c < kVec; ++c) r.v[c] = n0 + c < w.N ? static_cast<uint32_t>(p[c]) : 0u;
  return r;
}

template <int BITS>
SF_HD void load_unit(const QuantWeights& w, int64_t u, int64_t n0, Words4 (&words)[Unit<BITS>::kWords]) {
  SF_UNROLL
  for (int i = 0; i < Unit<BITS>::kWords; ++i) words[i] = load_words4(w, unit_word_row(u, BITS, i), n0);
}

// Value j of the unit for column c of the thread. With compile-time BITS, j and c this is one or
// two shift/mask pairs; 3-bit values 10 and 21 take bits from two words of the same column.
template <int BITS>
SF_HD uint32_t unit_value(const Words4 (&words)[Unit<BITS>::kWords], int c, int j) {
  constexpr int w1 = Unit<BITS>::kWords > 1 ? 1 : 0, w2 = Unit<BITS>::kWords > 2 ? 2 : 0;
  return unpack_unit(words[0].v[c], words[w1].v[c], words[w2].v[c], BITS, j);
}

// Scale and zero point of the thread's columns for the group last seen; reloaded only when g_idx
// changes group (once per group for sorted g_idx).
struct GroupCache {
  int64_t g;
  float scale[kVec];
  float zero[kVec];  // magic_zero(zero point); columns past N: scale 0, so their weights are 0
};

SF_HD void load_group(const QuantWeights& w, int64_t g, int64_t n0, GroupCache& gc) {
  const int32_t* zrow = w.qzeros + g * w.zeros_stride;
  SF_UNROLL
  for (int c = 0; c < kVec; ++c) {
    const int64_t n = n0 + c;
    const bool live = n < w.N;
    gc.scale[c] = live ? load_scale(w.scales, w.scale_type, g * w.N + n) : 0.f;
    gc.zero[c] = live ? magic_zero(zero_point(zrow, n, w.bits, w.zero_offset)) : kMagic;
  }
  gc.g = g;
}

// Group of input feature k; makes gc current for it.
SF_HD void enter_group(const QuantWeights& w, int64_t k, int64_t n0, GroupCache& gc) {
  const int64_t g = clamp_index(w.g_idx[k], w.G);
  if (g != gc.g) load_group(w, g, n0, gc);
}

// Small-batch kernel, one thread: acc[r][c] += sum over k in `units` of
// x[m0 + r, perm[k]] * W[k, n0 + c], for rows m0 + r < M (other rows stay untouched) and n0 < N.
// XLoad: float operator()(int64_t i) reading element i of x [M, K] (row-major) as float.
template <int BITS, int ROWS, class XLoad>
SF_HD void accumulate_slice(const QuantWeights& w, const XLoad& x, const int32_t* perm, int64_t M,
                            int64_t m0, int64_t n0, Range units, float (&acc)[ROWS][kVec]) {
  constexpr int kWords = Unit<BITS>::kWords;
  GroupCache gc;
  gc.g = -1;
  Words4 cur[kWords];
  if (units.begin < units.end) load_unit<BITS>(w, units.begin, n0, cur);
  for (int64_t u = units.begin; u < units.end; ++u) {
    // Issue the next unit's loads before this unit's math so that they are in flight meanwhile.
    Words4 next[kWords] = {};
    if (u + 1 < units.end) load_unit<BITS>(w, u + 1, n0, next);
    SF_UNROLL
    for (int j = 0; j < Unit<BITS>::kValues; ++j) {
      const int64_t k = unit_value_k(u, BITS, j);
      enter_group(w, k, n0, gc);
      float wv[kVec];
      SF_UNROLL
      for (int c = 0; c < kVec; ++c) wv[c] = dequant_magic(unit_value<BITS>(cur, c, j), gc.zero[c], gc.scale[c]);
      const int64_t xk = perm != nullptr ? clamp_index(perm[k], w.K) : k;
      SF_UNROLL
      for (int r = 0; r < ROWS; ++r) {
        if (m0 + r >= M) continue;
        const float xv = x((m0 + r) * w.K + xk);
        SF_UNROLL
        for (int c = 0; c < kVec; ++c) acc[r][c] += xv * wv[c];
      }
    }
    SF_UNROLL
    for (int i = 0; i < kWords; ++i) cur[i] = next[i];
  }
}

// Dequantize kernel, one thread: W[k, n0 + c] for the k of unit u, handed to
// sink(k, n0, const float (&values)[kVec]) (which stores the columns that exist).
template <int BITS, class Sink>
SF_HD void dequant_unit(const QuantWeights& w, int64_t u, int64_t n0, GroupCache& gc, Sink& sink) {
  Words4 words[Unit<BITS>::kWords];
  load_unit<BITS>(w, u, n0, words);
  SF_UNROLL
  for (int j = 0; j < Unit<BITS>::kValues; ++j) {
    const int64_t k = unit_value_k(u, BITS, j);
    enter_group(w, k, n0, gc);
    float v[kVec];
    SF_UNROLL
    for (int c = 0; c < kVec; ++c) v[c] = dequant_magic(unit_value<BITS>(words, c, j), gc.zero[c], gc.scale[c]);
    sink(k, n0, v);
  }
}

// Sum over the block's warps of entry e of the reduction buffer (fixed order: warp 0 first).
template <int ROWS>
SF_HD float block_sum(const float (&red)[kGemvWarps][ROWS][kBlockCols], int e) {
  float s = red[0][reduce_row(e)][reduce_col(e)];
  SF_UNROLL
  for (int i = 1; i < kGemvWarps; ++i) s += red[i][reduce_row(e)][reduce_col(e)];
  return s;
}

SF_HD float bias_value(const void* bias, ScaleType type, int64_t n) {
  return bias != nullptr ? load_scale(bias, type, n) : 0.f;
}

// Host-side dispatch of the run-time bits / row tile to the template instantiations:
// f(std::integral_constant<int, BITS>{}). Callers validated the values.
template <class F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

template <class F>
void with_rows(int rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, kMaxRowTile>{}); break;
  }
}

}  // namespace cuda
}  // namespace gptq
}  // namespace slimformer
