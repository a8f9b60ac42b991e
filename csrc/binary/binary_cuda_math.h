// Bit and index math of the CUDA binary-weight kernels (binary_cuda.cu), as __host__ __device__
// functions that compile without CUDA or torch, so that the CPU tests (tests/test_binary_cuda_math.py,
// through slimformer._C._test_binary_cuda_* hooks, binary_cuda_test_hooks.h) run exactly what the GPU
// runs (GUIDE.md section 5b). What only a GPU checks: launch geometry, barriers, shuffles, ballots,
// atomics and the hardware fp16/bf16 conversions.
//
// W1A-fp gemv (M <= kMaxGemvTokens): block = kGemvWarps warps, one 16-row tile (blockIdx.x), a token
//   tile of TM in {1,2,4,8} tokens (blockIdx.z) and one split of the K words (blockIdx.y). Per chunk
//   of kChunkWords words the block stages x [TM][chunk] as fp32 in shared memory (stride
//   kXWordStride per word), then lane (half h, row r) of warp j takes chunk-local word 2*(j + 4s) + h
//   of row r for steps s = 0..3: the warp's 32 loads are 2 consecutive words of 16 rows, 128
//   contiguous bytes of layout v1. Each bit adds +-x by flipping x's sign bit (signed_input). Lanes
//   r and r+16 meet by a shuffle, warps in shared memory in a fixed order; one split stores
//   alpha * s + bias, several add s into an fp32 workspace (atomics) that finish_kernel turns into y.
// W1A1: pack_kernel turns x into activation words (one warp per word: ballot of act_bit); then
//   a1_kernel, block = 128 threads, a tile of kA1Tokens tokens x kA1Rows rows, K in chunks of
//   kA1ChunkWords words staged in shared memory; a thread owns 4 tokens x 4 rows of popcount
//   accumulators plus the popcounts of its 4 rows (for rowsum), all exact int32.
// Large-M W1A-fp: unpack_kernel writes S (+-1) in x's dtype for cuBLAS.
#pragma once
#include <math.h>
#include <stdint.h>

#include "binary/binary_format.h"
#include "common/cuda_warp.h"
#include "common/float_bits.h"

#ifndef SF_UNROLL
#if defined(__CUDACC__)
#define SF_UNROLL _Pragma("unroll")
#else
#define SF_UNROLL
#endif
#endif

