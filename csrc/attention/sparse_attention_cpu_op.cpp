// ATen adapter of the sparse flash attention ops on CPU (sparse_attention_fwd / _bwd): input and
// plan validation (every failure a ValueError naming the problem), the plan's CSR contents checked
// in O(nnz) so a corrupt plan can never index out of bounds, per-row backward terms, threading over
// work items (sparse_attention_cpu.h) and the run-time choice of the kernel implementation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attention/sparse_attention_cpu.h"
#include "common/cpu_features.h"

namespace slimformer::attention {
namespace {

// What the kernels run on, plus the tensors that own the pointers.
struct Problem {
  SparseAttentionParams p;
  ElemType dtype;
  at::Tensor row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask;
};

void check_csr(const char* op, const char* ptr_name, const at::Tensor& ptr, const char* idx_name,
               const at::Tensor& idx, const char* flag_name, const at::Tensor& flag, int64_t heads, int64_t rows,
               int64_t bound) {
  TORCH_CHECK_VALUE(ptr.scalar_type() == at::kInt && ptr.dim() == 2 && ptr.size(0) == heads && ptr.size(1) == rows + 1,
                    op, ": ", ptr_name, " must be int32 [layout_heads, ", rows + 1, "] = [", heads, ", ", rows + 1,
                    "], got ", ptr.scalar_type(), " ", ptr.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kInt && idx.dim() == 1, op, ": ", idx_name,
                    " must be a 1-D int32 tensor, got ", idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK_VALUE(flag.scalar_type() == at::kByte && flag.dim() == 1 && flag.size(0) == idx.size(0), op, ": ",
                    flag_name, " must be uint8 [", idx.size(0), "] (one flag per ", idx_name, " entry), got ",
                    flag.scalar_type(), " ", flag.sizes());
  const int64_t nnz = idx.size(0);
  TORCH_CHECK_VALUE(nnz < (int64_t{1} << 31), op, ": ", idx_name, " has more than 2^31 entries");
  const int32_t* pp = ptr.data_ptr<int32_t>();
  for (int64_t h = 0; h < heads; ++h) {
    const int32_t* row = pp + h * (rows + 1);
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK_VALUE(row[r] >= 0 && row[r] <= row[r + 1] && row[r + 1] <= nnz, op, ": ", ptr_name, "[", h, ", ",
                        r, ":", r + 2, "] = (", row[r], ", ", row[r + 1], ") is not an ascending range inside the ",
                        nnz, " entries of ", idx_name);
  }
  const int32_t* ip = idx.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnz; ++e)
    TORCH_CHECK_VALUE(ip[e] >= 0 && ip[e] < bound, op, ": ", idx_name, "[", e, "] = ", ip[e], " is outside [0, ",
                      bound, ")");
}

Problem check_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
                      const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
                      const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask,
                      int64_t block_size, int64_t q_offset, int64_t first_q_block, int64_t window_left,
                      int64_t window_right, bool causal, double scale, bool check_col_csr) {
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                    ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k and v must share one dtype, got ", dt,
                    ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be 4-D [B, H, S, D], got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": q ", q.sizes(), " and k ", k.sizes(),
                    " differ in batch or head_dim");
  TORCH_CHECK_VALUE(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0, op, ": query heads (", Hq,
                    ") must be a positive multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(D >= 1 && D <= 256, op, ": head_dim must be in 1..256, got ", D);
  TORCH_CHECK_VALUE(Sq >= 1 && Sk >= 1, op, ": q and k need at least one position each, got Sq=", Sq, ", Sk=", Sk);
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->stride(3) == 1 || t->size(3) == 1, op,
                      ": the last dimension of q, k and v must be contiguous (stride 1), got strides ", t->strides());
  for (const at::Tensor* t : {&q, &k, &v, &row_ptr, &col_idx, &col_full, &col_ptr, &row_idx, &row_full})
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ", t->device());
  TORCH_CHECK_VALUE(block_size >= 16 && block_size % 16 == 0 && block_size <= 4096, op,
                    ": block_size must be a positive multiple of 16 (at most 4096), got ", block_size);
  TORCH_CHECK_VALUE(q_offset >= 0 && q_offset + Sq <= Sk, op, ": queries at positions [", q_offset, ", ",
                    q_offset + Sq, ") must lie inside the ", Sk, " key positions");
  TORCH_CHECK_VALUE(first_q_block == q_offset / block_size, op, ": first_q_block must be q_offset / block_size = ",
                    q_offset / block_size, ", got ", first_q_block);
  TORCH_CHECK_VALUE((window_left == -1 && window_right == -1) || (window_left >= 0 && window_right >= 0), op,
                    ": window_left and window_right must both be -1 (no window) or both >= 0, got ", window_left,
                    " and ", window_right);
  TORCH_CHECK_VALUE(window_left < (int64_t{1} << 31) && window_right < (int64_t{1} << 31), op,
                    ": window sizes must fit in int32");
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  const int64_t nqb = (q_offset + Sq - 1) / block_size - first_q_block + 1;
  const int64_t nkb = (Sk + block_size - 1) / block_size;
  TORCH_CHECK_VALUE(row_ptr.dim() == 2 && (row_ptr.size(0) == 1 || row_ptr.size(0) == Hq), op,
                    ": row_ptr must be [layout_heads, num_q_blocks + 1] with layout_heads 1 or the query head count ",
                    Hq, ", got ", row_ptr.sizes());
  const int64_t lh = row_ptr.size(0);
  Problem pr;
  pr.row_ptr = row_ptr.contiguous();
  pr.col_idx = col_idx.contiguous();
  pr.col_full = col_full.contiguous();
  pr.col_ptr = col_ptr.contiguous();
  pr.row_idx = row_idx.contiguous();
  pr.row_full = row_full.contiguous();
  check_csr(op, "row_ptr", pr.row_ptr, "col_idx", pr.col_idx, "col_full", pr.col_full, lh, nqb, nkb);
  if (check_col_csr) {
    check_csr(op, "col_ptr", pr.col_ptr, "row_idx", pr.row_idx, "row_full", pr.row_full, lh, nkb, nqb);
  } else {
    TORCH_CHECK_VALUE(col_ptr.dim() == 2 && col_ptr.size(0) == lh && col_ptr.size(1) == nkb + 1, op,
                      ": col_ptr must be [layout_heads, num_k_blocks + 1] = [", lh, ", ", nkb + 1, "], got ",
                      col_ptr.sizes());
  }
  if (global_mask.has_value()) {
    const auto& g = *global_mask;
    TORCH_CHECK_VALUE((g.scalar_type() == at::kByte || g.scalar_type() == at::kBool) && g.dim() == 1 &&
                          g.size(0) == Sk && g.device().is_cpu(),
                      op, ": global_mask must be a CPU uint8 tensor [kv_len] = [", Sk, "], got ", g.scalar_type(),
                      " ", g.sizes(), " on ", g.device());
    pr.global_mask = g.contiguous();
  }
  if (key_mask.has_value()) {
    const auto& m = *key_mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == Sk &&
                          m.device().is_cpu(),
                      op, ": key_mask must be a CPU bool tensor [B, Sk] = [", B, ", ", Sk, "], got ",
                      m.scalar_type(), " ", m.sizes(), " on ", m.device());
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
  pr.dtype = dt == at::kFloat ? ElemType::kFloat32 : dt == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;
  return pr;
}

