// ATen adapter of the sparse flash attention ops on CPU (sparse_attention_fwd / _bwd): input and
// plan validation (every failure a ValueError naming the problem), the plan's CSR contents checked
// in O(nnz) so a corrupt plan can never index out of bounds, per-row backward terms, threading over
// work items (sparse_attention_cpu.h) and the run-time choice of the kernel implementation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attention/sparse_attention_checks.h"
#include "attention/sparse_attention_cpu.h"
#include "common/cpu_features.h"

namespace slimformer::attention {
namespace {

// What the kernels run on, plus the tensors that own the pointers.
struct Problem : CheckedProblem {
  ElemType dtype;
};

// The CSR's contents, O(nnz): ascending in-range offsets and tile indices inside the grid, so a
// corrupt plan raises instead of making the kernels read out of bounds.
void check_csr_contents(const char* op, const char* ptr_name, const at::Tensor& ptr, const char* idx_name,
                        const at::Tensor& idx, int64_t bound) {
  const int64_t heads = ptr.size(0), rows = ptr.size(1) - 1, nnz = idx.size(0);
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

Problem check_problem_cpu(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
                          const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
                          const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask,
                          int64_t block_size, int64_t q_offset, int64_t first_q_block, int64_t window_left,
                          int64_t window_right, bool causal, double scale, bool check_col_csr) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": q is on ", q.device(), " but this is the CPU kernel");
  Problem pr;
  static_cast<CheckedProblem&>(pr) =
      check_problem(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask,
                    block_size, q_offset, first_q_block, window_left, window_right, causal, scale);
  // Per-thread scratch is sized by these (sparse_attention_cpu.h).
  TORCH_CHECK_VALUE(q.size(3) <= 256, op, ": head_dim must be in 1..256 on the CPU, got ", q.size(3));
  // S and P scratch are block_size^2 floats per thread: 4 MiB each at 1024.
  TORCH_CHECK_VALUE(block_size <= 1024, op, ": block_size must be at most 1024 on the CPU, got ", block_size);
  const SparseAttentionParams& p = pr.p;
  check_csr_contents(op, "row_ptr", pr.row_ptr, "col_idx", pr.col_idx, p.num_k_blocks);
  if (check_col_csr) check_csr_contents(op, "col_ptr", pr.col_ptr, "row_idx", pr.row_idx, p.num_q_blocks);
  const auto dt = q.scalar_type();
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
  Problem pr = check_problem_cpu(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                                 key_mask, block_size, q_offset, first_q_block, window_left, window_right, causal,
                                 scale, /*check_col_csr=*/false);
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
  Problem pr = check_problem_cpu(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                                 key_mask, block_size, q_offset, first_q_block, window_left, window_right, causal,
                                 scale, /*check_col_csr=*/true);
  check_backward_inputs(op, q, dout, out, lse);
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
