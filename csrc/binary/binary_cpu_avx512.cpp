// AVX-512 kernels of the 1-bit weight ops (inside the target regions below, see
// binary_cpu_simd_prelude.h; called only at ISA level avx512vnni; gemm_a1_avx512, in a region of its own, only with
// AVX512_VPOPCNTDQ). One 512-bit load holds one 32-input slice of a 16-row tile.
//  - W1A-fp: vpermps looks up 16 rows at once in a group's 16-entry table (it reads only the low
//    4 index bits, so nibble j is just the slice shifted right by 4j): 3 instructions per 16 rows x
//    4 inputs. The 8 index vectors of a slice serve up to 4 tokens; K is blocked so that the
//    tables of those tokens stay in L1 while the tiles of the thread stream through. Below 4
//    tokens (decoding) the weights are the bottleneck instead: 4 tiles at a time run over all of
//    K as contiguous, software-prefetched streams, with the tables in L2 (fp_stream).
//  - W1A1: broadcast a token's activation word, XOR with the slice, vpopcntd, add: 16 rows x 32
//    inputs per 3 instructions, register-blocked 2 tiles x up to 8 tokens.
#include "binary/binary_cpu_simd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
// No mul+add -> FMA contraction: every ISA must round exactly as the scalar kernel does.
#pragma GCC optimize("fp-contract=off")

namespace slimformer {
namespace binary {
namespace {

inline __mmask16 row_mask(int64_t rows) {
  return rows >= kTileRows ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rows) - 1u);
}

// acc * alpha (+ bias) for the valid rows of tile t; the same operation order as the scalar kernel.
inline __m512 finish_fp(__m512 acc, const float* alpha, const float* bias, __mmask16 mask) {
  __m512 v = _mm512_mul_ps(acc, _mm512_maskz_loadu_ps(mask, alpha));
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias));
  return v;
}

template <int TB>
inline void fp_block(const FpArgs& a, int64_t t, int64_t m0, int64_t w0, int64_t w1, bool first, bool last) {
  const __mmask16 mask = row_mask(a.N - t * kTileRows);
  const int64_t tpt = table_floats_per_token(a.Kw);
  __m512 acc[TB];
  float* y[TB];
  const float* T[TB];
  for (int i = 0; i < TB; ++i) {
    y[i] = a.y + (m0 + i) * a.ldy + t * kTileRows;
    acc[i] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, y[i]);
    T[i] = a.tables + (m0 + i) * tpt + w0 * 128;
  }
  const int32_t* q = a.qweight + (t * a.Kw + w0) * kTileRows;
  for (int64_t w = w0; w < w1; ++w, q += kTileRows) {
    const __m512i b = _mm512_loadu_si512(q);
    __m512i idx[8];
    idx[0] = b;
    idx[1] = _mm512_srli_epi32(b, 4);
    idx[2] = _mm512_srli_epi32(b, 8);
    idx[3] = _mm512_srli_epi32(b, 12);
    idx[4] = _mm512_srli_epi32(b, 16);
    idx[5] = _mm512_srli_epi32(b, 20);
    idx[6] = _mm512_srli_epi32(b, 24);
    idx[7] = _mm512_srli_epi32(b, 28);
    for (int i = 0; i < TB; ++i) {
      const float* Tw = T[i];
      __m512 p[8];
      for (int j = 0; j < 8; ++j) p[j] = _mm512_permutexvar_ps(idx[j], _mm512_load_ps(Tw + 16 * j));
      const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])),
                                     _mm512_add_ps(_mm512_add_ps(p[4], p[5]), _mm512_add_ps(p[6], p[7])));
      acc[i] = _mm512_add_ps(acc[i], s);
      T[i] = Tw + 128;
    }
  }
  const int64_t n0 = t * kTileRows;
  for (int i = 0; i < TB; ++i) {
    const __m512 v = last ? finish_fp(acc[i], a.alpha + n0, a.bias ? a.bias + n0 : nullptr, mask) : acc[i];
    _mm512_mask_storeu_ps(y[i], mask, v);
  }
}