// fp16 / bf16 inputs: the kernels convert key and value rows to fp32 at every visit of a key tile.
// When the plan visits the average key tile at least twice (anything but decoding a few tokens),
// converting q, k, v once here is cheaper (linear memory); the kernels then run on fp32.
struct Staged {
  at::Tensor q, k, v;
};

Staged stage_inputs(Problem& pr, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (pr.dtype == ElemType::kFloat32) return {q, k, v};
  const SparseAttentionParams& p = pr.p;
  const int64_t visits = pr.col_idx.size(0) * p.batch * (p.layout_heads == 1 ? p.q_heads : 1);
  if (visits < 2 * p.batch * p.kv_heads * p.num_k_blocks) return {q, k, v};
  Staged st{q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat)};
  SparseAttentionParams& w = pr.p;
  w.q_stride_b = st.q.stride(0), w.q_stride_h = st.q.stride(1), w.q_stride_s = st.q.stride(2);
  w.k_stride_b = st.k.stride(0), w.k_stride_h = st.k.stride(1), w.k_stride_s = st.k.stride(2);
  w.v_stride_b = st.v.stride(0), w.v_stride_h = st.v.stride(1), w.v_stride_s = st.v.stride(2);
  pr.dtype = ElemType::kFloat32;
  return st;
}

using KernelFn = void (*)(const SparseAttentionParams&, const SparseAttentionCpuData&, int64_t, int64_t);

struct Kernels {
  KernelFn fwd, dq, dkdv;
};

Kernels pick_kernels() {
  const CpuIsa isa = active_cpu_isa();
  if (isa >= CpuIsa::kAvx512Vnni)
    return {sparse_attention_fwd_avx512, sparse_attention_dq_avx512, sparse_attention_dkdv_avx512};
  if (isa >= CpuIsa::kAvx2) return {sparse_attention_fwd_avx2, sparse_attention_dq_avx2, sparse_attention_dkdv_avx2};
  return {sparse_attention_fwd_scalar, sparse_attention_dq_scalar, sparse_attention_dkdv_scalar};
}

