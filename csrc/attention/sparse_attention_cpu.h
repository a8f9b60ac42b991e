// Torch-free CPU kernels of the sparse flash attention ops (meaning: sparse_attention_params.h).
// The ATen adapter (sparse_attention_cpu_op.cpp) validates the inputs and the plan, computes the
// per-row backward terms, splits work items across threads and picks the implementation (scalar,
// AVX2 or AVX-512) at run time; the kernels run one contiguous range of work items each.
//
// One orientation everywhere (sparse_attention_cpu_impl.h): a score tile is S^T [keys][queries],
// key rows times query columns. Keys are broadcast from their rows as stored (no transposition of
// K or V), queries are packed once per visit as Q^T [D][queries] with scale * log2(e) folded in, so
// the softmax statistics (max, sum, exp2) are vertical vector operations over query columns.
#pragma once
#include <stdint.h>

#include "attention/sparse_attention_params.h"

namespace slimformer::attention {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Data the params struct does not carry: element type of q, k, v (and dout), and the buffers.
struct SparseAttentionCpuData {
  ElemType dtype = ElemType::kFloat32;
  const void* q = nullptr;  // strides in SparseAttentionParams
  const void* k = nullptr;
  const void* v = nullptr;
  // Forward outputs: out float32 contiguous [B, Hq, Sq, D]; lse float32 [B, Hq, Sq] (natural log).
  float* out = nullptr;
  float* lse = nullptr;
  // Backward inputs: dout in dtype, contiguous [B, Hq, Sq, D]; per query row lse2 = lse * log2(e)
  // (+inf where lse = -inf, so that every probability of such a row is exactly 0) and
  // delta = rowsum(dout * out), both float32 [B, Hq, Sq].
  const void* dout = nullptr;
  const float* lse2 = nullptr;
  const float* delta = nullptr;
  // Backward scratch shared by its two passes, float [B * Hq * num_q_blocks][D][block_size]: per
  // (b, h, query tile) Q^T * scale * log2(e) and dO^T, written by the dQ pass and read by the
  // dK / dV pass (which visits each query tile once per key tile instead of repacking it).
  float* qt_cache = nullptr;
  float* dot_cache = nullptr;
  // Fused backward (chosen by the adapter when B * Hkv items keep every thread busy): the dQ pass
  // only fills the caches (dq_pack_only), and the dK / dV items, one per (b, kv head) covering all
  // its key tiles, also add dS K into dq (zeroed by the adapter): those rows belong to the item's
  // query heads alone, so there is still no atomic, and S / dP are computed once instead of twice.
  bool dq_pack_only = false;
  bool fuse_dq = false;
  // Backward outputs, float32 contiguous: dq [B, Hq, Sq, D], dk and dv [B, Hkv, Sk, D].
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
};

// Work items. Forward and dQ: B * Hkv * num_q_blocks * (Hq / Hkv), ordered (b, kv head, query
// tile, head in group) so that the query heads sharing a kv head read the same key tiles back to
// back. dK / dV: B * Hkv * num_k_blocks, ordered (b, kv head, key tile), or B * Hkv when fused
// (see SparseAttentionCpuData::fuse_dq); each item owns its rows of dk and dv (no atomics).
inline int64_t fwd_items(const SparseAttentionParams& p) { return p.batch * p.q_heads * p.num_q_blocks; }
inline int64_t dkdv_items(const SparseAttentionParams& p, bool fused) {
  return p.batch * p.kv_heads * (fused ? 1 : p.num_k_blocks);
}

void sparse_attention_fwd_scalar(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);
void sparse_attention_dq_scalar(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);
void sparse_attention_dkdv_scalar(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);

// AVX2 + FMA + F16C (callers check active_cpu_isa() >= kAvx2).
void sparse_attention_fwd_avx2(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);
void sparse_attention_dq_avx2(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);
void sparse_attention_dkdv_avx2(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);

// AVX-512 F/BW/VL (ISA level avx512vnni).
void sparse_attention_fwd_avx512(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);
void sparse_attention_dq_avx512(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);
void sparse_attention_dkdv_avx512(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1);

}  // namespace slimformer::attention