template <int TB>
inline void fp_tiles(const FpArgs& a, int64_t t0, int64_t t1, int64_t m0, int64_t w0, int64_t w1) {
  const bool first = w0 == 0, last = w1 == a.Kw;
  for (int64_t t = t0; t < t1; ++t) fp_block<TB>(a, t, m0, w0, w1, first, last);
}

// Small batches (the decoding case, M < kStreamTokens): TT tiles at a time over the whole of K,
// so that the weights stream from memory as TT contiguous runs with a software prefetch
// kPrefetchBytes ahead in each (the K-blocked order of fp_block visits each tile in short chunks
// and runs at a third of the memory bandwidth after a cache flush). The tables (M * Kw * 512
// bytes) then come from L2; one table load serves TT tiles. Each output's sum is formed in the
// same order as in fp_block (and the scalar kernel).
constexpr int64_t kStreamTokens = 4;
constexpr int64_t kStreamTableBytes = 512 << 10;  // at most this much table per call (L2)
constexpr int64_t kPrefetchBytes = 1024;
template <int TB, int TT>
inline void fp_stream(const FpArgs& a, int64_t t, int64_t m0) {
  const int64_t tpt = table_floats_per_token(a.Kw), Kw = a.Kw;
  __m512 acc[TT][TB];
  for (int tt = 0; tt < TT; ++tt)
    for (int i = 0; i < TB; ++i) acc[tt][i] = _mm512_setzero_ps();
  const int32_t* q[TT];
  for (int tt = 0; tt < TT; ++tt) q[tt] = a.qweight + (t + tt) * Kw * kTileRows;
  const float* T = a.tables + m0 * tpt;
  const char* q_end = reinterpret_cast<const char*>(a.qweight + row_tiles(a.N) * Kw * kTileRows);
  for (int64_t w = 0; w < Kw; ++w) {
    __m512i b[TT];
    for (int tt = 0; tt < TT; ++tt) {
      const char* pf = reinterpret_cast<const char*>(q[tt] + w * kTileRows) + kPrefetchBytes;
      if (pf < q_end) _mm_prefetch(pf, _MM_HINT_T0);
      b[tt] = _mm512_loadu_si512(q[tt] + w * kTileRows);
    }
    for (int i = 0; i < TB; ++i) {
      const float* Tw = T + i * tpt + w * 128;
      __m512 p[TT][8];
      for (int j = 0; j < 8; ++j) {
        const __m512 tab = _mm512_load_ps(Tw + 16 * j);
        for (int tt = 0; tt < TT; ++tt)
          p[tt][j] = _mm512_permutexvar_ps(j == 0 ? b[tt] : _mm512_srli_epi32(b[tt], 4 * j), tab);
      }
      for (int tt = 0; tt < TT; ++tt) {
        const __m512 s = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(p[tt][0], p[tt][1]), _mm512_add_ps(p[tt][2], p[tt][3])),
            _mm512_add_ps(_mm512_add_ps(p[tt][4], p[tt][5]), _mm512_add_ps(p[tt][6], p[tt][7])));
        acc[tt][i] = _mm512_add_ps(acc[tt][i], s);
      }
    }
  }
  for (int tt = 0; tt < TT; ++tt) {
    const int64_t n0 = (t + tt) * kTileRows;
    const __mmask16 mask = row_mask(a.N - n0);
    for (int i = 0; i < TB; ++i)
      _mm512_mask_storeu_ps(a.y + (m0 + i) * a.ldy + n0, mask,
                            finish_fp(acc[tt][i], a.alpha + n0, a.bias ? a.bias + n0 : nullptr, mask));
  }
}

template <int TT>
inline void fp_stream_tokens(const FpArgs& a, int64_t t) {
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) fp_stream<2, TT>(a, t, m);
  if (m < a.M) fp_stream<1, TT>(a, t, m);
}

}  // namespace