// Work items are heavy (a query or key tile against its whole CSR row): one item per grain.
void run_items(KernelFn fn, const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t items) {
  if (items <= 0) return;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) { fn(p, d, i0, i1); });
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr, const at::Tensor& col_idx,
    const at::Tensor& col_full, const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask, int64_t block_size,
    int64_t q_offset, int64_t first_q_block, int64_t window_left, int64_t window_right, bool causal, double scale) {
  constexpr const char* op = "slimformer.sparse_attention_fwd";
  Problem pr = check_problem(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask,
                             block_size, q_offset, first_q_block, window_left, window_right, causal, scale,
                             /*check_col_csr=*/false);
  const Staged st = stage_inputs(pr, q, k, v);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty(q.sizes(), f32);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, f32);
  SparseAttentionCpuData d;
  d.dtype = pr.dtype;
  d.q = st.q.data_ptr(), d.k = st.k.data_ptr(), d.v = st.v.data_ptr();
  d.out = out.data_ptr<float>(), d.lse = lse.data_ptr<float>();
  run_items(pick_kernels().fwd, pr.p, d, fwd_items(pr.p));
  return {q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
    const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask, int64_t block_size,
    int64_t q_offset, int64_t first_q_block, int64_t window_left, int64_t window_right, bool causal, double scale) {
  constexpr const char* op = "slimformer.sparse_attention_bwd";
  Problem pr = check_problem(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask,
                             block_size, q_offset, first_q_block, window_left, window_right, causal, scale,
                             /*check_col_csr=*/true);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": dout ", dout.sizes(), " and out ",
                    out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(dout.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(), op,
                    ": dout, out and lse must be on the CPU");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                        lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                    op, ": lse must be float32 [B, Hq, Sq], got ", lse.scalar_type(), " ", lse.sizes());
  const auto f32 = q.options().dtype(at::kFloat);
  // Per query row: delta = rowsum(dout * out) and lse in log2 units (+inf for rows without any
  // allowed key, whose probabilities must all be 0). Both are O(B * Hq * Sq * D).
  const Staged st = stage_inputs(pr, q, k, v);
  const at::Tensor dout_c = dout.to(st.q.scalar_type()).contiguous();
  const at::Tensor delta = (dout_c.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor lse2 =
      at::where(at::isneginf(lse), at::full({}, INFINITY, f32), lse * static_cast<float>(M_LOG2E)).contiguous();
  const int64_t cache = pr.p.batch * pr.p.q_heads * pr.p.num_q_blocks * pr.p.head_dim * pr.p.block_size;
  at::Tensor qt_cache = at::empty({cache}, f32), dot_cache = at::empty({cache}, f32);
  at::Tensor dq = at::empty(q.sizes(), f32), dk = at::empty(k.sizes(), f32), dv = at::empty(v.sizes(), f32);
  SparseAttentionCpuData d;
  d.dtype = pr.dtype;
  d.q = st.q.data_ptr(), d.k = st.k.data_ptr(), d.v = st.v.data_ptr();
  d.dout = dout_c.data_ptr();
  d.lse2 = lse2.data_ptr<float>(), d.delta = delta.data_ptr<float>();
  d.qt_cache = qt_cache.data_ptr<float>(), d.dot_cache = dot_cache.data_ptr<float>();
  d.dq = dq.data_ptr<float>(), d.dk = dk.data_ptr<float>(), d.dv = dv.data_ptr<float>();
  const Kernels kn = pick_kernels();
  // Fused (S, P, dP once per visited tile) when one item per (b, kv head) keeps every thread busy;
  // otherwise the two passes, which expose B * Hq * query tiles and B * Hkv * key tiles items.
  d.fuse_dq = d.dq_pack_only = pr.p.batch * pr.p.kv_heads >= 2 * at::get_num_threads();
  if (d.fuse_dq) dq.zero_();
  run_items(kn.dq, pr.p, d, fwd_items(pr.p));  // fills the Q^T / dO^T caches (and dq unless fused)
  run_items(kn.dkdv, pr.p, d, dkdv_items(pr.p, d.fuse_dq));
  if (q.scalar_type() == at::kFloat) return {dq, dk, dv};
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace
}  // namespace slimformer::attention

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("sparse_attention_fwd", &slimformer::attention::sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &slimformer::attention::sparse_attention_bwd_cpu);
}
