// Sparse (block-CSR) flash attention: the torch-free problem description shared by the CPU and
// CUDA kernels. Meaning: python/slimformer/attention/{patterns,reference}.py.
//
// Query row i of (b, h) sits at absolute position p = q_offset + i; key j at position j.
//   allowed(h, p, j) = (!causal || j <= p) && key_mask[b][j]
//                      && (tile(p, j) is a *full* CSR entry
//                          || (tile is a *partial* entry
//                              && ((window_left >= 0 && -window_left <= j - p && j - p <= window_right)
//                                  || global[p] || global[j])))
// Tiles are block_size positions wide in absolute positions: query tile t = p / block_size is CSR row
// t - first_q_block; key tile c = j / block_size. Tiles not listed are never visited.
// out = softmax_allowed(q k^T * scale) v; lse = log-sum-exp of the allowed scaled scores (natural log).
// A query with no allowed key: out = 0, lse = -inf. GQA: query head h reads kv head h / (Hq / Hkv).
#pragma once
#include <cstdint>

namespace slimformer::attention {

struct SparseAttentionParams {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0;
  // Element strides (the last dimension is contiguous) of q [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D].
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  // out, dout [B, Hq, Sq, D] and dq, dk, dv are contiguous; lse [B, Hq, Sq] float32 contiguous.

  int block_size = 64;
  int64_t q_offset = 0;
  int64_t first_q_block = 0, num_q_blocks = 0, num_k_blocks = 0;
  int layout_heads = 1;  // 1 (shared by all heads) or q_heads

  // Row CSR: for layout head lh and query tile row r, entries row_ptr[lh*(num_q_blocks+1) + r] ..
  // row_ptr[lh*(num_q_blocks+1) + r + 1] of col_idx (key tile) / col_full (1 = full, 0 = partial).
  const int32_t* row_ptr = nullptr;
  const int32_t* col_idx = nullptr;
  const uint8_t* col_full = nullptr;
  // Column CSR (backward only): per layout head and key tile, the query tile rows (relative to
  // first_q_block) that visit it, ascending.
  const int32_t* col_ptr = nullptr;
  const int32_t* row_idx = nullptr;
  const uint8_t* row_full = nullptr;

  int window_left = -1, window_right = -1;  // -1: no window term
  bool causal = false;
  const uint8_t* global_mask = nullptr;  // [kv_len] or null
  const uint8_t* key_mask = nullptr;     // [B, kv_len] (row stride key_mask_stride_b) or null
  int64_t key_mask_stride_b = 0;
  float scale = 1.0f;
};

}  // namespace slimformer::attention
