// AVX2 + FMA + F16C CPU kernels (this file alone is compiled with -mavx2 -mfma -mf16c; the
// adapter only calls in after checking the CPU at run time).
//
// gemm_avx2 (any batch): columns are processed in blocks (the thread's whole range for up to 6
// rows of x, 128 columns when several 6-row passes re-read a block, so it stays in L2). For each segment (run of k with
// one group) the integer weights are unpacked in registers and multiplied into fp32 accumulators
// for up to 6 rows of x at a time, so each unpacked weight vector feeds up to 6 FMAs; the scale
// and zero point are applied once per segment (zero folded through the sum of x over the
// segment). Weight rows are read as contiguous runs of a block's columns.
#include <immintrin.h>

#include <algorithm>
#include <utility>

#include "gptq/gptq_cpu.h"
#include "gptq/gptq_cpu_simd.h"

namespace slimformer {
namespace gptq {
namespace {

// With more rows than one pass takes, each block's packed weights are re-read once per pass:
// narrower blocks keep them in L2 (128 columns x 4096 k at 4 bits = 256 KiB).
constexpr int kBlockMultiPass = 128;
constexpr int kMaxRows = 6;  // rows of x per pass: 12 accumulators + 3 working ymm registers

// Value J of a unit is read "in place" when it fits below the sign bit: (word & (mask << sh))
// converts exactly to q * 2^sh, and x was pre-scaled by 2^-sh (prescale_x_avx2), so the product
// is exactly x * q with one shift fewer per vector. The top value of a word is shifted down
// instead, and 3-bit values that straddle two words are assembled from both.
constexpr int fold_shift(int bits, int j) {
  return ((bits * j) & 31) + bits <= 31 ? (bits * j) & 31 : 0;
}

// Value J of the unit starting at `w` for 8 consecutive columns (word stride N between rows of
// the unit), times 2^fold_shift(BITS, J). Bit positions as unpack_unit() in gptq_format.h.
template <int BITS, int J>
inline __m256i unpack8(const int32_t* w, int64_t N) {
  constexpr int bit = BITS * J, wi = bit >> 5, sh = bit & 31;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + wi * N));
  if constexpr (sh + BITS <= 31) {
    return _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(mask << sh)));
  } else if constexpr (sh + BITS == 32) {
    return _mm256_srli_epi32(v, sh);
  } else {
    const __m256i nx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (wi + 1) * N));
    v = _mm256_or_si256(_mm256_srli_epi32(v, sh), _mm256_slli_epi32(nx, 32 - sh));
    return _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(mask)));
  }
}

// Independent accumulator sets per row and half-tile: an FMA has 4 cycles of latency and two
// issue ports, so 8 chains in flight are needed to keep the FMA units busy. Rows provide chains
// for MT >= 4; with fewer rows, consecutive values j rotate through `phases` sets.
constexpr int phases(int mt) { return mt >= 3 ? 1 : 4 / mt; }

template <int BITS, int MT, int J>
inline void fma_step(const int32_t* w, int64_t N, const float* const* xp,
                     __m256 (&acc)[phases(MT)][MT][2]) {
  constexpr int P = J % phases(MT);
  const __m256 v0 = _mm256_cvtepi32_ps(unpack8<BITS, J>(w, N));
  const __m256 v1 = _mm256_cvtepi32_ps(unpack8<BITS, J>(w + 8, N));
  for (int m = 0; m < MT; ++m) {
    const __m256 xv = _mm256_broadcast_ss(xp[m] + J);
    acc[P][m][0] = _mm256_fmadd_ps(v0, xv, acc[P][m][0]);
    acc[P][m][1] = _mm256_fmadd_ps(v1, xv, acc[P][m][1]);
  }
}

template <int BITS, int MT, int... J>
inline void fma_unit(const int32_t* w, int64_t N, const float* const* xp,
                     __m256 (&acc)[phases(MT)][MT][2], std::integer_sequence<int, J...>) {
  (fma_step<BITS, MT, J>(w, N, xp, acc), ...);
}

