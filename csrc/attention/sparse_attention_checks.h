// Input validation shared by the CPU and CUDA adapters of the sparse attention ops. Every failure is
// a c10::Error surfacing as a Python ValueError that names the op and the offending tensor, shape,
// dtype or device. What only one backend needs (the CPU's O(nnz) CSR content check, CUDA's supported
// head dims and grid limits) stays in that backend's adapter.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "attention/sparse_attention_params.h"

namespace slimformer {
namespace attention {

// The params plus the (contiguous) tensors that own its pointers.
struct CheckedProblem {
  SparseAttentionParams p;
  at::Tensor row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask;
};

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, " is on ", t.device(), " but q is on ", dev);
}

inline void check_csr_shape(const char* op, const char* ptr_name, const at::Tensor& ptr, int64_t heads, int64_t rows,
                            const char* idx_name, const at::Tensor& idx, const char* flag_name, const at::Tensor& flag,
                            const at::Device& dev) {
  TORCH_CHECK_VALUE(ptr.scalar_type() == at::kInt && ptr.dim() == 2 && ptr.size(0) == heads && ptr.size(1) == rows + 1,
                    op, ": ", ptr_name, " must be int32 [layout_heads, ", rows + 1, "] = [", heads, ", ", rows + 1,
                    "], got ", ptr.scalar_type(), " ", ptr.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kInt && idx.dim() == 1, op, ": ", idx_name,
                    " must be a 1-D int32 tensor, got ", idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK_VALUE(idx.size(0) < (int64_t{1} << 31), op, ": ", idx_name, " has more than 2^31 entries");
  TORCH_CHECK_VALUE(flag.scalar_type() == at::kByte && flag.dim() == 1 && flag.size(0) == idx.size(0), op, ": ",
                    flag_name, " must be uint8 [", idx.size(0), "] (one flag per ", idx_name, " entry), got ",
                    flag.scalar_type(), " ", flag.sizes());
  for (const auto& [name, t] : {std::pair{ptr_name, &ptr}, std::pair{idx_name, &idx}, std::pair{flag_name, &flag}})
    check_same_device(op, name, *t, dev);
}

// q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D] and a plan (both CSR directions) that fit together.
inline CheckedProblem check_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
                                    const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
                                    const c10::optional<at::Tensor>& global_mask,
                                    const c10::optional<at::Tensor>& key_mask, int64_t block_size, int64_t q_offset,
                                    int64_t first_q_block, int64_t window_left, int64_t window_right, bool causal,
                                    double scale) {
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                    ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k and v must share one dtype, got ", dt,
                    ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be 4-D [B, H, S, D], got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ", v.sizes());
  const at::Device dev = q.device();
  check_same_device(op, "k", k, dev);
  check_same_device(op, "v", v, dev);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": q ", q.sizes(), " and k ", k.sizes(),
                    " differ in batch or head_dim");
  TORCH_CHECK_VALUE(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0, op, ": query heads (", Hq,
                    ") must be a positive multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(D >= 1, op, ": head_dim must be positive, got ", D);
  TORCH_CHECK_VALUE(Sq >= 1 && Sk >= 1, op, ": q and k need at least one position each, got Sq=", Sq, ", Sk=", Sk);
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->stride(3) == 1 || t->size(3) == 1, op,
                      ": the last dimension of q, k and v must be contiguous (stride 1), got strides ", t->strides());
  TORCH_CHECK_VALUE(block_size >= 16 && block_size % 16 == 0, op,
                    ": block_size must be a positive multiple of 16, got ", block_size);
  TORCH_CHECK_VALUE(q_offset >= 0 && q_offset + Sq <= Sk, op, ": queries at positions [", q_offset, ", ",
                    q_offset + Sq, ") must lie inside the ", Sk, " key positions");
  TORCH_CHECK_VALUE(first_q_block == q_offset / block_size, op, ": first_q_block must be q_offset / block_size = ",
                    q_offset / block_size, ", got ", first_q_block);
  TORCH_CHECK_VALUE((window_left == -1 && window_right == -1) ||
                        (window_left >= 0 && window_right >= 0 && window_left < (int64_t{1} << 31) &&
                         window_right < (int64_t{1} << 31)),
                    op, ": window_left and window_right must both be -1 (no window) or both in [0, 2^31), got ",
                    window_left, " and ", window_right);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  const int64_t nqb = (q_offset + Sq - 1) / block_size - first_q_block + 1;
  const int64_t nkb = (Sk + block_size - 1) / block_size;
  TORCH_CHECK_VALUE(row_ptr.dim() == 2 && (row_ptr.size(0) == 1 || row_ptr.size(0) == Hq), op,
                    ": row_ptr must be [layout_heads, num_q_blocks + 1] with layout_heads 1 or the query head count ",
                    Hq, ", got ", row_ptr.sizes());
  const int64_t lh = row_ptr.size(0);
  check_csr_shape(op, "row_ptr", row_ptr, lh, nqb, "col_idx", col_idx, "col_full", col_full, dev);
  check_csr_shape(op, "col_ptr", col_ptr, lh, nkb, "row_idx", row_idx, "row_full", row_full, dev);
  TORCH_CHECK_VALUE(row_idx.size(0) == col_idx.size(0), op, ": the column CSR has ", row_idx.size(0),
                    " entries and the row CSR ", col_idx.size(0), "; both list the same tiles");

  CheckedProblem pr;
  pr.row_ptr = row_ptr.contiguous();
  pr.col_idx = col_idx.contiguous();
  pr.col_full = col_full.contiguous();
  pr.col_ptr = col_ptr.contiguous();
  pr.row_idx = row_idx.contiguous();
  pr.row_full = row_full.contiguous();
  if (global_mask.has_value()) {
    const auto& g = *global_mask;
    TORCH_CHECK_VALUE((g.scalar_type() == at::kByte || g.scalar_type() == at::kBool) && g.dim() == 1 && g.size(0) == Sk,
                      op, ": global_mask must be uint8 or bool [kv_len] = [", Sk, "], got ", g.scalar_type(), " ",
                      g.sizes());
    check_same_device(op, "global_mask", g, dev);
    pr.global_mask = g.contiguous();
  }
  if (key_mask.has_value()) {
    const auto& m = *key_mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == Sk, op,
                      ": key_mask must be bool [B, Sk] = [", B, ", ", Sk, "], got ", m.scalar_type(), " ", m.sizes());
    check_same_device(op, "key_mask", m, dev);
    pr.key_mask = m.contiguous();
  }

  SparseAttentionParams& p = pr.p;
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hkv, p.q_len = Sq, p.kv_len = Sk, p.head_dim = D;
  p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_s = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_h = k.stride(1), p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_h = v.stride(1), p.v_stride_s = v.stride(2);
  p.block_size = static_cast<int>(block_size);
  p.q_offset = q_offset, p.first_q_block = first_q_block, p.num_q_blocks = nqb, p.num_k_blocks = nkb;
  p.layout_heads = static_cast<int>(lh);
  p.row_ptr = pr.row_ptr.data_ptr<int32_t>();
  p.col_idx = pr.col_idx.data_ptr<int32_t>();
  p.col_full = pr.col_full.data_ptr<uint8_t>();
  p.col_ptr = pr.col_ptr.data_ptr<int32_t>();
  p.row_idx = pr.row_idx.data_ptr<int32_t>();
  p.row_full = pr.row_full.data_ptr<uint8_t>();
  p.window_left = static_cast<int>(window_left), p.window_right = static_cast<int>(window_right);
  p.causal = causal;
  p.global_mask = pr.global_mask.defined() ? static_cast<const uint8_t*>(pr.global_mask.data_ptr()) : nullptr;
  p.key_mask = pr.key_mask.defined() ? static_cast<const uint8_t*>(pr.key_mask.data_ptr()) : nullptr;
  p.key_mask_stride_b = Sk;
  p.scale = static_cast<float>(scale);
  return pr;
}

// The backward's extra inputs: dout and out with q's shape and dtype, lse float32 [B, Hq, Sq].
inline void check_backward_inputs(const char* op, const at::Tensor& q, const at::Tensor& dout, const at::Tensor& out,
                                  const at::Tensor& lse) {
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": dout ", dout.sizes(), " and out ",
                    out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                    ": dout and out must have q's dtype ", q.scalar_type(), ", got ", dout.scalar_type(), " and ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                        lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                    op, ": lse must be float32 [B, Hq, Sq], got ", lse.scalar_type(), " ", lse.sizes());
  check_same_device(op, "dout", dout, q.device());
  check_same_device(op, "out", out, q.device());
  check_same_device(op, "lse", lse, q.device());
}

}  // namespace attention
}  // namespace slimformer
