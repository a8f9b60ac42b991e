// Portable CPU kernels of the 1-bit weight ops (no SIMD): the same table method and the same
// float operation order as the AVX2 / AVX-512 kernels (binary_cpu.h), so results match bit for bit.
#include <algorithm>

#include "binary/binary_cpu.h"

namespace slimformer {
namespace binary {
namespace {

inline uint32_t popcount32(uint32_t v) {  // SWAR: the portable build has no popcnt instruction
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0F0F0F0Fu;
  return (v * 0x01010101u) >> 24;
}

}  // namespace

void build_tables_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, float* out) {
  const int64_t Kw = words_per_row(K), groups = Kw * 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float* T = out + m * table_floats_per_token(Kw);
    for (int64_t g = 0; g < groups; ++g) {
      float v[4];
      for (int i = 0; i < 4; ++i) v[i] = 4 * g + i < K ? xm[4 * g + i] : 0.0f;
      for (int p = 0; p < 16; ++p) {
        const float s0 = (p & 1) ? v[0] : -v[0], s1 = (p & 2) ? v[1] : -v[1];
        const float s2 = (p & 4) ? v[2] : -v[2], s3 = (p & 8) ? v[3] : -v[3];
        T[g * 16 + p] = ((s0 + s1) + s2) + s3;
      }
    }
  }
}

void gemm_fp_scalar(const FpArgs& a, int64_t t0, int64_t t1) {
  const int64_t Kw = a.Kw;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t rows = std::min<int64_t>(kTileRows, a.N - t * kTileRows);
    const uint32_t* q = reinterpret_cast<const uint32_t*>(a.qweight) + t * Kw * kTileRows;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* T = a.tables + m * table_floats_per_token(Kw);
      float acc[kTileRows] = {};
      for (int64_t w = 0; w < Kw; ++w) {
        const float* Tw = T + w * 128;
        for (int64_t r = 0; r < rows; ++r) {
          const uint32_t b = q[w * kTileRows + r];
          float v[8];
          for (int j = 0; j < 8; ++j) v[j] = Tw[16 * j + ((b >> (4 * j)) & 15u)];
          acc[r] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
        }
      }
      float* y = a.y + m * a.ldy + t * kTileRows;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = t * kTileRows + r;
        const float v = acc[r] * a.alpha[n];
        y[r] = a.bias ? v + a.bias[n] : v;
      }
    }
  }
}

void pack_activations_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, float shift, uint32_t* out) {
  const int64_t Kw = words_per_row(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    for (int64_t w = 0; w < Kw; ++w) {
      uint32_t word = 0;
      const int64_t n = std::min<int64_t>(kWordBits, K - w * kWordBits);
      for (int64_t i = 0; i < n; ++i) word |= static_cast<uint32_t>(xm[w * kWordBits + i] >= shift) << i;
      out[m * Kw + w] = word;
    }
  }
}

void gemm_a1_scalar(const A1Args& a, int64_t t0, int64_t t1) {
  const int64_t Kw = a.Kw;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t rows = std::min<int64_t>(kTileRows, a.N - t * kTileRows);
    const uint32_t* q = reinterpret_cast<const uint32_t*>(a.qweight) + t * Kw * kTileRows;
    float rowsum[kTileRows] = {};
    if (a.use_rowsum) {
      for (int64_t r = 0; r < rows; ++r) {
        int32_t pc = 0;
        for (int64_t w = 0; w < Kw; ++w) pc += popcount32(q[w * kTileRows + r]);
        rowsum[r] = static_cast<float>(2 * pc - a.K);
      }
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const uint32_t* act = a.abits + m * Kw;
      int32_t pc[kTileRows] = {};
      for (int64_t w = 0; w < Kw; ++w)
        for (int64_t r = 0; r < rows; ++r) pc[r] += popcount32(act[w] ^ q[w * kTileRows + r]);
      float* y = a.y + m * a.ldy + t * kTileRows;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = t * kTileRows + r;
        float v = a.scale * static_cast<float>(pm1_dot(static_cast<int32_t>(a.K), pc[r]));
        if (a.use_rowsum) v = v + a.shift * rowsum[r];
        v = a.alpha[n] * v;
        y[r] = a.bias ? v + a.bias[n] : v;
      }
    }
  }
}

}  // namespace binary
}  // namespace slimformer
