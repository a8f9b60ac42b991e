// The gptq_gemm_a8 SIMD kernel, templated on the integer dot product so that one body serves
// AVX2 (gptq_cpu_a8_avx2.cpp: vpmaddubsw + vpmaddwd) and AVX-VNNI (gptq_cpu_a8_avxvnni.cpp:
// vpdpbusd). Include only from those translation units.
//
// Per 8 columns and packed word, pass p isolates the byte-lane values (word >> bits*p) & mask, so
// one dot instruction multiplies 4 weights by 4 int8 activations per column; int32 sums are
// scaled by the block's dx every 32 k, and the group's scale and zero point are folded in once
// per segment as in the float kernel.
#pragma once
#include <immintrin.h>

#include <algorithm>

#include "gptq/gptq_cpu_a8.h"
#include "gptq/gptq_cpu_simd.h"

namespace slimformer {
namespace gptq {
namespace a8 {

constexpr int kBlockMultiPass = 128;  // with several passes: keep the block's weights in L2
constexpr int kMaxRows = 4;           // 8 int32 accumulators + 5 working registers

template <int BITS>
constexpr uint32_t byte_mask() {
  return BITS == 8 ? 0xFFFFFFFFu : (BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u);
}

template <class Dot, int BITS, int MT>
void block(const A8Args& a, int64_t m0, int64_t nb0, int ntiles) {
  const int64_t ld = static_cast<int64_t>(ntiles) * kTile;
  float* acc_buf = acc_scratch(MT * ld);
  constexpr int VPW = 32 / BITS, P = a8_passes(BITS), UPB = kA8Block / VPW;
  // vpdpbusd has ~5 cycles of latency: with 1-2 rows, alternate words between two accumulator
  // sets so enough dependency chains are in flight.
  constexpr int S = MT <= 2 ? 2 : 1;
  const Weights& w = a.w;
  const A8Activations& act = *a.act;
  const int64_t N = w.N;
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(byte_mask<BITS>()));

  for (int64_t s = 0; s < a.nseg; ++s) {
    const Segment seg = a.segs[s];
    const int64_t u_first = seg.k_begin / VPW, u_end = (seg.k_end + VPW - 1) / VPW;
    const int64_t b_first = seg.k_begin / kA8Block;
    const int32_t* xu[MT];
    const float* dx[MT];
    for (int m = 0; m < MT; ++m) {
      xu[m] = act.xq_units.data() + ((m0 + m) * act.unit_slots + act.seg_unit_slot[s]) * P;
      dx[m] = act.dx.data() + (m0 + m) * act.block_slots + act.seg_block_slot[s];
      std::fill(acc_buf + m * ld, acc_buf + (m + 1) * ld, 0.f);
    }
    for (int64_t b = b_first; b * kA8Block < seg.k_end; ++b) {
      const int64_t u_lo = std::max(b * UPB, u_first), u_hi = std::min((b + 1) * UPB, u_end);
      for (int t = 0; t < ntiles; ++t) {
        for (int64_t u = u_lo; u < u_hi; ++u)  // the same words of the next-but-one blocks
          _mm_prefetch(reinterpret_cast<const char*>(w.qweight + (u + kPrefetchUnits) * N + nb0 + t * kTile),
                       _MM_HINT_T0);
        __m256i acc[S][MT][2];
        for (int i = 0; i < S; ++i)
          for (int m = 0; m < MT; ++m) acc[i][m][0] = acc[i][m][1] = _mm256_setzero_si256();
        for (int64_t u = u_lo; u < u_hi; ++u) {
          const int32_t* wp = w.qweight + u * N + nb0 + t * kTile;
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 8));
          const int set = S == 1 ? 0 : static_cast<int>(u & 1);
          for (int p = 0; p < P; ++p) {
            __m256i a0 = p == 0 ? w0 : _mm256_srli_epi32(w0, BITS * p);
            __m256i a1 = p == 0 ? w1 : _mm256_srli_epi32(w1, BITS * p);
            if constexpr (BITS != 8) {
              a0 = _mm256_and_si256(a0, mask);
              a1 = _mm256_and_si256(a1, mask);
            }
            for (int m = 0; m < MT; ++m) {
              const __m256i xb = _mm256_set1_epi32(xu[m][(u - u_first) * P + p]);
              acc[set][m][0] = Dot::dot(acc[set][m][0], a0, xb);
              acc[set][m][1] = Dot::dot(acc[set][m][1], a1, xb);
            }
          }
        }
        for (int m = 0; m < MT; ++m) {
          const __m256 d = _mm256_set1_ps(dx[m][b - b_first]);
          for (int h = 0; h < 2; ++h) {
            __m256i sum = acc[0][m][h];
            for (int i = 1; i < S; ++i) sum = _mm256_add_epi32(sum, acc[i][m][h]);
            float* out = acc_buf + m * ld + t * kTile + 8 * h;
            _mm256_store_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, _mm256_load_ps(out)));
          }
        }
      }
    }
    // Fold scale and zero point: y += s * (acc - z * sum(x_hat over segment)).
    for (int c = 0; c < ntiles * kTile; c += 8) {
      const int64_t n = nb0 + c;
      const __m256 sv = load_scales8(w, seg.group, n);
      const __m256 zv = load_zeros8(w, seg.group, n);
      for (int m = 0; m < MT; ++m) {
        float* y = a.y + (m0 + m) * N + n;
        const __m256 xs = _mm256_set1_ps(act.xsum[(m0 + m) * a.nseg + s]);
        const __m256 t = _mm256_fnmadd_ps(zv, xs, _mm256_load_ps(acc_buf + m * ld + c));
        _mm256_storeu_ps(y, _mm256_fmadd_ps(sv, t, _mm256_loadu_ps(y)));
      }
    }
  }
}

template <class Dot, int BITS>
void rows(const A8Args& a, int64_t m0, int mt, int64_t nb0, int ntiles) {
  switch (mt) {
    case 1: return block<Dot, BITS, 1>(a, m0, nb0, ntiles);
    case 2: return block<Dot, BITS, 2>(a, m0, nb0, ntiles);
    case 3: return block<Dot, BITS, 3>(a, m0, nb0, ntiles);
    default: return block<Dot, BITS, 4>(a, m0, nb0, ntiles);
  }
}

template <class Dot>
void gemm(const A8Args& a, int64_t n_begin, int64_t n_end) {
  const int64_t N = a.w.N, M = a.act->M;
  const int64_t n_vec_end = n_begin + (n_end - n_begin) / kTile * kTile;
  for (int64_t m = 0; m < M; ++m) std::fill(a.y + m * N + n_begin, a.y + m * N + n_vec_end, 0.f);
  const int64_t blk = M <= kMaxRows ? kStreamColumns : kBlockMultiPass;
  for (int64_t nb0 = n_begin; nb0 < n_vec_end; nb0 += blk) {
    const int ntiles = static_cast<int>(std::min<int64_t>(blk, n_vec_end - nb0) / kTile);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int mt = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
      switch (a.w.bits) {
        case 2: rows<Dot, 2>(a, m0, mt, nb0, ntiles); break;
        case 4: rows<Dot, 4>(a, m0, mt, nb0, ntiles); break;
        default: rows<Dot, 8>(a, m0, mt, nb0, ntiles); break;
      }
    }
  }
  if (n_vec_end < n_end) gemm_a8_scalar(a, n_vec_end, n_end);  // < kTile leftover columns
}

}  // namespace a8
}  // namespace gptq
}  // namespace slimformer
