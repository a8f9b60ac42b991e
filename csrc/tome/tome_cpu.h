// Torch-free CPU kernels of the token merging ops (meaning: python/slimformer/tome/reference.py,
// shared rules: tome_math.h). The ATen adapter (tome_cpu_op.cpp) validates every input (so the
// kernels never see an out-of-range role, slot or size), allocates the outputs, splits the work
// items across threads and picks the implementation (scalar, AVX2 or AVX-512) at run time.
//
// Also the first include of every kernel translation unit: as in sparse_attention_cpu_prelude.h,
// the SIMD files compile their kernels inside a `#pragma GCC target` region, so every header with
// inline or template code that other translation units also compile (the standard library,
// common/float_bits.h, tome_math.h) is included here, before that region; the kernel templates
// (tome_cpu_impl.h) live in an anonymous namespace inside each region.
//
// tome_match, per batch row b (work item (b, k): the k-th of `chunks` equal runs of the row's
// sources, so that a small batch of long rows still keeps every thread busy):
//   the row's real destinations (role 1, size > 0) are normalised once per item into a transposed
//   buffer Dt [C][Nb] (fp32; columns past Nb are NaN, which never wins an argmax), the item's sources
//   likewise into St [C][Na]; tiles of MR sources are scored against all destinations by
//   register-blocked FMAs (MR broadcast source values x NV vectors of destinations per channel) into
//   a [MR][Nb] buffer, then a running max / argmax per lane and a lane reduction pick each source's
//   destination (tome::better_match's order); the similarity matrix is never stored. Writes dst
//   and score of the item's sources.
// tome_select_rows, per row (after every item of the row): non-sources get dst -1 / score -inf, the
//   r sources that rank first (tome::ranks_before) merge, survivors are numbered in order and a
//   merged source takes its destination's slot.
// tome_merge, per work item (b, d-chunk): S_o (summed in double) and count_o of each slot, the
//   inputs of every slot in ascending order (a counting sort), then out[o][d-chunk] = sum_i
//   merge_weight(s_i, S_o, count_o) x_i accumulated in fp32 registers and written once in x's dtype.
//   The item of d-chunk 0 also writes out_sizes.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/float_bits.h"
#include "tome/tome_math.h"

namespace slimformer::tome {

enum class TomeDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct TomeMatchParams {
  int64_t batch = 0, tokens = 0, channels = 0;  // metric [B, N, C]
  int64_t r = 0;
  int64_t chunks = 1;  // source chunks per row: work items of the match are batch * chunks
  TomeDtype dtype = TomeDtype::kFloat32;
  const void* metric = nullptr;    // [B, N, C] contiguous, dtype
  const float* sizes = nullptr;    // [B, N] contiguous, finite, >= 0
  const int8_t* roles = nullptr;   // [B, N] contiguous, values in {0, 1, 2}
  int64_t* slot = nullptr;         // [B, N] outputs
  int64_t* dst = nullptr;
  float* score = nullptr;
};

struct TomeMergeParams {
  int64_t batch = 0, tokens = 0, dim = 0;  // x [B, N, D]
  int64_t n_out = 0;
  int64_t d_chunk = 0;  // columns per work item (> 0): items are batch * ceil(dim / d_chunk), at least batch
  TomeDtype dtype = TomeDtype::kFloat32;
  const void* x = nullptr;        // [B, N, D] contiguous, dtype
  const float* sizes = nullptr;   // [B, N] contiguous, finite, >= 0
  const int64_t* slot = nullptr;  // [B, N] contiguous, values in [0, n_out)
  void* out = nullptr;            // [B, n_out, D] dtype
  float* out_sizes = nullptr;     // [B, n_out]
};

inline int64_t match_items(const TomeMatchParams& p) { return p.batch * p.chunks; }
inline int64_t merge_chunks(const TomeMergeParams& p) {
  return p.dim <= 0 ? 1 : (p.dim + p.d_chunk - 1) / p.d_chunk;
}
inline int64_t merge_items(const TomeMergeParams& p) { return p.batch * merge_chunks(p); }

// Match work items [i0, i1) (writes dst and score of the items' sources).
void tome_match_sources_scalar(const TomeMatchParams& p, int64_t i0, int64_t i1);
void tome_match_sources_avx2(const TomeMatchParams& p, int64_t i0, int64_t i1);    // AVX2 + FMA + F16C
void tome_match_sources_avx512(const TomeMatchParams& p, int64_t i0, int64_t i1);  // AVX-512 F/BW/VL
// Rows [b0, b1): selection and slots (ISA-independent; tome_cpu_scalar.cpp).
void tome_select_rows(const TomeMatchParams& p, int64_t b0, int64_t b1);

// Merge work items [i0, i1).
void tome_merge_scalar(const TomeMergeParams& p, int64_t i0, int64_t i1);
void tome_merge_avx2(const TomeMergeParams& p, int64_t i0, int64_t i1);
void tome_merge_avx512(const TomeMergeParams& p, int64_t i0, int64_t i1);

}  // namespace slimformer::tome
