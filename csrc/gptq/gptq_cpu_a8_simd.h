// The gptq_gemm_a8 SIMD kernel, templated on an ISA policy (vector width, integer dot product)
// so that one body serves AVX2 (gptq_cpu_a8_avx2.cpp: vpmaddubsw + vpmaddwd), AVX-VNNI
// (gptq_cpu_a8_avxvnni.cpp: 256-bit vpdpbusd) and AVX-512 VNNI (gptq_cpu_a8_avx512.cpp: 512-bit
// vpdpbusd). Include only from those translation units.
//
// Per column and packed word, pass p isolates the byte-lane values (word >> bits*p) & mask, so
// one dot instruction multiplies 4 weights by 4 int8 activations per column; int32 sums are
// scaled by the block's dx every 32 k, and the group's scale and zero point are folded in once
// per segment as in the float kernel. A register tile is two vectors of columns.
#pragma once
#include "gptq/gptq_cpu_simd_prelude.h"
#include "gptq/gptq_cpu_a8.h"
#include "gptq/gptq_cpu_simd.h"

namespace slimformer {
namespace gptq {
namespace {  // internal linkage: see gptq_cpu_simd_prelude.h
namespace a8 {


// Rows of x per pass: 2 * rows int32 accumulators + 5 working registers must fit.
template <class V>
constexpr int max_rows() { return V::kRegisters == 32 ? 8 : 4; }

template <int BITS>
constexpr uint32_t byte_mask() {
  return BITS == 8 ? 0xFFFFFFFFu : (BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u);
}

template <class V, int BITS, int MT>
void block(const A8Args& a, int64_t m0, int64_t nb0, int ntiles) {
  using I = typename V::I;
  constexpr int L = V::kLanes, T = 2 * L;  // columns per register tile
  constexpr int VPW = 32 / BITS, P = a8_passes(BITS), UPB = kA8Block / VPW;
  // vpdpbusd has ~5 cycles of latency: with 1-2 rows, alternate words between two accumulator
  // sets so enough dependency chains are in flight.
  constexpr int S = MT <= 2 ? 2 : 1;
  const int64_t ld = static_cast<int64_t>(ntiles) * T;
  float* acc_buf = acc_scratch(MT * ld);
  const Weights& w = a.w;
  const A8Activations& act = *a.act;
  const int64_t N = w.N;
  const I mask = V::set1(static_cast<int32_t>(byte_mask<BITS>()));

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
        for (int64_t u = u_lo; u < u_hi; ++u) {  // the same words kPrefetchUnits rows ahead
          for (int c = 0; c < T; c += 16)
            prefetch_words(w.qweight, (u + kPrefetchUnits) * N + nb0 + t * T + c);
        }
        I acc[S][MT][2];
        for (int i = 0; i < S; ++i)
          for (int m = 0; m < MT; ++m) acc[i][m][0] = acc[i][m][1] = V::zero();
        for (int64_t u = u_lo; u < u_hi; ++u) {
          const int32_t* wp = w.qweight + u * N + nb0 + t * T;
          const I w0 = V::load(wp), w1 = V::load(wp + L);
          const int set = S == 1 ? 0 : static_cast<int>(u & 1);
          for (int p = 0; p < P; ++p) {
            I a0 = p == 0 ? w0 : V::shift_right(w0, BITS * p);
            I a1 = p == 0 ? w1 : V::shift_right(w1, BITS * p);
            if constexpr (BITS != 8) {
              a0 = V::and_(a0, mask);
              a1 = V::and_(a1, mask);
            }
            for (int m = 0; m < MT; ++m) {
              const I xb = V::set1(xu[m][(u - u_first) * P + p]);
              acc[set][m][0] = V::dot(acc[set][m][0], a0, xb);
              acc[set][m][1] = V::dot(acc[set][m][1], a1, xb);
            }
          }
        }
        for (int m = 0; m < MT; ++m) {
          for (int h = 0; h < 2; ++h) {
            I sum = acc[0][m][h];
            for (int i = 1; i < S; ++i) sum = V::add(sum, acc[i][m][h]);
            V::scale_add(acc_buf + m * ld + t * T + L * h, sum, dx[m][b - b_first]);
          }
        }
      }
    }
    fold_segment(w, seg.group, acc_buf, ld, MT, act.xsum.data() + m0 * a.nseg + s, a.nseg, a.y + m0 * N, nb0);
  }
}

template <class V, int BITS, int MT = 1>
void rows(const A8Args& a, int64_t m0, int mt, int64_t nb0, int ntiles) {
  if constexpr (MT < max_rows<V>()) {
    if (mt > MT) return rows<V, BITS, MT + 1>(a, m0, mt, nb0, ntiles);
  }
  block<V, BITS, MT>(a, m0, nb0, ntiles);
}

template <class V>
void gemm(const A8Args& a, int64_t n_begin, int64_t n_end) {
  const int64_t n_vec_end = for_each_pass<2 * V::kLanes, max_rows<V>()>(
      a.act->M, a.w.N, a.y, n_begin, n_end, [&](int64_t m0, int mt, int64_t nb0, int ntiles) {
        switch (a.w.bits) {
          case 2: return rows<V, 2>(a, m0, mt, nb0, ntiles);
          case 4: return rows<V, 4>(a, m0, mt, nb0, ntiles);
          default: return rows<V, 8>(a, m0, mt, nb0, ntiles);
        }
      });
  if (n_vec_end < n_end) gemm_a8_scalar(a, n_vec_end, n_end);  // < one tile of leftover columns
}

}  // namespace a8
}  // namespace
}  // namespace gptq
}  // namespace slimformer
