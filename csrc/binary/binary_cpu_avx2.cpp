// AVX2 kernels of the 1-bit weight ops (inside the target region below, see
// binary_cpu_simd_prelude.h; called only at ISA level avx2 and above). A 16-row tile slice is two
// 256-bit halves of 8 rows.
//  - W1A-fp: 8-entry vpermps lookups in both halves of a group's 16-entry table, selected by
//    nibble bit 3 shifted into the sign bit (blendv).
//  - W1A1: XOR, vpshufb nibble popcount into byte counters (at most 31 slices, 8 bits each, so
//    never above 248), widened to one 32-bit lane per row with vpmaddubsw / vpmaddwd.
#include "binary/binary_cpu_simd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// No mul+add -> FMA contraction: every ISA must round exactly as the scalar kernel does.
#pragma GCC optimize("fp-contract=off")

namespace slimformer {
namespace binary {
namespace {

// y[0:rows] (rows <= 16) <-> two vectors; the last tile of a layer may have fewer than 16 rows.
inline void load16(const float* p, int64_t rows, __m256& lo, __m256& hi) {
  if (rows >= kTileRows) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
    return;
  }
  alignas(32) float tmp[kTileRows] = {};
  std::memcpy(tmp, p, sizeof(float) * rows);
  lo = _mm256_load_ps(tmp);
  hi = _mm256_load_ps(tmp + 8);
}

inline void store16(float* p, int64_t rows, __m256 lo, __m256 hi) {
  if (rows >= kTileRows) {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
    return;
  }
  alignas(32) float tmp[kTileRows];
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  std::memcpy(p, tmp, sizeof(float) * rows);
}

// The table entry of nibble j for 8 rows: the low 3 bits pick within T[0..7] or T[8..15], bit 3
// (moved to the sign bit) picks the half.
template <int J>
inline __m256 lookup(__m256i b, const float* Tj) {
  const __m256i idx = J == 0 ? b : _mm256_srli_epi32(b, 4 * J);
  const __m256 sel = _mm256_castsi256_ps(J == 7 ? b : _mm256_slli_epi32(b, 28 - 4 * J));
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(Tj), idx);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(Tj + 8), idx);
  return _mm256_blendv_ps(lo, hi, sel);
}

inline __m256 slice_sum(__m256i b, const float* Tw) {
  const __m256 p0 = lookup<0>(b, Tw), p1 = lookup<1>(b, Tw + 16), p2 = lookup<2>(b, Tw + 32),
               p3 = lookup<3>(b, Tw + 48), p4 = lookup<4>(b, Tw + 64), p5 = lookup<5>(b, Tw + 80),
               p6 = lookup<6>(b, Tw + 96), p7 = lookup<7>(b, Tw + 112);
  return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3)),
                       _mm256_add_ps(_mm256_add_ps(p4, p5), _mm256_add_ps(p6, p7)));
}

inline void fp_block(const FpArgs& a, int64_t t, int64_t m, int64_t w0, int64_t w1) {
  const int64_t rows = std::min<int64_t>(kTileRows, a.N - t * kTileRows), n0 = t * kTileRows;
  float* y = a.y + m * a.ldy + n0;
  __m256 acc0, acc1;
  if (w0 == 0) {
    acc0 = acc1 = _mm256_setzero_ps();
  } else {
    load16(y, rows, acc0, acc1);
  }
  const float* Tw = a.tables + m * table_floats_per_token(a.Kw) + w0 * 128;
  const int32_t* q = a.qweight + (t * a.Kw + w0) * kTileRows;
  for (int64_t w = w0; w < w1; ++w, q += kTileRows, Tw += 128) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 8));
    acc0 = _mm256_add_ps(acc0, slice_sum(b0, Tw));
    acc1 = _mm256_add_ps(acc1, slice_sum(b1, Tw));
  }
  if (w1 == a.Kw) {
    __m256 al0, al1;
    load16(a.alpha + n0, rows, al0, al1);
    acc0 = _mm256_mul_ps(acc0, al0);
    acc1 = _mm256_mul_ps(acc1, al1);
    if (a.bias) {
      __m256 b0, b1;
      load16(a.bias + n0, rows, b0, b1);
      acc0 = _mm256_add_ps(acc0, b0);
      acc1 = _mm256_add_ps(acc1, b1);
    }
  }
  store16(y, rows, acc0, acc1);
}