void build_tables_avx512(const float* x, int64_t ldx, int64_t M, int64_t K, float* out) {
  const int64_t Kw = words_per_row(K), groups = Kw * 8, full = K / 4;
  // flip[i] lane p: the sign bit where bit i of p is 0 (input i enters entry p negated).
  __m512i flip[4];
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < 4; ++i) {
    const __m512i bit = _mm512_and_si512(_mm512_srli_epi32(lanes, i), _mm512_set1_epi32(1));
    flip[i] = _mm512_slli_epi32(_mm512_xor_si512(bit, _mm512_set1_epi32(1)), 31);
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
      const __m512 s0 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(src[0])), flip[0]));
      const __m512 s1 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(src[1])), flip[1]));
      const __m512 s2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(src[2])), flip[2]));
      const __m512 s3 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(src[3])), flip[3]));
      _mm512_store_ps(T + 16 * g, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), s2), s3));
    }
  }
}

void gemm_fp_avx512(const FpArgs& a, int64_t t0, int64_t t1) {
  if (a.M < kStreamTokens && a.M * a.Kw * 512 <= kStreamTableBytes) {
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) fp_stream_tokens<4>(a, t);
    for (; t + 2 <= t1; t += 2) fp_stream_tokens<2>(a, t);
    if (t < t1) fp_stream_tokens<1>(a, t);
    return;
  }
  // K block: the tables of one token block (4 tokens x 16 words x 512 B = 32 KiB) stay in L1.
  const int64_t kb = a.M >= 4 ? 16 : a.M >= 2 ? 32 : 64;
  for (int64_t w0 = 0; w0 < a.Kw; w0 += kb) {
    const int64_t w1 = std::min(a.Kw, w0 + kb);
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) fp_tiles<4>(a, t0, t1, m, w0, w1);
    if (m + 2 <= a.M) { fp_tiles<2>(a, t0, t1, m, w0, w1); m += 2; }
    if (m < a.M) fp_tiles<1>(a, t0, t1, m, w0, w1);
  }
}

void pack_activations_avx512(const float* x, int64_t ldx, int64_t M, int64_t K, float shift, uint32_t* out) {
  const int64_t Kw = words_per_row(K);
  const __m512 sh = _mm512_set1_ps(shift);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    for (int64_t w = 0; w < Kw; ++w) {
      const float* p = xm + w * kWordBits;
      const int64_t n = K - w * kWordBits;
      uint32_t lo, hi;
      if (n >= kWordBits) {
        lo = _mm512_cmp_ps_mask(_mm512_loadu_ps(p), sh, _CMP_GE_OQ);
        hi = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + 16), sh, _CMP_GE_OQ);
      } else {
        const __mmask16 mlo = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u);
        const __mmask16 mhi = n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1u) : 0;
        lo = _mm512_mask_cmp_ps_mask(mlo, _mm512_maskz_loadu_ps(mlo, p), sh, _CMP_GE_OQ);
        hi = _mm512_mask_cmp_ps_mask(mhi, _mm512_maskz_loadu_ps(mhi, p + 16), sh, _CMP_GE_OQ);
      }
      out[m * Kw + w] = lo | (hi << 16);
    }
  }
}

}  // namespace binary
}  // namespace slimformer

#pragma GCC pop_options

// W1A1 needs vpopcntd: its own region, so that nothing above can carry AVX512_VPOPCNTDQ code.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vpopcntdq")
#pragma GCC optimize("fp-contract=off")

