// Portable kernels of the token merging ops (the algorithm of tome_cpu_impl.h with one-lane
// "vectors"), and the ISA-independent selection step of tome_match (tome_select_rows).
#include "tome/tome_cpu.h"

namespace slimformer::tome {
namespace {

struct Scalar1 {
  using F = float;
  using I = int32_t;
  static constexpr int W = 1;
  static constexpr int MR = 4, NV = 4, MV = 4;

  static F zero() { return 0.0f; }
  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F mul(F a, F b) { return a * b; }
  static void transpose(const float* src, int64_t, float* dst, int64_t) { *dst = *src; }
  static I iota(int32_t base) { return base; }
  static void store_i(int32_t* p, I v) { *p = v; }
  static void argmax_update(F v, I col, F& best, I& idx) {
    if (better_match(v, col, best, idx)) best = v, idx = col;  // cols ascend: equal never replaces
  }
  static void reduce_argmax(F best, I idx, float& v, int32_t& j) { v = best, j = idx; }
  static F load_f16(const uint16_t* p);
  static F load_bf16(const uint16_t* p);
  static void store_f16(uint16_t* p, F v);
  static void store_bf16(uint16_t* p, F v);
};

}  // namespace
}  // namespace slimformer::tome

#include "tome/tome_cpu_impl.h"

namespace slimformer::tome {
namespace {

float Scalar1::load_f16(const uint16_t* p) { return half_bits_to_float(*p); }
float Scalar1::load_bf16(const uint16_t* p) { return bf16_bits_to_float(*p); }
void Scalar1::store_f16(uint16_t* p, float v) { *p = float_to_half_bits(v); }
void Scalar1::store_bf16(uint16_t* p, float v) { *p = float_to_bf16_bits(v); }

}  // namespace

void tome_match_sources_scalar(const TomeMatchParams& p, int64_t i0, int64_t i1) { match_items<Scalar1>(p, i0, i1); }
void tome_merge_scalar(const TomeMergeParams& p, int64_t i0, int64_t i1) { merge_items<Scalar1>(p, i0, i1); }

void tome_select_rows(const TomeMatchParams& p, int64_t b0, int64_t b1) {
  const int64_t N = p.tokens;
  std::vector<int32_t> src;
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* roles = p.roles + b * N;
    int64_t* dst = p.dst + b * N;
    float* score = p.score + b * N;
    int64_t* slot = p.slot + b * N;
    src.clear();
    for (int64_t i = 0; i < N; ++i) {
      slot[i] = 0;  // survivor until chosen
      if (roles[i] == kSource) {
        src.push_back(static_cast<int32_t>(i));
      } else {
        dst[i] = -1;
        score[i] = -INFINITY;
      }
    }
    const int64_t na = static_cast<int64_t>(src.size());
    const int64_t r = std::min(p.r, na);  // the adapter guarantees r <= na
    if (r > 0 && r < na) {
      std::nth_element(src.begin(), src.begin() + r, src.end(), [score](int32_t a, int32_t c) {
        return ranks_before(score[a], a, score[c], c);
      });
    }
    for (int64_t k = 0; k < r; ++k) slot[src[k]] = -1;
    int64_t n = 0;
    for (int64_t i = 0; i < N; ++i)
      if (slot[i] == 0) slot[i] = n++;
    for (int64_t k = 0; k < r; ++k) slot[src[k]] = slot[dst[src[k]]];  // a destination: always a survivor
  }
}

}  // namespace slimformer::tome
