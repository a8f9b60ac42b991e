// ATen adapter of the sparse flash attention ops on CUDA: validation (each failure a ValueError naming
// the offending tensor, shape, dtype or device), the params struct, output allocation from torch's
// caching allocator and launches on the current stream. No host syncs: the CSR arrays' contents are
// not inspected here (the kernels skip tile indices outside the plan's grid instead of trusting them).
// Paths: forward fp16/bf16 on tensor cores (mma.sync), fp32 SIMT; backward SIMT for every dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attention/sparse_attention_cuda.h"

namespace slimformer {
namespace attention {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "slimformer.sparse_attention: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kFloat32;
  }
}

void check_on(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, " is on ", t.device(), " but q is on ", dev);
}

void check_csr(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim,
               const at::Device& dev) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  check_on(op, name, t, dev);
}

struct Inputs {
  SparseAttentionParams p;
  at::Tensor row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask;  // kept alive
};

// The checks of python/slimformer/ops/attention.py check_inputs, plus what the kernels assume.
Inputs prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
               const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
               const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask,
               int64_t block_size, int64_t q_offset, int64_t first_q_block, int64_t window_left,
               int64_t window_right, bool causal, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D [B, H, S, D]; got ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q is on ", q.device(), " but this is the CUDA kernel");
  const at::Device dev = q.device();
  check_on(op, "k", k, dev);
  check_on(op, "v", v, dev);
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                    ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k and v must share one dtype, got q ", dt,
                    ", got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q ", q.sizes(), " and k ", k.sizes(),
                    " differ in batch or head_dim");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": query heads (", q.size(1),
                    ") must be a multiple of key/value heads (", k.size(1), ")");
  const int64_t D = q.size(3);
  TORCH_CHECK_VALUE(cuda::supported_head_dim(D), op, ": head_dim ", D,
                    " is not supported by the CUDA kernels (32, 64, 80, 96 or 128)");
  TORCH_CHECK_VALUE(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op,
                    ": q, k, v must be contiguous in the last dimension, got strides ", q.strides(), ", ",
                    k.strides(), ", ", v.strides());
  TORCH_CHECK_VALUE(block_size >= 16 && block_size % 16 == 0, op, ": block_size must be a positive multiple of 16, got ",
                    block_size);
  const int64_t Sq = q.size(2), Sk = k.size(2);
  TORCH_CHECK_VALUE(Sq >= 1 && Sk >= 1, op, ": q_len and kv_len must be >= 1, got ", Sq, " and ", Sk);
  TORCH_CHECK_VALUE(q_offset >= 0 && q_offset + Sq <= Sk, op, ": queries at positions [", q_offset, ", ",
                    q_offset + Sq, ") must lie inside the ", Sk, " key positions");
  TORCH_CHECK_VALUE(first_q_block == q_offset / block_size, op, ": first_q_block ", first_q_block,
                    " does not match q_offset ", q_offset, " / block_size ", block_size);
  check_csr(op, "row_ptr", row_ptr, at::kInt, 2, dev);
  check_csr(op, "col_idx", col_idx, at::kInt, 1, dev);
  check_csr(op, "col_full", col_full, at::kByte, 1, dev);
  check_csr(op, "col_ptr", col_ptr, at::kInt, 2, dev);
  check_csr(op, "row_idx", row_idx, at::kInt, 1, dev);
  check_csr(op, "row_full", row_full, at::kByte, 1, dev);
  const int64_t lh = row_ptr.size(0), nqb = (q_offset + Sq - 1) / block_size - first_q_block + 1,
                nkb = (Sk + block_size - 1) / block_size;
  TORCH_CHECK_VALUE(lh == 1 || lh == q.size(1), op, ": the plan has ", lh, " layout heads; q has ", q.size(1),
                    " heads");
  TORCH_CHECK_VALUE(row_ptr.size(1) == nqb + 1, op, ": row_ptr ", row_ptr.sizes(), " must be [layout_heads, ", nqb + 1,
                    "] for ", Sq, " queries at offset ", q_offset, " with block_size ", block_size);
  TORCH_CHECK_VALUE(col_ptr.size(0) == lh && col_ptr.size(1) == nkb + 1, op, ": col_ptr ", col_ptr.sizes(),
                    " must be [", lh, ", ", nkb + 1, "] for ", Sk, " keys with block_size ", block_size);
  TORCH_CHECK_VALUE(col_full.size(0) == col_idx.size(0) && row_idx.size(0) == col_idx.size(0) &&
                        row_full.size(0) == col_idx.size(0),
                    op, ": col_idx, col_full, row_idx, row_full must have one length (nnz), got ", col_idx.size(0),
                    ", ", col_full.size(0), ", ", row_idx.size(0), ", ", row_full.size(0));
  TORCH_CHECK_VALUE((window_left == -1 && window_right == -1) || (window_left >= 0 && window_right >= 0 &&
                                                                   window_left < (int64_t{1} << 31) &&
                                                                   window_right < (int64_t{1} << 31)),
                    op, ": window_left / window_right must both be -1 (no window) or both in [0, 2^31), got ",
                    window_left, " and ", window_right);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(col_idx.size(0) < (int64_t{1} << 31), op, ": col_idx has more than 2^31 entries");
  TORCH_CHECK_VALUE(q.size(1) <= cuda::kMaxGridYZ && q.size(0) <= cuda::kMaxGridYZ, op, ": batch (", q.size(0),
                    ") and query heads (", q.size(1), ") must be at most ", cuda::kMaxGridYZ, " on CUDA");

  Inputs in;
  in.row_ptr = row_ptr.contiguous();
  in.col_idx = col_idx.contiguous();
  in.col_full = col_full.contiguous();
  in.col_ptr = col_ptr.contiguous();
  in.row_idx = row_idx.contiguous();
  in.row_full = row_full.contiguous();
  if (global_mask.has_value()) {
    const at::Tensor& g = *global_mask;
    TORCH_CHECK_VALUE((g.scalar_type() == at::kByte || g.scalar_type() == at::kBool) && g.dim() == 1 &&
                          g.size(0) == Sk,
                      op, ": global_mask must be uint8 or bool [kv_len = ", Sk, "], got ", g.scalar_type(), " ",
                      g.sizes());
    check_on(op, "global_mask", g, dev);
    in.global_mask = g.contiguous();
  }
  if (key_mask.has_value()) {
    const at::Tensor& m = *key_mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == Sk, op,
                      ": key_mask must be bool [B, Sk] = [", q.size(0), ", ", Sk, "], got ", m.scalar_type(), " ",
                      m.sizes());
    check_on(op, "key_mask", m, dev);
    in.key_mask = m.contiguous();
  }

  SparseAttentionParams& p = in.p;
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.kv_heads = k.size(1);
  p.q_len = Sq;
  p.kv_len = Sk;
  p.head_dim = D;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_s = q.stride(2);
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_s = v.stride(2);
  p.block_size = static_cast<int>(block_size);
  p.q_offset = q_offset;
  p.first_q_block = first_q_block;
  p.num_q_blocks = nqb;
  p.num_k_blocks = nkb;
  p.layout_heads = static_cast<int>(lh);
  p.row_ptr = in.row_ptr.data_ptr<int32_t>();
  p.col_idx = in.col_idx.data_ptr<int32_t>();
  p.col_full = in.col_full.data_ptr<uint8_t>();
  p.col_ptr = in.col_ptr.data_ptr<int32_t>();
  p.row_idx = in.row_idx.data_ptr<int32_t>();
  p.row_full = in.row_full.data_ptr<uint8_t>();
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  p.causal = causal;
  p.global_mask = in.global_mask.defined() ? static_cast<const uint8_t*>(in.global_mask.data_ptr()) : nullptr;
  p.key_mask = in.key_mask.defined() ? static_cast<const uint8_t*>(in.key_mask.data_ptr()) : nullptr;
  p.key_mask_stride_b = in.key_mask.defined() ? in.key_mask.stride(0) : 0;
  p.scale = static_cast<float>(scale);
  return in;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& col_full, const at::Tensor& col_ptr, const at::Tensor& row_idx,
    const at::Tensor& row_full, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& key_mask, int64_t block_size, int64_t q_offset, int64_t first_q_block,
    int64_t window_left, int64_t window_right, bool causal, double scale) {
  constexpr const char* op = "slimformer.sparse_attention_fwd";
  const Inputs in = prepare(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                            key_mask, block_size, q_offset, first_q_block, window_left, window_right, causal, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.size(1) == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  cuda::FwdArgs a;
  a.p = in.p;
  a.dtype = dtype_of(q);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.nnz = col_idx.size(0);
  check_launch(cuda::launch_fwd(a, c10::cuda::getCurrentCUDAStream()), "forward launch");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
    const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask, int64_t block_size,
    int64_t q_offset, int64_t first_q_block, int64_t window_left, int64_t window_right, bool causal, double scale) {
  constexpr const char* op = "slimformer.sparse_attention_bwd";
  const Inputs in = prepare(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                            key_mask, block_size, q_offset, first_q_block, window_left, window_right, causal, scale);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": dout ", dout.sizes(), " and out ",
                    out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                    ": dout and out must have q's dtype ", q.scalar_type(), ", got ", dout.scalar_type(), " and ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                        lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                    op, ": lse must be float32 [B, Hq, Sq], got ", lse.scalar_type(), " ", lse.sizes());
  check_on(op, "dout", dout, q.device());
  check_on(op, "out", out, q.device());
  check_on(op, "lse", lse, q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  cuda::BwdArgs a;
  a.p = in.p;
  a.dtype = dtype_of(q);
  a.dout = dout_c.data_ptr();
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out_c.data_ptr();
  a.lse = lse_c.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.nnz = col_idx.size(0);
  check_launch(cuda::launch_bwd(a, c10::cuda::getCurrentCUDAStream()), "backward launch");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attention
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CUDA, m) {
  m.impl("sparse_attention_fwd", &slimformer::attention::sparse_attention_fwd_cuda);
  m.impl("sparse_attention_bwd", &slimformer::attention::sparse_attention_bwd_cuda);
}
