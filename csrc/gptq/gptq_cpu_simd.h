// Helpers shared by the SIMD CPU kernels (256-bit code: every SIMD level includes AVX2). Include
// only inside a `#pragma GCC target` region, after gptq_cpu_simd_prelude.h; everything here has
// internal linkage, so each translation unit keeps its own copy compiled for its own target.
#pragma once
#include "gptq/gptq_cpu_simd_prelude.h"

namespace slimformer {
namespace gptq {
namespace {


// Columns per block with one pass of rows: each packed row is read in runs of 4 KiB while the
// block's fp32 accumulators (up to 8 rows x 1024 columns) stay in L1/L2.
constexpr int64_t kStreamColumns = 1024;
// With several passes of rows, each block's packed weights are re-read once per pass: narrower
// blocks keep them in L2 (128 columns x 4096 k at 4 bits = 256 KiB).
constexpr int64_t kBlockMultiPass = 128;
// Units (packed rows) ahead to prefetch: the hardware prefetchers do not follow runs of a few KiB
// that are N*4 bytes apart, so the kernels ask for the next rows of their block themselves.
constexpr int kPrefetchUnits = 16;

// Prefetch the 64-byte line at `words + offset` int32s. The address may lie past the end of the
// array (prefetches never fault), so it is formed as an integer, not by pointer arithmetic.
inline void prefetch_words(const int32_t* words, int64_t offset) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(words) + static_cast<uintptr_t>(offset) * sizeof(int32_t);
  _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0);
}

// Per-thread scratch for fp32 accumulators, 64-byte aligned, grown on demand and reused.
inline float* acc_scratch(int64_t floats) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Free> buf;
  thread_local int64_t capacity = 0;
  if (floats > capacity) {
    const int64_t bytes = (floats * static_cast<int64_t>(sizeof(float)) + 63) / 64 * 64;
    buf.reset(static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(bytes))));
    if (!buf) throw std::bad_alloc();
    capacity = floats;
  }
  return buf.get();
}

constexpr int vpu(int bits) { return bits == 3 ? 32 : 32 / bits; }  // values per unit
constexpr int wpu(int bits) { return bits == 3 ? 3 : 1; }           // words per unit

inline __m256 load_scales8(const Weights& w, int64_t g, int64_t n) {
  const int64_t idx = g * w.N + n;
  switch (w.scale_type) {
    case ScaleType::kFloat16:
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w.scales) + idx)));
    case ScaleType::kBFloat16: {
      const __m128i b = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w.scales) + idx));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
    }
    default:
      return _mm256_loadu_ps(static_cast<const float*>(w.scales) + idx);
  }
}

// Zero points of columns n .. n+7 (n a multiple of 8) of group g, plus zero_offset. Their 8*bits
// bits start at bit bits*n of the qzeros row, at most 24 bits into a word, so one 64-bit window
// holds them all.
inline __m256 load_zeros8(const Weights& w, int64_t g, int64_t n) {
  const int32_t* row = w.qzeros + g * w.zeros_stride;
  const int64_t bit = static_cast<int64_t>(w.bits) * n, word = bit >> 5;
  uint64_t window = static_cast<uint32_t>(row[word]);
  if (word + 1 < w.zeros_stride) window |= static_cast<uint64_t>(static_cast<uint32_t>(row[word + 1])) << 32;
  window >>= bit & 31;
  const uint64_t mask = value_mask(w.bits);
  alignas(32) int32_t z[8];
  for (int i = 0; i < 8; ++i) z[i] = static_cast<int32_t>((window >> (w.bits * i)) & mask) + w.zero_offset;
  return _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(z)));
}

// End of a segment (group g) for the block of columns [n0, n0 + ld) (ld a multiple of 8) and
// `rows` rows of x: y[m, n] += s[g, n] * (acc[m, n - n0] - z[g, n] * xsum[m * xsum_stride]), acc
// rows ld apart (32-byte aligned), y rows w.N apart. The zero point enters once per group,
// through the sum of x over the segment.
inline void fold_segment(const Weights& w, int64_t g, const float* acc, int64_t ld, int rows,
                         const float* xsum, int64_t xsum_stride, float* y, int64_t n0) {
  for (int64_t c = 0; c < ld; c += 8) {
    const __m256 sv = load_scales8(w, g, n0 + c);
    const __m256 zv = load_zeros8(w, g, n0 + c);
    for (int m = 0; m < rows; ++m) {
      float* out = y + m * w.N + n0 + c;
      const __m256 xs = _mm256_set1_ps(xsum[m * xsum_stride]);
      const __m256 t = _mm256_fnmadd_ps(zv, xs, _mm256_load_ps(acc + m * ld + c));
      _mm256_storeu_ps(out, _mm256_fmadd_ps(sv, t, _mm256_loadu_ps(out)));
    }
  }
}

// The blocking shared by the SIMD kernels: zeroes y[:, n_begin:n_vec_end) and calls
// pass(m0, rows, nb0, ntiles) for column blocks of whole T-column tiles and passes of up to R rows.
// Returns n_vec_end; the caller's scalar kernel takes the (< T) columns after it.
template <int T, int R, class Pass>
int64_t for_each_pass(int64_t M, int64_t N, float* y, int64_t n_begin, int64_t n_end, const Pass& pass) {
  const int64_t n_vec_end = n_begin + (n_end - n_begin) / T * T;
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n_begin, y + m * N + n_vec_end, 0.f);
  const int64_t blk = M <= R ? kStreamColumns : kBlockMultiPass;
  for (int64_t nb0 = n_begin; nb0 < n_vec_end; nb0 += blk) {
    const int ntiles = static_cast<int>(std::min<int64_t>(blk, n_vec_end - nb0) / T);
    for (int64_t m0 = 0; m0 < M; m0 += R) pass(m0, static_cast<int>(std::min<int64_t>(R, M - m0)), nb0, ntiles);
  }
  return n_vec_end;
}

}  // namespace
}  // namespace gptq
}  // namespace slimformer
