// Index, selection and merge math of the token merging CUDA kernels (tome_cuda.cu), as SF_HD functions
// that compile without CUDA or torch, so that the host replays (tome_cuda_test_hooks.h, exposed as
// slimformer._C._test_tome_cuda_*) run what the GPU runs (GUIDE.md section 5b). What only a GPU checks:
// launch geometry, barriers, shuffles / ballots / match_any, shared-memory staging and the hardware
// fp16/bf16 conversions. Every floating-point multiply-add is an explicit fmaf (nvcc would otherwise
// contract a * b + c where the host compiler does not), so a replay is bit-exact, not just close.
//
// tome_match, four launches on one stream (the adapter checks the row counts in between, one sync):
//   1. prepare: one CTA (kPrepThreads) per batch row. Warp per token: inverse norm of every source and
//      destination row (lane l sums c = l, l + 32, ... with fmaf, then an xor butterfly 16..1), dst = -1 /
//      score = -inf for non-sources. Then an order-preserving compaction (ballot + popc per warp, warp
//      totals in smem, a running carry over chunks of kPrepThreads tokens) into src_list (role 0) and
//      dst_list (role 1 with size > 0), and row_info = {sources, real destinations, fallback, destinations}.
//   2. best match: CTA (b, tile) = kTileS consecutive sources of src_list x every real destination, in
//      tiles of kTileD destinations and chunks of kChunkC features staged in smem as normalised fp32
//      (zeros past C and past the lists). Thread t = (ty, tx) = (t / 16, t % 16) owns sources
//      ty + 16k and destinations tx + 16k (k < 4): a 4 x 4 register tile of dot products (fmaf over
//      c in order, so every cosine is the sequential sum of its pair whatever the tiling), folded into
//      a running Best per source with better_match; the 16 tx lanes then combine by an xor butterfly
//      (best_combine: a total order, so the result is the sequential argmax, lowest index on ties).
//      Lane tx == k writes source ty + 16k: finish_source (dst, score).
//   3. rank: CTA (b, tile) = kRankThreads sources, one per thread; the row's scores are staged in smem
//      kRankChunk at a time; rank = #{q : ranks_before(score_q, q, score_p, p)} over compact positions
//      (src_list is increasing, so position order = index order); selected iff rank < r. Skipped for r = 0.
//   4. slots: one CTA (kSlotThreads) per row: keep = !(source && selected); a block scan gives
//      survivor[i] = (number of kept tokens <= i) - 1 (the reference's survivor_slot) in a workspace,
//      then slot[i] = survivor[i] for kept tokens and survivor[dst[i]] for merged sources.
// tome_merge, two launches (the adapter checks slot ranges in between, one sync):
//   1. index: warp per batch row: a stable counting sort of the tokens by slot (CSR ptr [n_out + 1],
//      order [N]): per step 32 tokens, __match_any_sync groups lanes of equal slot; rank within the
//      step = popc(peers below the lane), the highest peer lane (leader) bumps the count / cursor.
//      Invalid slots (outside [0, n_out)) are counted and skipped.
//   2. gather: warp per output row (b, o): S_o = sum of the contributors' sizes in index order (fp32,
//      plain adds), then each lane owns `vec` consecutive columns per chunk of 32 * vec and walks the
//      contributors in index order: acc = fmaf(merge_weight(s_i, S_o, count_o), x_i, acc); one store.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/cuda_warp.h"
#include "common/hostdev.h"
#include "tome/tome_math.h"