// y[m0:m0+MT, nb0:nb0+ntiles*kTile] += x[m0:m0+MT] @ W[:, same columns]
template <int BITS, int MT>
void gemm_block(const GemmArgs& a, int64_t m0, int64_t nb0, int ntiles) {
  const int64_t ld = static_cast<int64_t>(ntiles) * kTile;
  float* acc_buf = acc_scratch(MT * ld);
  constexpr int VPU = vpu(BITS), WPU = wpu(BITS);
  const Weights& w = a.w;
  const int64_t N = w.N, K = w.K;
  alignas(32) float xpad[MT][32];
  const float* xrow[MT];
  for (int m = 0; m < MT; ++m) xrow[m] = a.x_prescaled + (m0 + m) * K;

  for (int64_t s = 0; s < a.nseg; ++s) {
    const Segment seg = a.segs[s];
    for (int m = 0; m < MT; ++m) std::fill(acc_buf + m * ld, acc_buf + (m + 1) * ld, 0.f);
    const int64_t u_end = (seg.k_end + VPU - 1) / VPU;
    for (int64_t u = seg.k_begin / VPU; u < u_end; ++u) {
      const int64_t k0 = u * VPU;
      const float* xp[MT];
      if (k0 >= seg.k_begin && k0 + VPU <= seg.k_end) {
        for (int m = 0; m < MT; ++m) xp[m] = xrow[m] + k0;
      } else {  // unit straddles the segment: values outside it contribute zero
        for (int m = 0; m < MT; ++m) {
          for (int j = 0; j < VPU; ++j) {
            const int64_t k = k0 + j;
            xpad[m][j] = (k >= seg.k_begin && k < seg.k_end) ? xrow[m][k] : 0.f;
          }
          xp[m] = xpad[m];
        }
      }
      const int32_t* wu = w.qweight + u * WPU * N + nb0;
      const int32_t* ahead = wu + kPrefetchUnits * WPU * N;  // prefetches never fault
      for (int t = 0; t < ntiles; ++t) {
        for (int r = 0; r < WPU; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + r * N + t * kTile), _MM_HINT_T0);
        constexpr int P = phases(MT);
        __m256 acc[P][MT][2];
        for (int m = 0; m < MT; ++m) {
          acc[0][m][0] = _mm256_load_ps(acc_buf + m * ld + t * kTile);
          acc[0][m][1] = _mm256_load_ps(acc_buf + m * ld + t * kTile + 8);
          for (int p = 1; p < P; ++p) acc[p][m][0] = acc[p][m][1] = _mm256_setzero_ps();
        }
        fma_unit<BITS, MT>(wu + t * kTile, N, xp, acc, std::make_integer_sequence<int, VPU>{});
        for (int m = 0; m < MT; ++m) {
          for (int p = 1; p < P; ++p) {
            acc[0][m][0] = _mm256_add_ps(acc[0][m][0], acc[p][m][0]);
            acc[0][m][1] = _mm256_add_ps(acc[0][m][1], acc[p][m][1]);
          }
          _mm256_store_ps(acc_buf + m * ld + t * kTile, acc[0][m][0]);
          _mm256_store_ps(acc_buf + m * ld + t * kTile + 8, acc[0][m][1]);
        }
      }
    }
    // Fold scale and zero point: y += s * (acc - z * sum(x over segment)).
    for (int c = 0; c < ntiles * kTile; c += 8) {
      const int64_t n = nb0 + c;
      const __m256 sv = load_scales8(w, seg.group, n);
      const __m256 zv = load_zeros8(w, seg.group, n);
      for (int m = 0; m < MT; ++m) {
        float* y = a.y + (m0 + m) * N + n;
        const __m256 xs = _mm256_set1_ps(a.xsum[(m0 + m) * a.nseg + s]);
        const __m256 t = _mm256_fnmadd_ps(zv, xs, _mm256_load_ps(acc_buf + m * ld + c));
        _mm256_storeu_ps(y, _mm256_fmadd_ps(sv, t, _mm256_loadu_ps(y)));
      }
    }
  }
}

