// The gptq_gemm float CPU kernel, templated on a vector policy (Ymm in gptq_cpu_vec256.h for
// AVX2, Zmm in gptq_cpu_vec512.h for AVX-512). Include only from gptq_cpu_avx2.cpp and
// gptq_cpu_avx512.cpp.
//
// Columns are processed in blocks (kStreamColumns with one pass of rows, kBlockMultiPass when
// several passes re-read a block, so it stays in L2). For each segment (run of k with one group)
// the integer weights are unpacked in registers and multiplied into fp32 accumulators for up to
// max_rows<V>() rows of x at a time, so each unpacked weight vector feeds several FMAs; the scale and
// zero point are applied once per segment (zero folded through the sum of x over the segment).
// A register tile is two vectors of columns.
#pragma once
#include "gptq/gptq_cpu_simd_prelude.h"
#include "gptq/gptq_cpu.h"
#include "gptq/gptq_cpu_simd.h"

namespace slimformer {
namespace gptq {
namespace {  // internal linkage: see gptq_cpu_simd_prelude.h
namespace fp {

// Rows of x per pass: 2 * rows accumulators + 3 working registers must fit the register file.
template <class V>
constexpr int max_rows() { return V::kRegisters == 32 ? 8 : 6; }

// Value J of a unit is read "in place" when it fits below the sign bit: (word & (mask << sh))
// converts exactly to q * 2^sh, and x was pre-scaled by 2^-sh (prescale_x_avx2), so the product
// is exactly x * q with one shift fewer per vector. The top value of a word is shifted down
// instead, and 3-bit values that straddle two words are assembled from both.
constexpr int fold_shift(int bits, int j) {
  return ((bits * j) & 31) + bits <= 31 ? (bits * j) & 31 : 0;
}

// Value J of the unit starting at `w` for one vector of consecutive columns (word stride N between
// rows of the unit), times 2^fold_shift(BITS, J). Bit positions as unpack_unit() in gptq_format.h.
template <class V, int BITS, int J>
inline typename V::I unpack(const int32_t* w, int64_t N) {
  constexpr int bit = BITS * J, wi = bit >> 5, sh = bit & 31;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const typename V::I v = V::load(w + wi * N);
  if constexpr (sh + BITS <= 31) {
    return V::and_(v, V::set1(static_cast<int32_t>(mask << sh)));
  } else if constexpr (sh + BITS == 32) {
    return V::template srli<sh>(v);
  } else {
    const typename V::I nx = V::load(w + (wi + 1) * N);
    return V::and_(V::or_(V::template srli<sh>(v), V::template slli<32 - sh>(nx)),
                   V::set1(static_cast<int32_t>(mask)));
  }
}

// Independent accumulator sets per row and half-tile: an FMA has 4 cycles of latency and two
// issue ports, so 8 chains in flight are needed to keep the FMA units busy. Rows provide chains
// for MT >= 3; with fewer rows, consecutive values j rotate through `phases` sets.
constexpr int phases(int mt) { return mt >= 3 ? 1 : 4 / mt; }

template <class V, int BITS, int MT, int J>
inline void fma_step(const int32_t* w, int64_t N, const float* const* xp,
                     typename V::F (&acc)[phases(MT)][MT][2]) {
  constexpr int P = J % phases(MT);
  const typename V::F v0 = V::cvt(unpack<V, BITS, J>(w, N));
  const typename V::F v1 = V::cvt(unpack<V, BITS, J>(w + V::kLanes, N));
  for (int m = 0; m < MT; ++m) {
    const typename V::F xv = V::broadcast(xp[m] + J);
    acc[P][m][0] = V::fmadd(v0, xv, acc[P][m][0]);
    acc[P][m][1] = V::fmadd(v1, xv, acc[P][m][1]);
  }
}

template <class V, int BITS, int MT, int... J>
inline void fma_unit(const int32_t* w, int64_t N, const float* const* xp,
                     typename V::F (&acc)[phases(MT)][MT][2], std::integer_sequence<int, J...>) {
  (fma_step<V, BITS, MT, J>(w, N, xp, acc), ...);
}

// y[m0:m0+MT, nb0:nb0+ntiles*T] += x[m0:m0+MT] @ W[:, same columns]
template <class V, int BITS, int MT>
void block(const GemmArgs& a, int64_t m0, int64_t nb0, int ntiles) {
  using F = typename V::F;
  constexpr int L = V::kLanes, T = 2 * L;
  constexpr int VPU = vpu(BITS), WPU = wpu(BITS), P = phases(MT);
  const int64_t ld = static_cast<int64_t>(ntiles) * T;
  float* acc_buf = acc_scratch(MT * ld);
  const Weights& w = a.w;
  const int64_t N = w.N, K = w.K;
  alignas(64) float xpad[MT][32];
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
      for (int t = 0; t < ntiles; ++t) {
        for (int r = 0; r < WPU; ++r)
          for (int c = 0; c < T; c += 16)  // one 64-byte line per 16 columns
            prefetch_words(wu, (kPrefetchUnits * WPU + r) * N + t * T + c);
        F acc[P][MT][2];
        for (int m = 0; m < MT; ++m) {
          acc[0][m][0] = V::load(acc_buf + m * ld + t * T);
          acc[0][m][1] = V::load(acc_buf + m * ld + t * T + L);
          for (int p = 1; p < P; ++p) acc[p][m][0] = acc[p][m][1] = V::zero_f();
        }
        fma_unit<V, BITS, MT>(wu + t * T, N, xp, acc, std::make_integer_sequence<int, VPU>{});
        for (int m = 0; m < MT; ++m) {
          for (int p = 1; p < P; ++p) {
            acc[0][m][0] = V::add(acc[0][m][0], acc[p][m][0]);
            acc[0][m][1] = V::add(acc[0][m][1], acc[p][m][1]);
          }
          V::store(acc_buf + m * ld + t * T, acc[0][m][0]);
          V::store(acc_buf + m * ld + t * T + L, acc[0][m][1]);
        }
      }
    }
    fold_segment(w, seg.group, acc_buf, ld, MT, a.xsum + m0 * a.nseg + s, a.nseg, a.y + m0 * N, nb0);
  }
}

template <class V, int BITS, int MT = 1>
void rows(const GemmArgs& a, int64_t m0, int mt, int64_t nb0, int ntiles) {
  if constexpr (MT < max_rows<V>()) {
    if (mt > MT) return rows<V, BITS, MT + 1>(a, m0, mt, nb0, ntiles);
  }
  block<V, BITS, MT>(a, m0, nb0, ntiles);
}

template <class V>
void gemm(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  const int64_t n_vec_end = for_each_pass<2 * V::kLanes, max_rows<V>()>(
      a.M, a.w.N, a.y, n_begin, n_end, [&](int64_t m0, int mt, int64_t nb0, int ntiles) {
        switch (a.w.bits) {
          case 2: return rows<V, 2>(a, m0, mt, nb0, ntiles);
          case 3: return rows<V, 3>(a, m0, mt, nb0, ntiles);
          case 4: return rows<V, 4>(a, m0, mt, nb0, ntiles);
          default: return rows<V, 8>(a, m0, mt, nb0, ntiles);
        }
      });
  if (n_vec_end < n_end) gemm_scalar(a, n_vec_end, n_end);  // < one tile of leftover columns
}

}  // namespace fp
}  // namespace
}  // namespace gptq
}  // namespace slimformer