namespace slimformer {
namespace binary {
namespace {

// Sum of popcounts of TT tiles' slices (rowsum pass) into wpop[TT].
template <int TT>
inline void a1_rowsum(const A1Args& a, int64_t t, __m512 rowsum[TT]) {
  for (int tt = 0; tt < TT; ++tt) {
    const int32_t* q = a.qweight + (t + tt) * a.Kw * kTileRows;
    __m512i pc = _mm512_setzero_si512();
    for (int64_t w = 0; w < a.Kw; ++w) pc = _mm512_add_epi32(pc, _mm512_popcnt_epi32(_mm512_loadu_si512(q + w * kTileRows)));
    rowsum[tt] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_slli_epi32(pc, 1), _mm512_set1_epi32(static_cast<int32_t>(a.K))));
  }
}

template <int TT, int TM>
inline void a1_block(const A1Args& a, int64_t t, int64_t m0, const __m512 rowsum[TT]) {
  const int64_t Kw = a.Kw;
  __m512i acc[TT][TM];
  for (int tt = 0; tt < TT; ++tt)
    for (int i = 0; i < TM; ++i) acc[tt][i] = _mm512_setzero_si512();
  const int32_t* q = a.qweight + t * Kw * kTileRows;
  const uint32_t* act = a.abits + m0 * Kw;
  for (int64_t w = 0; w < Kw; ++w) {
    __m512i b[TT];
    for (int tt = 0; tt < TT; ++tt) b[tt] = _mm512_loadu_si512(q + (tt * Kw + w) * kTileRows);
    for (int i = 0; i < TM; ++i) {
      const __m512i av = _mm512_set1_epi32(static_cast<int32_t>(act[i * Kw + w]));
      for (int tt = 0; tt < TT; ++tt)
        acc[tt][i] = _mm512_add_epi32(acc[tt][i], _mm512_popcnt_epi32(_mm512_xor_si512(b[tt], av)));
    }
  }
  const __m512i Kv = _mm512_set1_epi32(static_cast<int32_t>(a.K));
  const __m512 scale = _mm512_set1_ps(a.scale), shift = _mm512_set1_ps(a.shift);
  for (int tt = 0; tt < TT; ++tt) {
    const int64_t n0 = (t + tt) * kTileRows;
    const __mmask16 mask = row_mask(a.N - n0);
    const __m512 alpha = _mm512_maskz_loadu_ps(mask, a.alpha + n0);
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + n0) : _mm512_setzero_ps();
    const __m512 shifted = a.use_rowsum ? _mm512_mul_ps(shift, rowsum[tt]) : _mm512_setzero_ps();
    for (int i = 0; i < TM; ++i) {
      const __m512i dot = _mm512_sub_epi32(Kv, _mm512_slli_epi32(acc[tt][i], 1));
      __m512 v = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(dot));
      if (a.use_rowsum) v = _mm512_add_ps(v, shifted);
      v = _mm512_mul_ps(alpha, v);
      if (a.bias) v = _mm512_add_ps(v, bias);
      _mm512_mask_storeu_ps(a.y + (m0 + i) * a.ldy + n0, mask, v);
    }
  }
}

template <int TT>
inline void a1_tiles(const A1Args& a, int64_t t) {
  __m512 rowsum[TT];
  if (a.use_rowsum) {
    a1_rowsum<TT>(a, t, rowsum);
  } else {
    for (int tt = 0; tt < TT; ++tt) rowsum[tt] = _mm512_setzero_ps();
  }
  int64_t m = 0;
  for (; m + 8 <= a.M; m += 8) a1_block<TT, 8>(a, t, m, rowsum);
  if (m + 4 <= a.M) { a1_block<TT, 4>(a, t, m, rowsum); m += 4; }
  if (m + 2 <= a.M) { a1_block<TT, 2>(a, t, m, rowsum); m += 2; }
  if (m < a.M) a1_block<TT, 1>(a, t, m, rowsum);
}

}  // namespace

void gemm_a1_avx512(const A1Args& a, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 2 <= t1; t += 2) a1_tiles<2>(a, t);
  if (t < t1) a1_tiles<1>(a, t);
}

}  // namespace binary
}  // namespace slimformer

#pragma GCC pop_options