template <int BITS>
void gemm_rows(const GemmArgs& a, int64_t m0, int mt, int64_t nb0, int ntiles) {
  switch (mt) {
    case 1: return gemm_block<BITS, 1>(a, m0, nb0, ntiles);
    case 2: return gemm_block<BITS, 2>(a, m0, nb0, ntiles);
    case 3: return gemm_block<BITS, 3>(a, m0, nb0, ntiles);
    case 4: return gemm_block<BITS, 4>(a, m0, nb0, ntiles);
    case 5: return gemm_block<BITS, 5>(a, m0, nb0, ntiles);
    default: return gemm_block<BITS, 6>(a, m0, nb0, ntiles);
  }
}

template <int BITS>
void prescale(const float* x, int64_t M, int64_t K, float* out) {
  constexpr int VPU = vpu(BITS);
  float factor[VPU];
  for (int j = 0; j < VPU; ++j) factor[j] = 1.0f / static_cast<float>(1u << fold_shift(BITS, j));
  for (int64_t i = 0; i < M * K; ++i) out[i] = x[i] * factor[(i % K) % VPU];
}

}  // namespace

void prescale_x_avx2(int bits, const float* x, int64_t M, int64_t K, float* out) {
  switch (bits) {
    case 2: return prescale<2>(x, M, K, out);
    case 3: return prescale<3>(x, M, K, out);
    case 4: return prescale<4>(x, M, K, out);
    default: return prescale<8>(x, M, K, out);
  }
}

void gemm_avx2(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  const int64_t N = a.w.N;
  const int64_t n_vec_end = n_begin + (n_end - n_begin) / kTile * kTile;
  for (int64_t m = 0; m < a.M; ++m) std::fill(a.y + m * N + n_begin, a.y + m * N + n_vec_end, 0.f);
  const int64_t block = a.M <= kMaxRows ? kStreamColumns : kBlockMultiPass;
  for (int64_t nb0 = n_begin; nb0 < n_vec_end; nb0 += block) {
    const int ntiles = static_cast<int>(std::min<int64_t>(block, n_vec_end - nb0) / kTile);
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRows) {
      const int mt = static_cast<int>(std::min<int64_t>(kMaxRows, a.M - m0));
      switch (a.w.bits) {
        case 2: gemm_rows<2>(a, m0, mt, nb0, ntiles); break;
        case 3: gemm_rows<3>(a, m0, mt, nb0, ntiles); break;
        case 4: gemm_rows<4>(a, m0, mt, nb0, ntiles); break;
        default: gemm_rows<8>(a, m0, mt, nb0, ntiles); break;
      }
    }
  }
  if (n_vec_end < n_end) gemm_scalar(a, n_vec_end, n_end);  // < kTile leftover columns
}

void dequantize_avx2(const Weights& w, int64_t k_begin, int64_t k_end, int64_t n_begin,
                     int64_t n_end, float* out, int64_t ld) {
  const int64_t n_vec_end = n_begin + (n_end - n_begin) / 8 * 8;
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(value_mask(w.bits)));
  for (int64_t n = n_begin; n < n_vec_end; n += 8) {
    int64_t g_cached = -1;
    __m256 sv = _mm256_setzero_ps(), zv = _mm256_setzero_ps();
    for (int64_t k = k_begin; k < k_end; ++k) {
      const int64_t g = w.g_idx[k];
      if (g != g_cached) {  // sorted g_idx: once per group
        sv = load_scales8(w, g, n);
        zv = load_zeros8(w, g, n);
        g_cached = g;
      }
      const int64_t bit = static_cast<int64_t>(w.bits) * k;
      const int sh = static_cast<int>(bit & 31);
      const int32_t* row = w.qweight + (bit >> 5) * w.N + n;
      __m256i v = _mm256_srl_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)),
                                   _mm_cvtsi32_si128(sh));
      if (sh + w.bits > 32) {
        const __m256i nx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + w.N));
        v = _mm256_or_si256(v, _mm256_sll_epi32(nx, _mm_cvtsi32_si128(32 - sh)));
      }
      const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
      _mm256_storeu_ps(out + (k - k_begin) * ld + (n - n_begin), _mm256_mul_ps(sv, _mm256_sub_ps(q, zv)));
    }
  }
  if (n_vec_end < n_end) {
    // Leftover columns: scalar, written at their offset inside `out`.
    dequantize_scalar(w, k_begin, k_end, n_vec_end, n_end, out + (n_vec_end - n_begin), ld);
  }
}

}  // namespace gptq
}  // namespace slimformer
