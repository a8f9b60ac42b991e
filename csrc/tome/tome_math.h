// Token merging rules shared by the CPU and CUDA kernels (SF_HD, so CPU tests run what the GPU runs).
// Meaning: python/slimformer/tome/reference.py (roles, sentinel scores, ranking, merge weights).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hostdev.h"

namespace slimformer::tome {

// Role of a token in one matching step (int8 roles tensor).
enum Role : int8_t { kSource = 0, kDestination = 1, kKeep = 2 };

// Scores of sources that have no cosine to rank by: padding (size 0) ranks below every cosine,
// and a source with no real destination (or only NaN similarities) below padding.
constexpr float kScorePadding = -2.0f;
constexpr float kScoreNoDestination = -3.0f;
constexpr float kNormEps = 1e-12f;

// 1 / max(||m||, eps) from sum of squares.
SF_HD float inverse_norm(float sum_of_squares) { return 1.0f / fmaxf(sqrtf(sum_of_squares), kNormEps); }

// Argmax update over destinations: a strictly larger cosine wins, equal cosines go to the lower
// index (so a parallel reduction gives the sequential answer). NaN never wins.
SF_HD bool better_match(float cosine, int64_t j, float best, int64_t best_j) {
  return cosine > best || (cosine == best && j < best_j);
}

// Merge ranking: higher score first, lower index on ties (a strict total order over sources).
SF_HD bool ranks_before(float score_a, int64_t a, float score_b, int64_t b) {
  return score_a > score_b || (score_a == score_b && a < b);
}

// Final score of a source from its best real cosine (found = a real destination was seen).
SF_HD float source_score(float size, bool found, float best_cosine) {
  if (!(size > 0.0f)) return kScorePadding;
  return found ? best_cosine : kScoreNoDestination;
}

// Weight of an input token in its output slot: size-weighted, or an unweighted mean when only
// size-0 (padding) tokens reached the slot.
SF_HD float merge_weight(float size, float slot_size, int32_t slot_count) {
  return slot_size > 0.0f ? size / slot_size : 1.0f / static_cast<float>(slot_count);
}

}  // namespace slimformer::tome
