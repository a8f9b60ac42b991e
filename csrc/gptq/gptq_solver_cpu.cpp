// The GPTQ solver's inner loop on CPU: quantize one block of columns of W, column by column, each
// rounding error fed forward into the block's remaining columns through the inverse-Hessian row.
//
// Meaning (slimformer.gptq.solver._solve_block_reference, the pure-PyTorch definition): for
// i = 0..B-1, with s = scale[:, i], z = zero[:, i], d = hinv[i, i]
//   q[:, i]   = clamp(round(w[:, i] / s) + z, 0, 2^bits - 1)          (round half to even)
//   err[:, i] = (w[:, i] - s * (q[:, i] - z)) / d
//   w[:, j]  -= err[:, i] * hinv[i, j]       for j > i
//   loss     += (w[:, i] - s * (q[:, i] - z))^2 / d^2 / 2
// The rows of W are independent: each row runs the whole column loop on its own copy (B floats,
// in L1), so rows are spread over threads and the only shared data is the read-only hinv block.
// In Python this loop costs ~100 us per column in interpreter and dispatch overhead; here a
// 1536-row column takes about a microsecond.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace slimformer {
namespace gptq {
namespace {

constexpr int64_t kRowsPerTask = 16;

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_block_cpu(const at::Tensor& w, const at::Tensor& hinv,
                                                               const at::Tensor& scale, const at::Tensor& zero,
                                                               int64_t bits) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "slimformer.gptq_solve_block: unsupported bits=",
                    bits, " (supported: 2, 3, 4, 8)");
  for (const auto* t : {&w, &hinv, &scale, &zero}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, "slimformer.gptq_solve_block: all tensors must be float32, got ",
                      t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2, "slimformer.gptq_solve_block: all tensors must be 2-D, got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device().is_cpu(), "slimformer.gptq_solve_block: CPU tensors expected, got ", t->device());
  }
  const int64_t rows = w.size(0), B = w.size(1);
  TORCH_CHECK_VALUE(hinv.size(0) == B && hinv.size(1) == B, "slimformer.gptq_solve_block: hinv must be [", B, ", ", B,
                    "] for w of shape ", w.sizes(), ", got ", hinv.sizes());
  TORCH_CHECK_VALUE(scale.sizes() == w.sizes() && zero.sizes() == w.sizes(),
                    "slimformer.gptq_solve_block: scale and zero must have w's shape ", w.sizes(), ", got ",
                    scale.sizes(), " and ", zero.sizes());
  const at::Tensor wc = w.contiguous(), hc = hinv.contiguous(), sc = scale.contiguous(), zc = zero.contiguous();
  at::Tensor q = at::empty_like(wc), err = at::empty_like(wc), loss = at::zeros({rows}, wc.options());
  const float* wp = wc.data_ptr<float>();
  const float* hp = hc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const float* zp = zc.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* ep = err.data_ptr<float>();
  float* lp = loss.data_ptr<float>();
  const float maxq = static_cast<float>((1 << bits) - 1);

  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(B);
    for (int64_t r = r0; r < r1; ++r) {
      std::copy(wp + r * B, wp + (r + 1) * B, row.begin());
      double row_loss = 0;
      for (int64_t i = 0; i < B; ++i) {
        const float s = sp[r * B + i], z = zp[r * B + i], d = hp[i * B + i];
        const float x = row[i];
        // std::nearbyint rounds half to even in the default rounding mode, as torch.round does.
        const float qi = std::fmin(std::fmax(std::nearbyint(x / s) + z, 0.0f), maxq);
        const float diff = x - s * (qi - z);
        const float e = diff / d;
        qp[r * B + i] = qi;
        ep[r * B + i] = e;
        row_loss += static_cast<double>(diff) * diff / (static_cast<double>(d) * d) / 2;
        const float* h = hp + i * B;
        for (int64_t j = i + 1; j < B; ++j) row[j] -= e * h[j];
      }
      lp[r] = static_cast<float>(row_loss);
    }
  });
  return {q, err, loss};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimformer, CPU, m) { m.impl("gptq_solve_block", &solve_block_cpu); }

}  // namespace gptq
}  // namespace slimformer
