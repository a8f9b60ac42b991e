// ATen adapter of the token merging ops on CPU (tome_match, tome_merge): input checks (every failure
// a ValueError naming the problem; the values of roles, sizes and slot are checked in O(B * N), so
// the kernels can never index out of bounds), threading over work items (tome_cpu.h) and the run-time
// choice of the kernel implementation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "common/cpu_features.h"
#include "tome/tome_cpu.h"

namespace slimformer::tome {
namespace {

constexpr const char* kMatch = "slimformer.tome_match";
constexpr const char* kMerge = "slimformer.tome_merge";

TomeDtype elem_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return TomeDtype::kFloat32;
    case at::kHalf: return TomeDtype::kFloat16;
    case at::kBFloat16: return TomeDtype::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return TomeDtype::kFloat32;
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), " but this is the CPU kernel");
}

void check_per_token(const char* op, const char* name, const at::Tensor& t, int64_t B, int64_t N,
                     at::ScalarType dtype) {
  check_cpu(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == N, op, ": ", name, " must be [B, N] = [", B, ", ",
                    N, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// Sizes finite and >= 0 (0 marks padding).
void check_sizes_values(const char* op, const at::Tensor& sizes) {
  const float* s = sizes.data_ptr<float>();
  const int64_t N = sizes.size(1), n = sizes.numel();
  for (int64_t e = 0; e < n; ++e)
    TORCH_CHECK_VALUE(std::isfinite(s[e]) && s[e] >= 0.0f, op, ": sizes must be finite and >= 0, got sizes[", e / N,
                      ", ", e % N, "] = ", s[e]);
}

int64_t threads() { return std::max<int64_t>(1, at::get_num_threads()); }

using MatchFn = void (*)(const TomeMatchParams&, int64_t, int64_t);
using MergeFn = void (*)(const TomeMergeParams&, int64_t, int64_t);

MatchFn pick_match() {
  const CpuIsa isa = active_cpu_isa();
  if (isa >= CpuIsa::kAvx512Vnni) return tome_match_sources_avx512;
  if (isa >= CpuIsa::kAvx2) return tome_match_sources_avx2;
  return tome_match_sources_scalar;
}

MergeFn pick_merge() {
  const CpuIsa isa = active_cpu_isa();
  if (isa >= CpuIsa::kAvx512Vnni) return tome_merge_avx512;
  if (isa >= CpuIsa::kAvx2) return tome_merge_avx2;
  return tome_merge_scalar;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tome_match_cpu(const at::Tensor& metric_in, const at::Tensor& sizes_in,
                                                              const at::Tensor& roles_in, int64_t r) {
  check_cpu(kMatch, "metric", metric_in);
  TORCH_CHECK_VALUE(metric_in.dim() == 3, kMatch, ": metric must be [B, N, C], got shape ", metric_in.sizes());
  const int64_t B = metric_in.size(0), N = metric_in.size(1), C = metric_in.size(2);
  const TomeDtype dtype = elem_dtype(kMatch, "metric", metric_in);
  check_per_token(kMatch, "sizes", sizes_in, B, N, at::kFloat);
  check_per_token(kMatch, "roles", roles_in, B, N, at::kChar);
  TORCH_CHECK_VALUE(r >= 0, kMatch, ": r must be >= 0, got ", r);
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max() / 2, kMatch, ": at most 2^30 tokens per row, got ", N);
  const at::Tensor metric = metric_in.contiguous(), sizes = sizes_in.contiguous(), roles = roles_in.contiguous();
  check_sizes_values(kMatch, sizes);
  const int8_t* rp = roles.data_ptr<int8_t>();
  int64_t min_sources = N;
  for (int64_t b = 0; b < B; ++b) {
    int64_t sources = 0, destinations = 0;
    for (int64_t i = 0; i < N; ++i) {
      const int8_t v = rp[b * N + i];
      TORCH_CHECK_VALUE(v >= 0 && v <= 2, kMatch, ": roles must be 0 (source), 1 (destination) or 2 (keep), got roles[",
                        b, ", ", i, "] = ", int(v));
      sources += v == kSource;
      destinations += v == kDestination;
    }
    TORCH_CHECK_VALUE(r == 0 || (sources >= r && destinations > 0), kMatch,
                      ": every row needs at least r = ", r, " source tokens and one destination token; row ", b,
                      " has ", sources, " sources and ", destinations, " destinations");
    min_sources = std::min(min_sources, sources);
  }
  const auto opts = metric.options();
  at::Tensor slot = at::empty({B, N}, opts.dtype(at::kLong));
  at::Tensor dst = at::empty({B, N}, opts.dtype(at::kLong));
  at::Tensor score = at::empty({B, N}, opts.dtype(at::kFloat));
  if (B == 0 || N == 0) return {slot, dst, score};
  TORCH_CHECK_VALUE(C >= 1, kMatch, ": metric needs at least one channel, got shape ", metric.sizes());

  TomeMatchParams p;
  p.batch = B, p.tokens = N, p.channels = C, p.r = r, p.dtype = dtype;
  p.metric = metric.data_ptr();
  p.sizes = sizes.data_ptr<float>();
  p.roles = rp;
  p.slot = slot.data_ptr<int64_t>(), p.dst = dst.data_ptr<int64_t>(), p.score = score.data_ptr<float>();
  // Rows are the work items unless there are too few to keep the threads busy: then each row's
  // sources are split in chunks of at least 64 (each chunk normalises the row's destinations again).
  const int64_t T = threads();
  if (B < 2 * T) p.chunks = std::max<int64_t>(1, std::min<int64_t>((2 * T + B - 1) / B, min_sources / 64));
  const MatchFn match = pick_match();
  if (p.chunks == 1) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      match(p, b0, b1);
      tome_select_rows(p, b0, b1);
    });
  } else {
    at::parallel_for(0, match_items(p), 1, [&](int64_t i0, int64_t i1) { match(p, i0, i1); });
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { tome_select_rows(p, b0, b1); });
  }
  return {slot, dst, score};
}