namespace slimformer {
namespace tome {
namespace cuda {

// ---- tome_match geometry ----
constexpr int kPrepThreads = 512;
constexpr int kPrepWarps = kPrepThreads / kWarpSize;
constexpr int kMatchThreads = 256;
constexpr int kGroup = 16;  // tx lanes per source group; ty groups per CTA
constexpr int kMicro = 4;   // sources and destinations per thread
constexpr int kTileS = kGroup * kMicro;
constexpr int kTileD = kGroup * kMicro;
constexpr int kChunkC = 32;               // features per smem stage
constexpr int kSmemStride = kChunkC + 1;  // one float of padding: a warp's 32 staged columns hit 32 banks
constexpr int kRankThreads = 256;
constexpr int kRankChunk = 1024;
constexpr int kSlotThreads = 512;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxTokens = kMaxGridY * kTileS;  // N limit of tome_match (source tiles on grid.y)

// ---- tome_merge geometry ----
constexpr int kMergeWarps = 4;  // rows per CTA (input rows in the index kernel, output rows in the gather)

// ---- tokens ----
SF_HD bool role_valid(int8_t role) { return role == kSource || role == kDestination || role == kKeep; }
// Sizes the ops accept (the CPU adapter checks the same): finite and >= 0.
SF_HD bool size_valid(float size) { return isfinite(size) && size >= 0.0f; }
SF_HD bool is_real_destination(int8_t role, float size) { return role == kDestination && size > 0.0f; }
// A row can merge r tokens when it has r sources and a destination (any size) to send them to.
SF_HD bool row_feasible(int64_t sources, int64_t destinations, int64_t r) {
  return r == 0 || (sources >= r && destinations > 0);
}
// row_info[4] of a batch row (prepare kernel).
enum RowInfo : int { kInfoSources = 0, kInfoRealDestinations = 1, kInfoFallback = 2, kInfoDestinations = 3 };
constexpr int kRowInfo = 4;
// A source without a real destination goes to the first destination of its row (index 0 if the row has
// none, as the reference's argmax over an all-false row gives).
SF_HD int32_t fallback_destination(int32_t first_destination, int32_t destinations) {
  return destinations > 0 ? first_destination : 0;
}

// ---- prepare: the warp's part of an order-preserving compaction ----
// Position of a flagged lane among the flagged lanes of its warp (ballot = the warp's flags).
SF_HD int lane_prefix(uint32_t ballot, int lane) { return popcount32(ballot & ((1u << lane) - 1u)); }

// ---- best match tile maps ----
SF_HD int match_ty(int t) { return t / kGroup; }
SF_HD int match_tx(int t) { return t % kGroup; }
SF_HD int match_src_of(int ty, int k) { return ty + kGroup * k; }  // tile row of the thread's k-th source
SF_HD int match_dst_of(int tx, int k) { return tx + kGroup * k; }  // tile row of the thread's k-th destination
// Element e (0 .. kTileS * kChunkC) of a staged chunk: tile row and feature within the chunk (a warp
// loads 32 consecutive features of one row: coalesced).
SF_HD int stage_row(int e) { return e / kChunkC; }
SF_HD int stage_col(int e) { return e % kChunkC; }
SF_HD int smem_index(int row, int c) { return row * kSmemStride + c; }
SF_HD int64_t match_tiles(int64_t n) { return (n + kTileS - 1) / kTileS; }
SF_HD int64_t rank_tiles(int64_t n) { return (n + kRankThreads - 1) / kRankThreads; }

// Running argmax over destinations: value and token index (INT32_MAX before any candidate).
struct Best {
  float v;
  int32_t j;
};
SF_HD Best best_init() { return {-INFINITY, INT32_MAX}; }
SF_HD void best_update(Best& b, float cosine, int32_t j) {
  if (better_match(cosine, j, b.v, b.j)) {
    b.v = cosine;
    b.j = j;
  }
}
// The butterfly step: better_match is a strict total order on (value, index) pairs once NaN is excluded
// (NaN never enters a Best), so combining partial argmaxes in any tree gives the sequential answer.
SF_HD Best best_combine(Best mine, Best other) { return better_match(other.v, other.j, mine.v, mine.j) ? other : mine; }

struct SourceResult {
  int64_t dst;
  float score;
};
// Outputs of a source from its argmax: found iff some real destination gave a non-NaN cosine above -inf.
SF_HD SourceResult finish_source(float size, Best b, int32_t fallback) {
  const bool found = b.v > -INFINITY;
  return {found ? static_cast<int64_t>(b.j) : static_cast<int64_t>(fallback), source_score(size, found, b.v)};
}

SF_HD float dot_step(float a, float b, float acc) { return fmaf(a, b, acc); }
SF_HD float square_step(float v, float acc) { return fmaf(v, v, acc); }

// ---- rank / slots ----
SF_HD bool merges(int64_t rank, int64_t r) { return rank < r; }
SF_HD bool keeps(int8_t role, bool selected, int64_t r) { return !(r > 0 && role == kSource && selected); }

// Workspace of tome_match (byte offsets, each 256-aligned): inv_norm f32 [B, N], src_list i32 [B, N],
// dst_list i32 [B, N], row_info i32 [B, 4], selected u8 [B, N], survivor i32 [B, N].
struct MatchWorkspace {
  int64_t inv_norm, src_list, dst_list, row_info, selected, survivor, bytes;
};
SF_HD int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }
SF_HD MatchWorkspace match_workspace(int64_t B, int64_t N) {
  MatchWorkspace w;
  const int64_t bn = B * N;
  w.inv_norm = 0;
  w.src_list = align256(w.inv_norm + 4 * bn);
  w.dst_list = align256(w.src_list + 4 * bn);
  w.row_info = align256(w.dst_list + 4 * bn);
  w.selected = align256(w.row_info + 4 * kRowInfo * B);
  w.survivor = align256(w.selected + bn);
  w.bytes = align256(w.survivor + 4 * bn);
  return w;
}

// ---- merge ----
SF_HD bool slot_valid(int64_t o, int64_t n_out) { return o >= 0 && o < n_out; }
// Elements per lane load: 16 bytes when the rows are 16-byte aligned (base aligned, D a multiple), else 1.
SF_HD int merge_vec(int64_t D, int elem_bytes, bool base_aligned) {
  const int v = 16 / elem_bytes;
  return base_aligned && D % v == 0 ? v : 1;
}
SF_HD int64_t merge_chunks(int64_t D, int vec) { return (D + kWarpSize * vec - 1) / (kWarpSize * vec); }
SF_HD int64_t merge_col(int64_t chunk, int lane, int vec) { return (chunk * kWarpSize + lane) * vec; }
// Stable placement within one 32-token step: peers = lanes holding the same slot (match_any).
SF_HD int peer_rank(uint32_t peers, int lane) { return lane_prefix(peers, lane); }
SF_HD int peer_leader(uint32_t peers) {  // highest peer lane (peers != 0): the one that advances the cursor
#if defined(__CUDA_ARCH__)
  return 31 - __clz(peers);
#else
  return 31 - __builtin_clz(peers);
#endif
}

// Workspace of tome_merge: ptr i32 [B, n_out + 1], cursor i32 [B, n_out], order i32 [B, N].
struct MergeWorkspace {
  int64_t ptr, cursor, order, bytes;
};
SF_HD MergeWorkspace merge_workspace(int64_t B, int64_t N, int64_t n_out) {
  MergeWorkspace w;
  w.ptr = 0;
  w.cursor = align256(4 * B * (n_out + 1));
  w.order = align256(w.cursor + 4 * B * n_out);
  w.bytes = align256(w.order + 4 * B * N);
  return w;
}

}  // namespace cuda
}  // namespace tome
}  // namespace slimformer
