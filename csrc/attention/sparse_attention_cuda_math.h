// Index, mask and softmax math of the CUDA sparse flash attention kernels (sparse_attention_cuda.cu),
// as __host__ __device__ functions that compile without CUDA or torch, so that the CPU tests
// (tests/test_sparse_attention_cuda_math.py, through slimformer._C._test_sparse_cuda_* hooks in
// sparse_attention_cuda_test_hooks.h) run exactly what the GPU runs (GUIDE.md section 5b). What only a
// GPU checks: launch geometry, barriers, shuffles, the mma instruction itself, smem staging and the
// hardware fp16/bf16 conversions.
//
// Forward, fp16/bf16 (tensor cores, mma.sync.m16n8k16 through inline PTX, fp32 accumulation):
//   CTA = mma_warps(block_size) warps (4 when block_size % 64 == 0), each owning 16 query rows; the CTA
//   covers 16 * warps consecutive positions of one plan query tile (blockIdx.x = plan row * sub-tiles +
//   sub-tile), one query head (blockIdx.y), one batch row (blockIdx.z). Q stays in registers as A
//   fragments. The CTA walks its row-CSR entries; each key tile is cut into chunks of kKeyChunk (64)
//   keys staged in shared memory (K and V, row stride D + kSmemPad halves); S = Q K^T is 8 n-tiles of
//   m16n8, the online softmax runs on the C fragments (quad shuffles for row max), P is repacked from C
//   to A fragments in registers (p_tile_of_a / p_elem_of_a) and O += P V. Element masks are evaluated
//   only on chunks that need them (chunk_needs_mask: partial tiles, key padding, causal diagonal,
//   ragged key tails).
// Forward, fp32 and the whole backward (SIMT): CTA = 128 threads = 16 owner rows x 8 lanes; lane u of
//   a row owns dims u, u + 8, ... (simt_dim: consecutive lanes read consecutive smem words). The other
//   side is streamed through shared memory in chunks of kSimtChunk (32) rows as fp32; dot products are
//   reduced over the 8 lanes by an xor butterfly (1, 2, 4), so every lane holds the same score.
//   Forward: owners = queries, stream = keys/values. dQ: owners = queries, stream = keys/values,
//   P recomputed from lse. dK/dV: owners = 16 keys of one key tile (blockIdx.x) of one kv head, stream =
//   queries (+ dout, lse, delta) of every query head of its GQA group, walking the column CSR; the
//   group's sum is kept in registers (no atomics). delta = rowsum(dout * out) comes first.
// Softmax runs in the log2 domain: s2 = (q . k) * scale * log2(e); lse = (m + log2(l)) * ln(2).
#pragma once
#include <math.h>
#include <stdint.h>

#include "attention/sparse_attention_params.h"
#include "common/cuda_warp.h"
#include "common/hostdev.h"

