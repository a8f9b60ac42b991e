// Every slimformer op schema, one place. Backend files add TORCH_LIBRARY_IMPL(slimformer, CPU|CUDA);
// fake (meta) implementations live beside the Python wrappers (python/slimformer/ops/).
#include <torch/library.h>

TORCH_LIBRARY(slimformer, m) {
  // y = x @ W (+ bias), W in GPTQ checkpoint layout; perm (optional) gathers x's last dim first.
  m.def(
      "gptq_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, Tensor? perm, "
      "Tensor? bias, int bits, int zero_offset) -> Tensor");
  // Same, with x quantized on the fly to int8 per row and 32 inputs (rule in gptq/gptq_cpu_a8.h).
  m.def(
      "gptq_gemm_a8(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, Tensor? perm, "
      "Tensor? bias, int bits, int zero_offset) -> Tensor");
  // W [K, N] in scales' dtype, dequantized from GPTQ checkpoint layout.
  m.def(
      "gptq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, "
      "int zero_offset) -> Tensor");
  // The GPTQ solver's column loop over one block (slimformer.gptq.solver): w, scale, zero
  // [rows, B], hinv [B, B] upper-triangular -> (q, err, loss [rows]), all float32.
  m.def("gptq_solve_block(Tensor w, Tensor hinv, Tensor scale, Tensor zero, int bits) -> (Tensor, Tensor, Tensor)");
  // Binary (1-bit) weights, layout v1 in binary/binary_format.h: qweight int32 [ceil(N/16), ceil(K/32), 16],
  // alpha float32 [N]. W1A-fp: y = alpha * (x @ S^T) (+ bias), S in {-1,+1}^[N, K].
  m.def("binary_gemm(Tensor x, Tensor qweight, Tensor alpha, Tensor? bias, int in_features) -> Tensor");
  // W1A1: t = (x >= act_shift ? +1 : -1); y = alpha * (act_scale * (t @ S^T) + act_shift * S.sum(1)) (+ bias),
  // act_scale / act_shift float32 scalars (0-dim); popcount dot products.
  m.def(
      "binary_gemm_a1(Tensor x, Tensor qweight, Tensor alpha, Tensor? bias, Tensor act_scale, "
      "Tensor act_shift, int in_features) -> Tensor");
  // Sparse flash attention over a block-CSR plan (attention/sparse_attention_params.h): q [B, Hq, Sq, D],
  // k, v [B, Hkv, Sk, D] (fp32/fp16/bf16, last dim contiguous) -> out [B, Hq, Sq, D], lse float32 [B, Hq, Sq].
  // The forward reads the row CSR; it takes the column CSR too so that its autograd formula has it.
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor row_ptr, Tensor col_idx, Tensor col_full, "
      "Tensor col_ptr, Tensor row_idx, Tensor row_full, Tensor? global_mask, Tensor? key_mask, int block_size, int q_offset, int first_q_block, int window_left, "
      "int window_right, bool causal, float scale) -> (Tensor, Tensor)");
  // Its backward: (dq, dk, dv) from dout, the forward's inputs, out, lse and both CSR directions.
  m.def(
      "sparse_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor row_ptr, "
      "Tensor col_idx, Tensor col_full, Tensor col_ptr, Tensor row_idx, Tensor row_full, Tensor? global_mask, "
      "Tensor? key_mask, int block_size, int q_offset, int first_q_block, int window_left, int window_right, "
      "bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // Token merging (tome/tome_math.h, python/slimformer/tome/reference.py). Bipartite soft matching:
  // metric [B, N, C] (fp32/fp16/bf16), sizes float32 [B, N], roles int8 [B, N] -> slot int64 [B, N]
  // (output token of each input token; N - r outputs), dst int64 [B, N], score float32 [B, N].
  m.def("tome_match(Tensor metric, Tensor sizes, Tensor roles, int r) -> (Tensor, Tensor, Tensor)");
  // Size-weighted merge by slot: x [B, N, D] (fp32/fp16/bf16), sizes float32 [B, N], slot int64 [B, N]
  // -> out [B, n_out, D] (x's dtype), out_sizes float32 [B, n_out].
  m.def("tome_merge(Tensor x, Tensor sizes, Tensor slot, int n_out) -> (Tensor, Tensor)");
}