// Byte-wise popcount of v (each byte 0..8).
inline __m256i popcnt_bytes(__m256i v, __m256i lut, __m256i low4) {
  const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

inline __m256i widen_bytes(__m256i bytes) {  // sum of the 4 bytes of each 32-bit lane
  return _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
}

inline __m256i nibble_lut() {
  return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2,
                          3, 3, 4);
}

constexpr int64_t kByteRun = 31;  // slices per byte-counter run: 31 * 8 = 248 < 256

// popcount(act_w XOR slice) summed over K for TM tokens, one 32-bit lane per row (two halves).
template <int TM>
inline void a1_counts(const A1Args& a, const int32_t* q, const uint32_t* act, __m256i out[TM][2]) {
  const __m256i lut = nibble_lut(), low4 = _mm256_set1_epi8(0x0F);
  for (int i = 0; i < TM; ++i) out[i][0] = out[i][1] = _mm256_setzero_si256();
  for (int64_t r0 = 0; r0 < a.Kw; r0 += kByteRun) {
    const int64_t r1 = std::min(a.Kw, r0 + kByteRun);
    __m256i bytes[TM][2];
    for (int i = 0; i < TM; ++i) bytes[i][0] = bytes[i][1] = _mm256_setzero_si256();
    for (int64_t w = r0; w < r1; ++w) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + w * kTileRows));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + w * kTileRows + 8));
      for (int i = 0; i < TM; ++i) {
        const __m256i av = act ? _mm256_set1_epi32(static_cast<int32_t>(act[i * a.Kw + w])) : _mm256_setzero_si256();
        bytes[i][0] = _mm256_add_epi8(bytes[i][0], popcnt_bytes(_mm256_xor_si256(b0, av), lut, low4));
        bytes[i][1] = _mm256_add_epi8(bytes[i][1], popcnt_bytes(_mm256_xor_si256(b1, av), lut, low4));
      }
    }
    for (int i = 0; i < TM; ++i) {
      out[i][0] = _mm256_add_epi32(out[i][0], widen_bytes(bytes[i][0]));
      out[i][1] = _mm256_add_epi32(out[i][1], widen_bytes(bytes[i][1]));
    }
  }
}

template <int TM>
inline void a1_block(const A1Args& a, int64_t t, int64_t m0, const __m256 rowsum[2]) {
  __m256i pc[TM][2];
  const int32_t* q = a.qweight + t * a.Kw * kTileRows;
  a1_counts<TM>(a, q, a.abits + m0 * a.Kw, pc);
  const int64_t n0 = t * kTileRows, rows = std::min<int64_t>(kTileRows, a.N - n0);
  __m256 alpha[2], bias[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  load16(a.alpha + n0, rows, alpha[0], alpha[1]);
  if (a.bias) load16(a.bias + n0, rows, bias[0], bias[1]);
  const __m256i Kv = _mm256_set1_epi32(static_cast<int32_t>(a.K));
  const __m256 scale = _mm256_set1_ps(a.scale), shift = _mm256_set1_ps(a.shift);
  for (int i = 0; i < TM; ++i) {
    __m256 v[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i dot = _mm256_sub_epi32(Kv, _mm256_slli_epi32(pc[i][h], 1));
      v[h] = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(dot));
      if (a.use_rowsum) v[h] = _mm256_add_ps(v[h], _mm256_mul_ps(shift, rowsum[h]));
      v[h] = _mm256_mul_ps(alpha[h], v[h]);
      if (a.bias) v[h] = _mm256_add_ps(v[h], bias[h]);
    }
    store16(a.y + (m0 + i) * a.ldy + n0, rows, v[0], v[1]);
  }
}

}  // namespace

