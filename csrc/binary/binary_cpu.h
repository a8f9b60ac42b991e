// Torch-free CPU kernels of the 1-bit weight ops (layout v1, binary/binary_format.h). The ATen
// adapter (binary_cpu_op.cpp) validates inputs, stages x as contiguous fp32, builds the lookup
// tables or packs the activations, splits row tiles across threads and picks the implementation
// (scalar, AVX2 or AVX-512) at run time.
//
// W1A-fp (binary_gemm) is the lookup-table method of T-MAC / bitnet.cpp, exact in fp32: per token
// and per group g of 4 inputs a 16-entry table T[g][p] = ((s0 x0 + s1 x1) + s2 x2) + s3 x3 with
// s_i = 2 * bit_i(p) - 1 (x is 0.0 beyond K). Nibble j of word w of row n indexes group 8w + j, so
// sum_k x[k] S[n, k] = sum over words of ((T0 + T1) + (T2 + T3)) + ((T4 + T5) + (T6 + T7)), with
// Tj = T[8w + j][nibble j]. Every implementation adds in exactly this order and applies alpha and
// bias as (acc * alpha) + bias without FMA, so scalar, AVX2 and AVX-512 agree bit for bit.
//
// W1A1 (binary_gemm_a1) packs t = (x >= shift) into bits along K (pad bits 0), then per row and
// token dot = K - 2 * sum_w popcount(a_w XOR s_w) exactly in int32, and
// y = (alpha * ((scale * dot) + shift * rowsum)) + bias, rowsum = 2 * popcount(row) - K,
// the shift term only when use_rowsum (shift != 0). Same float operation order in every
// implementation, so results are identical across ISAs.
#pragma once
#include <stdint.h>

#include "binary/binary_format.h"

namespace slimformer {
namespace binary {

// Floats of lookup table per token: 8 groups of 4 inputs per 32-input word, 16 entries each.
inline int64_t table_floats_per_token(int64_t words) { return words * 8 * 16; }

struct FpArgs {
  const int32_t* qweight;  // [ceil(N/16), Kw, 16]
  int64_t N, K, Kw;        // Kw = ceil(K/32)
  const float* tables;     // [M, Kw * 8, 16] (64-byte aligned), from build_tables_*
  int64_t M;
  const float* alpha;  // [N] fp32
  const float* bias;   // [N] fp32 or nullptr
  float* y;            // y[m * ldy + n], fp32; rows [16 * t0, min(N, 16 * t1)) are written
  int64_t ldy;
};

struct A1Args {
  const int32_t* qweight;  // [ceil(N/16), Kw, 16]
  int64_t N, K, Kw;
  const uint32_t* abits;  // [M, Kw] from pack_activations_*
  int64_t M;
  const float* alpha;  // [N] fp32
  const float* bias;   // [N] fp32 or nullptr
  float scale, shift;
  bool use_rowsum;  // shift != 0: add shift * rowsum[n]
  float* y;
  int64_t ldy;
};

// Tables of tokens [0, M) of x (row stride ldx, K valid inputs) into out [M, Kw*8, 16].
void build_tables_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, float* out);
// W1A-fp over row tiles [t0, t1) for all M tokens.
void gemm_fp_scalar(const FpArgs& a, int64_t t0, int64_t t1);
// Bits of x >= shift (ordered compare: NaN -> 0) into out [M, Kw], pad bits 0.
void pack_activations_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, float shift, uint32_t* out);
void gemm_a1_scalar(const A1Args& a, int64_t t0, int64_t t1);

// AVX2 + FMA + F16C (callers check active_cpu_isa() >= kAvx2).
void build_tables_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, float* out);
void gemm_fp_avx2(const FpArgs& a, int64_t t0, int64_t t1);
void pack_activations_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, float shift, uint32_t* out);
void gemm_a1_avx2(const A1Args& a, int64_t t0, int64_t t1);

// AVX-512 F/BW/VL (ISA level avx512vnni); gemm_a1_avx512 also needs AVX512_VPOPCNTDQ
// (cpu_supports_avx512vpopcntdq()).
void build_tables_avx512(const float* x, int64_t ldx, int64_t M, int64_t K, float* out);
void gemm_fp_avx512(const FpArgs& a, int64_t t0, int64_t t1);
void pack_activations_avx512(const float* x, int64_t ldx, int64_t M, int64_t K, float shift, uint32_t* out);
void gemm_a1_avx512(const A1Args& a, int64_t t0, int64_t t1);

}  // namespace binary
}  // namespace slimformer