std::tuple<at::Tensor, at::Tensor> tome_merge_cpu(const at::Tensor& x_in, const at::Tensor& sizes_in,
                                                  const at::Tensor& slot_in, int64_t n_out) {
  check_cpu(kMerge, "x", x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 3, kMerge, ": x must be [B, N, D], got shape ", x_in.sizes());
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const TomeDtype dtype = elem_dtype(kMerge, "x", x_in);
  check_per_token(kMerge, "sizes", sizes_in, B, N, at::kFloat);
  check_per_token(kMerge, "slot", slot_in, B, N, at::kLong);
  TORCH_CHECK_VALUE(n_out >= 0, kMerge, ": n_out must be >= 0, got ", n_out);
  const at::Tensor x = x_in.contiguous(), sizes = sizes_in.contiguous(), slot = slot_in.contiguous();
  check_sizes_values(kMerge, sizes);
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t e = 0, n = B * N; e < n; ++e)
    TORCH_CHECK_VALUE(sp[e] >= 0 && sp[e] < n_out, kMerge, ": slot values must be in [0, n_out = ", n_out,
                      "), got slot[", e / N, ", ", e % N, "] = ", sp[e]);
  at::Tensor out = at::empty({B, n_out, D}, x.options());
  at::Tensor out_sizes = at::empty({B, n_out}, x.options().dtype(at::kFloat));
  if (B == 0 || n_out == 0) return {out, out_sizes};

  TomeMergeParams p;
  p.batch = B, p.tokens = N, p.dim = D, p.n_out = n_out, p.dtype = dtype;
  p.x = x.data_ptr();
  p.sizes = sizes.data_ptr<float>();
  p.slot = sp;
  p.out = out.data_ptr();
  p.out_sizes = out_sizes.data_ptr<float>();
  // Rows are the work items unless too few: then columns in chunks of at least 64.
  const int64_t T = threads();
  p.d_chunk = std::max<int64_t>(D, 1);
  if (B < 2 * T && D >= 128) {
    const int64_t parts = std::min<int64_t>((2 * T + B - 1) / B, D / 64);
    p.d_chunk = ((D + parts - 1) / parts + 63) / 64 * 64;
  }
  const MergeFn merge = pick_merge();
  at::parallel_for(0, merge_items(p), 1, [&](int64_t i0, int64_t i1) { merge(p, i0, i1); });
  return {out, out_sizes};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("tome_match", &tome_match_cpu);
  m.impl("tome_merge", &tome_merge_cpu);
}

}  // namespace slimformer::tome