void build_tables_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, float* out) {
  const int64_t Kw = words_per_row(K), groups = Kw * 8, full = K / 4;
  __m256 flip[2][4];  // [half][input]: sign bit where bit i of entry p = 8 * half + lane is 0
  for (int h = 0; h < 2; ++h) {
    const __m256i lanes = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * h));
    for (int i = 0; i < 4; ++i) {
      const __m256i bit = _mm256_and_si256(_mm256_srli_epi32(lanes, i), _mm256_set1_epi32(1));
      flip[h][i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_xor_si256(bit, _mm256_set1_epi32(1)), 31));
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float* T = out + m * table_floats_per_token(Kw);
    for (int64_t g = 0; g < groups; ++g) {
      float v[4];
      const float* src = xm + 4 * g;
      if (g >= full) {
        for (int i = 0; i < 4; ++i) v[i] = 4 * g + i < K ? xm[4 * g + i] : 0.0f;
        src = v;
      }
      const __m256 x0 = _mm256_set1_ps(src[0]), x1 = _mm256_set1_ps(src[1]), x2 = _mm256_set1_ps(src[2]),
                   x3 = _mm256_set1_ps(src[3]);
      for (int h = 0; h < 2; ++h) {
        const __m256 s = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(_mm256_xor_ps(x0, flip[h][0]), _mm256_xor_ps(x1, flip[h][1])),
                          _mm256_xor_ps(x2, flip[h][2])),
            _mm256_xor_ps(x3, flip[h][3]));
        _mm256_store_ps(T + 16 * g + 8 * h, s);
      }
    }
  }
}

void gemm_fp_avx2(const FpArgs& a, int64_t t0, int64_t t1) {
  // K block: one token's tables (32 words x 512 B = 16 KiB) stay in L1 across the tiles.
  constexpr int64_t kb = 32;
  for (int64_t w0 = 0; w0 < a.Kw; w0 += kb) {
    const int64_t w1 = std::min(a.Kw, w0 + kb);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t t = t0; t < t1; ++t) fp_block(a, t, m, w0, w1);
  }
}

void pack_activations_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, float shift, uint32_t* out) {
  const int64_t Kw = words_per_row(K), full = K / kWordBits;
  const __m256 sh = _mm256_set1_ps(shift);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    for (int64_t w = 0; w < full; ++w) {
      const float* p = xm + w * kWordBits;
      uint32_t word = 0;
      for (int j = 0; j < 4; ++j)
        word |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8 * j), sh, _CMP_GE_OQ)))
                << (8 * j);
      out[m * Kw + w] = word;
    }
    if (full < Kw) {
      uint32_t word = 0;
      for (int64_t k = full * kWordBits; k < K; ++k) word |= static_cast<uint32_t>(xm[k] >= shift) << (k % kWordBits);
      out[m * Kw + full] = word;
    }
  }
}

void gemm_a1_avx2(const A1Args& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    __m256 rowsum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    if (a.use_rowsum) {
      __m256i pc[1][2];
      a1_counts<1>(a, a.qweight + t * a.Kw * kTileRows, nullptr, pc);  // popcount of the rows themselves
      const __m256i Kv = _mm256_set1_epi32(static_cast<int32_t>(a.K));
      for (int h = 0; h < 2; ++h) rowsum[h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_slli_epi32(pc[0][h], 1), Kv));
    }
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) a1_block<2>(a, t, m, rowsum);
    if (m < a.M) a1_block<1>(a, t, m, rowsum);
  }
}

}  // namespace binary
}  // namespace slimformer

#pragma GCC pop_options
