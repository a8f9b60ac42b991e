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
// (moved to the sign bit by sel) picks the half.
inline __m256 lookup(const float* Tj, __m256i idx, __m256 sel) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(Tj), idx);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(Tj + 8), idx);
  return _mm256_blendv_ps(lo, hi, sel);
}

// Sum over one word for 8 rows and TB tokens, in the fixed tree order
// ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)); the shifts of a nibble serve all TB tokens.
template <int TB>
inline void slice_sum(__m256i b, const float* const Tw[TB], __m256 out[TB]) {
  __m256 s03[TB], s45[TB];
#define SF_NIBBLE(J)                                                                   \
  const __m256i idx##J = J == 0 ? b : _mm256_srli_epi32(b, 4 * J);                    \
  const __m256 sel##J = _mm256_castsi256_ps(J == 7 ? b : _mm256_slli_epi32(b, 28 - 4 * J))
  {
    SF_NIBBLE(0);
    SF_NIBBLE(1);
    for (int i = 0; i < TB; ++i) s03[i] = _mm256_add_ps(lookup(Tw[i], idx0, sel0), lookup(Tw[i] + 16, idx1, sel1));
  }
  {
    SF_NIBBLE(2);
    SF_NIBBLE(3);
    for (int i = 0; i < TB; ++i)
      s03[i] = _mm256_add_ps(s03[i], _mm256_add_ps(lookup(Tw[i] + 32, idx2, sel2), lookup(Tw[i] + 48, idx3, sel3)));
  }
  {
    SF_NIBBLE(4);
    SF_NIBBLE(5);
    for (int i = 0; i < TB; ++i) s45[i] = _mm256_add_ps(lookup(Tw[i] + 64, idx4, sel4), lookup(Tw[i] + 80, idx5, sel5));
  }
  {
    SF_NIBBLE(6);
    SF_NIBBLE(7);
    for (int i = 0; i < TB; ++i) {
      const __m256 s67 = _mm256_add_ps(lookup(Tw[i] + 96, idx6, sel6), lookup(Tw[i] + 112, idx7, sel7));
      out[i] = _mm256_add_ps(s03[i], _mm256_add_ps(s45[i], s67));
    }
  }
#undef SF_NIBBLE
}

template <int TB>
inline void fp_block(const FpArgs& a, int64_t t, int64_t m0, int64_t w0, int64_t w1) {
  const int64_t rows = std::min<int64_t>(kTileRows, a.N - t * kTileRows), n0 = t * kTileRows;
  float* y[TB];
  const float* Tw[TB];
  __m256 acc[2][TB];
  for (int i = 0; i < TB; ++i) {
    y[i] = a.y + (m0 + i) * a.ldy + n0;
    Tw[i] = a.tables + (m0 + i) * table_floats_per_token(a.Kw) + w0 * 128;
    if (w0 == 0) {
      acc[0][i] = acc[1][i] = _mm256_setzero_ps();
    } else {
      load16(y[i], rows, acc[0][i], acc[1][i]);
    }
  }
  const int32_t* q = a.qweight + (t * a.Kw + w0) * kTileRows;
  for (int64_t w = w0; w < w1; ++w, q += kTileRows) {
    for (int h = 0; h < 2; ++h) {
      __m256 s[TB];
      slice_sum<TB>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 8 * h)), Tw, s);
      for (int i = 0; i < TB; ++i) acc[h][i] = _mm256_add_ps(acc[h][i], s[i]);
    }
    for (int i = 0; i < TB; ++i) Tw[i] += 128;
  }
  __m256 al0, al1, b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  if (w1 == a.Kw) {
    load16(a.alpha + n0, rows, al0, al1);
    if (a.bias) load16(a.bias + n0, rows, b0, b1);
  }
  for (int i = 0; i < TB; ++i) {
    __m256 v0 = acc[0][i], v1 = acc[1][i];
    if (w1 == a.Kw) {
      v0 = _mm256_mul_ps(v0, al0);
      v1 = _mm256_mul_ps(v1, al1);
      if (a.bias) {
        v0 = _mm256_add_ps(v0, b0);
        v1 = _mm256_add_ps(v1, b1);
      }
    }
    store16(y[i], rows, v0, v1);
  }
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
  // K block: the tables of a token pair (2 x 32 words x 512 B = 32 KiB) stay in L1 across the tiles.
  constexpr int64_t kb = 32;
  for (int64_t w0 = 0; w0 < a.Kw; w0 += kb) {
    const int64_t w1 = std::min(a.Kw, w0 + kb);
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2)
      for (int64_t t = t0; t < t1; ++t) fp_block<2>(a, t, m, w0, w1);
    if (m < a.M)
      for (int64_t t = t0; t < t1; ++t) fp_block<1>(a, t, m, w0, w1);
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