namespace slimformer {
namespace attention {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kMaxGridYZ = 65535;

// ---- mma forward geometry ----
constexpr int kMmaRowsPerWarp = 16;
constexpr int kMmaMaxWarps = 4;
constexpr int kKeyChunk = 64;   // keys staged per step: 8 n-tiles of S per warp
constexpr int kKeyNTiles = kKeyChunk / 8;
constexpr int kKeyKSteps = kKeyChunk / 16;  // k16 steps of O += P V
// 8 halves (16 bytes) of padding per staged row: row stride (D + 8) * 2 bytes keeps every row 16-byte
// aligned (uint4 stores) and moves the 8 rows of one fragment load 4 banks apart (D % 64 in {0, 16, 32}).
constexpr int kSmemPad = 8;

// ---- SIMT geometry (fp32 forward, backward) ----
constexpr int kSimtRows = 16;
constexpr int kSimtLanes = 8;  // lanes per owner row
constexpr int kSimtThreads = kSimtRows * kSimtLanes;
constexpr int kSimtChunk = 32;  // streamed rows per shared-memory stage

SF_HD bool supported_head_dim(int64_t d) { return d == 32 || d == 64 || d == 80 || d == 96 || d == 128; }

// Warps of an mma CTA: the largest of 4, 3, 2, 1 that divides block_size / 16, so that a CTA never
// straddles two plan rows (two different CSR lists).
SF_HD int mma_warps(int block_size) {
  const int t = block_size / kMmaRowsPerWarp;
  return t % 4 == 0 ? 4 : t % 3 == 0 ? 3 : t % 2 == 0 ? 2 : 1;
}

// Query positions of CTA x (blockIdx.x) when each CTA covers `rows` positions of a plan tile:
// plan row = x / (block_size / rows); the CTA's row k sits at position first + k and is valid when
// lo <= first + k < hi (the tile clipped to the queries [q_offset, q_offset + q_len)). lo >= hi: the
// CTA has nothing to do (the part of the first tile before q_offset, or the last tile's tail).
struct CtaRows {
  int64_t plan_row, first, lo, hi;
};
SF_HD CtaRows cta_rows(int64_t x, int rows, const SparseAttentionParams& p) {
  const int64_t per_tile = p.block_size / rows;
  CtaRows c;
  c.plan_row = x / per_tile;
  c.first = (p.first_q_block + c.plan_row) * p.block_size + (x % per_tile) * rows;
  const int64_t end = c.first + rows, q_end = p.q_offset + p.q_len;
  c.lo = c.first > p.q_offset ? c.first : p.q_offset;
  c.hi = end < q_end ? end : q_end;
  return c;
}
SF_HD int64_t cta_count(int rows, const SparseAttentionParams& p) { return p.num_q_blocks * (p.block_size / rows); }

// Keys [lo, hi) of key tile c; 16-key sub-tile s of it for the dK/dV CTAs (x = c * (bs / 16) + s).
struct KeyRange {
  int64_t lo, hi;
};
SF_HD KeyRange tile_keys(int64_t c, const SparseAttentionParams& p) {
  const int64_t lo = c * p.block_size, end = lo + p.block_size;
  return {lo, end < p.kv_len ? end : p.kv_len};
}
SF_HD CtaRows key_cta_rows(int64_t x, const SparseAttentionParams& p) {
  const int64_t per_tile = p.block_size / kSimtRows;
  CtaRows c;
  c.plan_row = x / per_tile;  // the key tile
  c.first = c.plan_row * p.block_size + (x % per_tile) * kSimtRows;
  c.lo = c.first;
  c.hi = c.first + kSimtRows < p.kv_len ? c.first + kSimtRows : p.kv_len;
  return c;
}
SF_HD int64_t key_cta_count(const SparseAttentionParams& p) { return p.num_k_blocks * (p.block_size / kSimtRows); }
// Query positions of plan row r (relative to first_q_block), clipped to the queries.
SF_HD KeyRange row_queries(int64_t r, const SparseAttentionParams& p) {
  const int64_t t = r + p.first_q_block, lo = t * p.block_size, hi = lo + p.block_size, q_end = p.q_offset + p.q_len;
  return {lo > p.q_offset ? lo : p.q_offset, hi < q_end ? hi : q_end};
}

SF_HD int layout_head(int64_t h, const SparseAttentionParams& p) { return p.layout_heads == 1 ? 0 : static_cast<int>(h); }
// CSR entry ranges [begin, end): row CSR for (layout head, plan row), column CSR for (layout head, key tile).
SF_HD KeyRange row_entries(int lh, int64_t plan_row, const SparseAttentionParams& p) {
  const int32_t* rp = p.row_ptr + lh * (p.num_q_blocks + 1) + plan_row;
  return {rp[0], rp[1]};
}
SF_HD KeyRange col_entries(int lh, int64_t key_tile, const SparseAttentionParams& p) {
  const int32_t* cp = p.col_ptr + lh * (p.num_k_blocks + 1) + key_tile;
  return {cp[0], cp[1]};
}

// A CSR range clipped to [0, nnz): a corrupt row_ptr / col_ptr can then not make a kernel read outside
// col_idx / row_idx (the adapter cannot check their contents without a host sync).
SF_HD KeyRange clamp_entries(KeyRange r, int64_t nnz) {
  const int64_t lo = r.lo < 0 ? 0 : r.lo, hi = r.hi > nnz ? nnz : r.hi;
  return {lo, hi};
}

// ---- the element rule (sparse_attention_params.h) ----
// key_mask_row: key_mask + b * key_mask_stride_b, or null.
SF_HD bool element_allowed(const SparseAttentionParams& p, const uint8_t* key_mask_row, bool full, int64_t pos,
                           int64_t key) {
  if (p.causal && key > pos) return false;
  if (key_mask_row != nullptr && !key_mask_row[key]) return false;
  if (full) return true;
  const int64_t d = key - pos;
  if (p.window_left >= 0 && d >= -p.window_left && d <= p.window_right) return true;
  return p.global_mask != nullptr && (p.global_mask[pos] || p.global_mask[key]);
}

// Whether a chunk (queries with positions >= q_lo, keys <= k_last) must evaluate the element rule:
// a partial tile, key padding, or a causal chunk that reaches past the diagonal. Full chunks skip it.
SF_HD bool chunk_needs_mask(const SparseAttentionParams& p, const uint8_t* key_mask_row, bool full, int64_t q_lo,
                            int64_t k_last) {
  return !full || key_mask_row != nullptr || (p.causal && k_last > q_lo);
}
// A causal chunk whose first key lies after the last query: nothing in it is allowed.
SF_HD bool chunk_all_future(const SparseAttentionParams& p, int64_t q_last, int64_t k_first) {
  return p.causal && k_first > q_last;
}

// ---- online softmax (log2 domain) ----
// m: running max of the allowed scaled scores (-inf before any); l: sum of 2^(s - m) (in the mma path
// each lane of a quad keeps its own partial l, summed at the end: the rescales are common to the quad).
struct RowState {
  float m, l;
};
SF_HD RowState row_init() { return {-INFINITY, 0.0f}; }
// Takes in a chunk's max (-inf if the chunk has no allowed key for the row); returns the factor for
// the old accumulators (0 while nothing was allowed: they are 0 and must stay finite).
SF_HD float row_rescale(RowState& st, float chunk_max) {
  const float m_new = fmaxf(st.m, chunk_max);
  const float alpha = st.m == -INFINITY ? 0.0f : exp2f(st.m - m_new);
  st.m = m_new;
  st.l *= alpha;
  return alpha;
}
// 2^(s - m) for a score of the current chunk (after row_rescale); masked (-inf) -> 0, never NaN.
SF_HD float row_prob(const RowState& st, float s) { return s == -INFINITY ? 0.0f : exp2f(s - st.m); }
SF_HD float row_inv_sum(float l) { return l > 0.0f ? 1.0f / l : 0.0f; }
// Natural-log lse from the log2-domain state; -inf for a row without allowed keys.
SF_HD float row_lse(float m, float l) { return l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY; }
// Backward: P = exp(s - lse) = 2^(s2 - lse * log2 e) for an allowed element; a row with lse = -inf
// has no allowed element, but guard anyway so no NaN can leak.
SF_HD float bwd_prob(float s2, float lse) { return lse == -INFINITY ? 0.0f : exp2f(s2 - lse * kLog2e); }
SF_HD float bwd_dscore(float prob, float dp, float delta) { return prob * (dp - delta); }

// ---- mma.sync.m16n8k16 fragment maps (PTX ISA "Matrix Fragments for mma.m16n8k16", f16/bf16) ----
// lane = 4 * group + tig. A (16 x 16, row): element e = 0..7 lives in register e / 2, half e % 2.
SF_HD int frag_a_row(int lane, int e) { return (lane >> 2) + ((e >> 1) & 1) * 8; }
SF_HD int frag_a_col(int lane, int e) { return (lane & 3) * 2 + (e & 1) + (e >> 2) * 8; }
// B (16 x 8, k x n, "col"): element e = 0..3, register e / 2.
SF_HD int frag_b_k(int lane, int e) { return (lane & 3) * 2 + (e & 1) + (e >> 1) * 8; }
SF_HD int frag_b_n(int lane, int /*e*/) { return lane >> 2; }
// C / D (16 x 8, fp32): element e = 0..3.
SF_HD int frag_c_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
SF_HD int frag_c_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }
// P as the A operand of k-step j: A element e is C element p_elem_of_a(e) of S n-tile 2j + p_tile_of_a(e)
// (same lane): the C layout of two n8 tiles is the A layout of one k16 block.
SF_HD int p_tile_of_a(int e) { return e >> 2; }
SF_HD int p_elem_of_a(int e) { return e & 3; }
// Staged K / V chunk: row r (key), column d, in halves.
SF_HD int kv_smem_index(int r, int d, int head_dim) { return r * (head_dim + kSmemPad) + d; }

// ---- SIMT maps ----
SF_HD int simt_row(int t) { return t / kSimtLanes; }
SF_HD int simt_dim(int t, int i) { return i * kSimtLanes + t % kSimtLanes; }

}  // namespace cuda
}  // namespace attention
}  // namespace slimformer
