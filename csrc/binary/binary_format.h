// Bit layout v1 of slimformer's 1-bit weights (torch-free; CPU and CUDA kernels share it).
//
// A binary weight S in {-1,+1}^[N, K] (N = out_features, K = in_features, nn.Linear orientation)
// is stored as `qweight` int32 [ceil(N/16), ceil(K/32), 16]:
//   element [t, w, r], bit i  ==  1  iff  S[16*t + r, 32*w + i] == +1.
// Tiles of 16 output rows: for a fixed 32-wide slice w of K, the words of 16 consecutive rows are
// contiguous (64 bytes), so one 512-bit (or two 256-bit) loads hold one slice of 16 rows. That is
// what the CPU kernels vectorise over (vpermps table lookups and vpopcntd run across rows) and what
// a CUDA warp reads coalesced. Within a word, bit i is input 32*w + i (little-endian), so nibble j
// (bits 4j..4j+3) holds inputs 32*w + 4j .. 32*w + 4j + 3 with the lowest input in the lowest bit.
// Padding (rows >= N, inputs >= K) is 0. Kernels rely on it: a 0 weight bit meets a 0 activation
// (W1A-fp: x padded with 0.0; W1A1: packed activation pad bits are 0, so XOR and popcount ignore them).
//
// Activations of the W1A1 op are packed the same way along K, one row per token:
// [M, ceil(K/32)] words, bit i of word w == 1 iff x[m, 32*w + i] >= act_shift (+1), pad bits 0.
// Then for a row pair, sum_k S*T over the real K = K - 2 * popcount(wbits XOR abits) summed over words.
//
// The Python side (slimformer/binary/packing.py) packs and unpacks exactly this; its
// LAYOUT_VERSION must change together with this comment.
#pragma once
#include <stdint.h>

#include "common/hostdev.h"

namespace slimformer {
namespace binary {

constexpr int kLayoutVersion = 1;
constexpr int kTileRows = 16;   // output rows per tile
constexpr int kWordBits = 32;   // inputs per word

SF_HD int64_t row_tiles(int64_t N) { return (N + kTileRows - 1) / kTileRows; }
SF_HD int64_t words_per_row(int64_t K) { return (K + kWordBits - 1) / kWordBits; }

// Index of the word that holds inputs [32*w, 32*w + 32) of output row n.
SF_HD int64_t word_index(int64_t n, int64_t w, int64_t words) {
  return ((n / kTileRows) * words + w) * kTileRows + (n % kTileRows);
}

// sum_k s_k * t_k over `bits` valid positions, given popcount(s XOR t) over them.
SF_HD int32_t pm1_dot(int32_t valid_bits, int32_t xor_popcount) {
  return valid_bits - 2 * xor_popcount;
}

}  // namespace binary
}  // namespace slimformer