namespace slimformer {
namespace binary {
namespace cuda {

// ---- W1A-fp gemv ----
constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = kGemvWarps * kWarpSize;
constexpr int kChunkWords = 32;                         // K words staged per step (1024 inputs)
constexpr int kChunkInputs = kChunkWords * kWordBits;   // 1024
// 32 floats + 4 of padding per word: the two half-warps read two words' float4s at once, and with a
// stride of 32 both would sit in the same banks (2-way conflict); 36 puts them 4 banks apart and
// keeps every word 16-byte aligned.
constexpr int kXWordStride = 36;
constexpr int kXTokenStride = kChunkWords * kXWordStride;  // floats per staged token
constexpr int kPairsPerChunk = kChunkWords / 2;
constexpr int kGemvSteps = kPairsPerChunk / kGemvWarps;    // word pairs per warp and chunk (4)
constexpr int kMaxTokenTile = 8;
constexpr int kMaxGemvTokens = 64;  // the adapter's limit; larger M: unpack + cuBLAS
constexpr int kTargetBlocksPerSm = 4;
constexpr int64_t kMaxGridYZ = 65535;

// ---- W1A1 ----
constexpr int kA1Threads = 128;
constexpr int kA1Tokens = 32;                       // tokens per block
constexpr int kA1TileGroup = 4;                     // 16-row tiles per block
constexpr int kA1Rows = kA1TileGroup * kTileRows;   // 64 rows per block
constexpr int kA1ChunkWords = 32;
constexpr int kA1ThreadTokens = 4;                  // a thread's 4 tokens x 4 rows
constexpr int kA1ThreadRows = 4;
constexpr int kA1RowThreads = kA1Rows / kA1ThreadRows;  // 16 (tx), times 8 token groups (ty)
constexpr int kAWordStride = kA1ChunkWords + 1;     // staged activation words per token (+1: no bank conflicts)
constexpr int kPackThreads = 256;
constexpr int kUnpackThreads = 256;

struct alignas(16) F4 {
  float x, y, z, w;
};
struct alignas(16) U4 {
  uint32_t x, y, z, w;
};

struct Range {
  int64_t begin, end;
};

SF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Part i of `parts` balanced parts of [0, total), in order, sizes differing by at most one.
SF_HD Range split_range(int64_t total, int64_t parts, int64_t i) {
  const int64_t base = total / parts, extra = total % parts;
  const int64_t begin = i * base + (i < extra ? i : extra);
  return {begin, begin + base + (i < extra ? 1 : 0)};
}

// The sign-bit mask of weight bit i: 0 when the bit is set (+1), 0x80000000 when clear (-1).
SF_HD uint32_t sign_mask(uint32_t word, int i) { return (~word << (31 - i)) & 0x80000000u; }

// x * S where S = +1 if bit i of `word` is set, else -1: flipping the sign bit is exact for every x
// (zeros, infinities and NaNs included), one LOP3 instead of a multiply.
SF_HD float signed_input(float x, uint32_t word, int i) { return bits_float(float_bits(x) ^ sign_mask(word, i)); }

// +1.0f / -1.0f for bit i of `word` (the unpack kernel).
SF_HD float sign_of_bit(uint32_t word, int i) { return ((word >> i) & 1u) ? 1.0f : -1.0f; }

// Four consecutive inputs i0..i0+3 of one word, summed as a tree (shorter dependency chains).
SF_HD float signed_sum4(const F4& v, uint32_t word, int i0) {
  return (signed_input(v.x, word, i0) + signed_input(v.y, word, i0 + 1)) +
         (signed_input(v.z, word, i0 + 2) + signed_input(v.w, word, i0 + 3));
}

// ---- gemv geometry ----

// Token tile (template parameter) for M tokens.
SF_HD int gemv_token_tile(int64_t M) { return M <= 1 ? 1 : (M <= 2 ? 2 : (M <= 4 ? 4 : kMaxTokenTile)); }

struct GemvPlan {
  int tm;                // tokens per block
  int64_t token_blocks;  // gridDim.z
  int64_t row_tiles;     // gridDim.x
  int64_t splits;        // gridDim.y: K words split across blocks (> 1 needs the fp32 workspace)
};

// Enough blocks for kTargetBlocksPerSm per SM, but every split keeps at least one full chunk.
SF_HD GemvPlan plan_gemv(int64_t M, int64_t N, int64_t K, int sm_count) {
  GemvPlan p;
  p.tm = gemv_token_tile(M);
  p.token_blocks = ceil_div(M, p.tm);
  p.row_tiles = row_tiles(N);
  const int64_t blocks = p.row_tiles * p.token_blocks;
  const int64_t want = ceil_div(static_cast<int64_t>(sm_count) * kTargetBlocksPerSm, blocks);
  const int64_t most = words_per_row(K) / kChunkWords;
  int64_t s = want < most ? want : most;
  s = s < kMaxGridYZ ? s : kMaxGridYZ;
  p.splits = s < 1 ? 1 : s;
  return p;
}

// Staging entry e (0 <= e < TM * kChunkInputs; consecutive threads take consecutive inputs, so the
// global reads are coalesced): its token and input within the chunk, and its shared-memory slot.
SF_HD int stage_token(int e) { return e / kChunkInputs; }
SF_HD int stage_input(int e) { return e % kChunkInputs; }
SF_HD int x_smem_index(int token, int input) {
  return token * kXTokenStride + (input / kWordBits) * kXWordStride + input % kWordBits;
}
// The element of x [M, K] that staging entry e of the chunk starting at word c0 holds, or -1 for a
// zero (token >= M or input >= K).
SF_HD int64_t stage_source(int e, int64_t m0, int64_t c0, int64_t M, int64_t K) {
  const int64_t m = m0 + stage_token(e), k = c0 * kWordBits + stage_input(e);
  return (m < M && k < K) ? m * K + k : -1;
}

// Lane l of a gemv warp: row l % 16 of the tile, half l / 16 (which word of the pair).
SF_HD int lane_row(int lane) { return lane % kTileRows; }
SF_HD int lane_half(int lane) { return lane / kTileRows; }
// Chunk-local word of `lane` of warp `warp` in step s.
SF_HD int gemv_local_word(int warp, int step, int lane) {
  return 2 * (warp + step * kGemvWarps) + lane_half(lane);
}

// One lane's work on one weight word: acc[m] += sum_i x[m, word's input i] * S_i for TM tokens,
// reading the staged x (xs = block's stage, lw = chunk-local word).
template <int TM>
SF_HD void accumulate_word(const float* xs, int lw, uint32_t word, float (&acc)[TM]) {
  SF_UNROLL
  for (int m = 0; m < TM; ++m) {
    const F4* xw = reinterpret_cast<const F4*>(xs + m * kXTokenStride + lw * kXWordStride);
    SF_UNROLL
    for (int j = 0; j < kWordBits / 4; ++j) acc[m] += signed_sum4(xw[j], word, 4 * j);
  }
}

// Block reduction entry e (0 <= e < TM * 16): token and row of the tile.
SF_HD int reduce_token(int e) { return e / kTileRows; }
SF_HD int reduce_row(int e) { return e % kTileRows; }

// y = alpha * s + bias (one rounding: fused multiply-add, on the host too).
SF_HD float gemv_epilogue(float s, float alpha, float bias) { return fmaf(alpha, s, bias); }

// ---- W1A1 ----

// Activation bit of input x against act_shift: 1 (+1) iff x >= shift; pad lanes (valid false) and
// NaN give 0. The pack kernel's __ballot_sync of this over 32 lanes is the word (bit i = lane i).
SF_HD bool act_bit(float x, float shift, bool valid) { return valid && x >= shift; }

// The host equivalent of that ballot: word w of a token from its inputs x[0 .. n_valid).
SF_HD uint32_t pack_word(const float* x, int n_valid, float shift) {
  uint32_t word = 0;
  for (int i = 0; i < kWordBits; ++i) {
    const bool v = i < n_valid;
    word |= static_cast<uint32_t>(act_bit(v ? x[i] : 0.0f, shift, v)) << i;
  }
  return word;
}

// Warp g of the pack grid (g < M * words): token g / words, word g % words; lane i's input index
// and how many of the word's 32 inputs are real.
SF_HD int64_t pack_token(int64_t g, int64_t words) { return g / words; }
SF_HD int64_t pack_word_of(int64_t g, int64_t words) { return g % words; }
SF_HD int pack_valid(int64_t w, int64_t K) {
  const int64_t left = K - w * kWordBits;
  return left >= kWordBits ? kWordBits : static_cast<int>(left);
}

// Weight staging entry e (0 <= e < kA1TileGroup * kA1ChunkWords * 16) of row group g, chunk c0:
// the qweight element (or -1 for a zero: tile or word past the end) and the shared slot
// wsm[word][row] (row = tile-in-group * 16 + r). For one tile, consecutive e are consecutive
// qweight elements (coalesced).
SF_HD int64_t a1_weight_source(int e, int64_t group, int64_t c0, int64_t tiles, int64_t words) {
  const int ti = e / (kA1ChunkWords * kTileRows), rem = e % (kA1ChunkWords * kTileRows);
  const int64_t t = group * kA1TileGroup + ti, w = c0 + rem / kTileRows;
  return (t < tiles && w < words) ? (t * words + w) * kTileRows + rem % kTileRows : -1;
}
SF_HD int a1_weight_slot(int e) {
  const int ti = e / (kA1ChunkWords * kTileRows), rem = e % (kA1ChunkWords * kTileRows);
  return (rem / kTileRows) * kA1Rows + ti * kTileRows + rem % kTileRows;
}
// Activation staging entry e (0 <= e < kA1Tokens * kA1ChunkWords): packed activation word
// (abits [M, words]) or -1, and the slot asm[token * kAWordStride + word].
SF_HD int64_t a1_act_source(int e, int64_t m0, int64_t c0, int64_t M, int64_t words) {
  const int64_t m = m0 + e / kA1ChunkWords, w = c0 + e % kA1ChunkWords;
  return (m < M && w < words) ? m * words + w : -1;
}
SF_HD int a1_act_slot(int e) { return (e / kA1ChunkWords) * kAWordStride + e % kA1ChunkWords; }

// Thread t of an a1 block: rows 4*tx .. 4*tx+3 and tokens 4*ty .. 4*ty+3 of the block's tile.
SF_HD int a1_tx(int t) { return t % kA1RowThreads; }
SF_HD int a1_ty(int t) { return t / kA1RowThreads; }

// One chunk-local word wl of the thread's tile: XOR-popcounts of 4 tokens x 4 rows and the
// popcounts of the 4 rows' weight words.
SF_HD void a1_step(const uint32_t* as, const uint32_t* wsm, int wl, int tx, int ty, int (&pc)[4][4],
                   int (&rpc)[4]) {
  const U4 w = *reinterpret_cast<const U4*>(wsm + wl * kA1Rows + tx * kA1ThreadRows);
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
  SF_UNROLL
  for (int i = 0; i < 4; ++i) rpc[i] += popcount32(wv[i]);
  SF_UNROLL
  for (int j = 0; j < 4; ++j) {
    const uint32_t a = as[(ty * kA1ThreadTokens + j) * kAWordStride + wl];
    SF_UNROLL
    for (int i = 0; i < 4; ++i) pc[j][i] += popcount32(a ^ wv[i]);
  }
}

// y = alpha * (scale * dot + shift * rowsum) + bias, dot = K - 2 * popcount(a XOR w),
// rowsum = 2 * popcount(w) - K; dot and rowsum are exact in fp32 for K < 2^24.
SF_HD float a1_epilogue(int K, int xor_popcount, int row_popcount, float alpha, float scale, float shift,
                        float bias) {
  const float dot = static_cast<float>(pm1_dot(K, xor_popcount));
  const float rowsum = static_cast<float>(2 * row_popcount - K);
  return fmaf(alpha, fmaf(scale, dot, shift * rowsum), bias);
}

// Grid of a1_kernel: x = row groups, y = token tiles (grid-strided past the limit).
SF_HD int64_t a1_row_groups(int64_t N) { return ceil_div(row_tiles(N), kA1TileGroup); }
SF_HD int64_t a1_token_tiles(int64_t M) { return ceil_div(M, kA1Tokens); }

}  // namespace cuda
}  // namespace binary
}  // namespace slimformer
