// gptq_gemm_a8: the GPTQ matmul with activations quantized on the fly to int8 (llama.cpp-style), so
// the inner loop is an integer dot product (AVX2 vpmaddubsw, AVX-VNNI or AVX-512 VNNI vpdpbusd) instead of
// unpack + convert + FMA. Opt-in: it trades exactness for speed (see the quantization rule below).
//
// Rule (defines the op; python/slimformer/gptq/reference.py implements it in PyTorch): in kernel k
// order, each row of x is cut into blocks = [32b, 32b + 32) intersected with a segment (a run of
// equal g_idx). Per block, amax = max |x|; xq = round_half_even(x * (127 / amax)) in fp32 and
// dx = amax / 127. Edge cases: amax = 0, or 127 / amax overflowing (|x| < ~4e-37), gives xq = 0 and
// dx = 0; a NaN or inf in the block gives dx = NaN (the block's contribution is NaN). The op returns
// x_hat @ W (+ bias) with x_hat = dx * xq: integer dot products per block, exact, then scaled. The integer kernels take bits 2, 4 and 8 (3-bit values
// straddle bytes); 3-bit weights run the same rule through the float kernel.
#pragma once
#include <stdint.h>

#include <vector>

#include "gptq/gptq_cpu.h"

namespace slimformer {
namespace gptq {

constexpr int kA8Block = 32;  // k per activation scale

// Passes of a dot product over one packed word: pass p takes the byte-lane values
// (word >> bits*p) & byte_mask, i.e. values j = (8/bits)*b + p of bytes b = 0..3.
constexpr int a8_passes(int bits) { return 8 / bits; }

// Quantized activations laid out for the kernels, built once per call by prepare_a8().
struct A8Activations {
  int64_t M = 0, unit_slots = 0, block_slots = 0;
  std::vector<int64_t> seg_unit_slot;   // [nseg + 1] first unit slot of each segment
  std::vector<int64_t> seg_block_slot;  // [nseg + 1] first block slot of each segment
  std::vector<int8_t> xq;               // [M, K] quantized x (each k belongs to one segment)
  std::vector<int32_t> xq_units;        // [M, unit_slots, passes]: per (segment, word) the four
                                        // int8 of each pass packed in an int32; 0 outside the segment
  std::vector<float> dx;                // [M, block_slots] scale of each (segment, block)
  std::vector<float> xsum;              // [M, nseg] sum of x_hat over each segment
};

struct A8Args {
  Weights w;
  const Segment* segs;
  int64_t nseg;
  const A8Activations* act;
  float* y;  // [M, N]; columns [n_begin, n_end) are overwritten
};

bool a8_supported_bits(int bits);
void prepare_a8(const float* x, int64_t M, int64_t K, int bits, const Segment* segs, int64_t nseg,
                A8Activations& out);

// x_hat = dx * xq [M, K]: the activations the op multiplies, for the float-kernel fallback.
void dequantize_a8(const A8Activations& act, const Segment* segs, int64_t nseg, int64_t K, float* x_hat);

void gemm_a8_scalar(const A8Args& a, int64_t n_begin, int64_t n_end);
// Same arithmetic; callers check the CPU features (AVX2, AVX-VNNI, resp. AVX-512 VNNI) first.
void gemm_a8_avx2(const A8Args& a, int64_t n_begin, int64_t n_end);
void gemm_a8_avxvnni(const A8Args& a, int64_t n_begin, int64_t n_end);
void gemm_a8_avx512vnni(const A8Args& a, int64_t n_begin, int64_t n_end);

}  // namespace gptq
}  // namespace slimformer
