// ATen adapter of the token merging ops on CUDA (tome_match, tome_merge): checks (each failure a
// ValueError naming the tensor, shape, dtype, device or value), outputs and workspaces from torch's
// caching allocator, launches on the current stream.
//
// Value checks (the same as the CPU adapter's: sizes finite and >= 0, roles in {0, 1, 2}, every row
// feasible for r, slot in [0, n_out)) are counted on the device by the first kernel of each op; the
// adapter then copies the counters to the host (one sync per call) and raises before launching the rest.
// While the current stream is being captured into a CUDA graph the copy is impossible: the checks are
// skipped and the kernels run on whatever they were given (they never index out of bounds: invalid
// slots are skipped, a merged source's destination is clamped to the row).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <tuple>

#include "tome/tome_cuda.h"

namespace slimformer {
namespace tome {
namespace {

constexpr const char* kMatch = "slimformer.tome_match";
constexpr const char* kMerge = "slimformer.tome_merge";

void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA ", what, " failed: ", cudaGetErrorString(err));
}

cuda::DType elem_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return cuda::DType::kFloat32;
}

void check_per_token(const char* op, const char* name, const at::Tensor& t, const at::Tensor& first, int64_t B,
                     int64_t N, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
                    first.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == N, op, ": ", name, " must be [B, N] = [", B, ", ",
                    N, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// The device counters, or nothing while the stream is being captured (no host copy possible).
bool can_check_on_host() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tome_match_cuda(const at::Tensor& metric_in, const at::Tensor& sizes_in,
                                                               const at::Tensor& roles_in, int64_t r) {
  TORCH_CHECK_VALUE(metric_in.is_cuda(), kMatch, ": metric is on ", metric_in.device(), " but this is the CUDA kernel");
  TORCH_CHECK_VALUE(metric_in.dim() == 3, kMatch, ": metric must be [B, N, C], got shape ", metric_in.sizes());
  const int64_t B = metric_in.size(0), N = metric_in.size(1), C = metric_in.size(2);
  const cuda::DType dtype = elem_dtype(kMatch, "metric", metric_in);
  check_per_token(kMatch, "sizes", sizes_in, metric_in, B, N, at::kFloat);
  check_per_token(kMatch, "roles", roles_in, metric_in, B, N, at::kChar);
  TORCH_CHECK_VALUE(r >= 0, kMatch, ": r must be >= 0, got ", r);
  TORCH_CHECK_VALUE(N <= cuda::kMaxTokens, kMatch, ": at most ", cuda::kMaxTokens, " tokens per row on CUDA, got ", N);
  TORCH_CHECK_VALUE(B <= INT32_MAX, kMatch, ": batch ", B, " is too large for the CUDA grid");
  const c10::cuda::CUDAGuard guard(metric_in.device());
  const at::Tensor metric = metric_in.contiguous(), sizes = sizes_in.contiguous(), roles = roles_in.contiguous();
  const auto opts = metric.options();
  at::Tensor slot = at::empty({B, N}, opts.dtype(at::kLong));
  at::Tensor dst = at::empty({B, N}, opts.dtype(at::kLong));
  at::Tensor score = at::empty({B, N}, opts.dtype(at::kFloat));
  if (B == 0) return {slot, dst, score};
  if (N == 0) {  // every row has 0 sources and no destination
    TORCH_CHECK_VALUE(r == 0, kMatch, ": every row needs at least r = ", r,
                      " source tokens and one destination token; the rows have no tokens");
    return {slot, dst, score};
  }
  TORCH_CHECK_VALUE(C >= 1, kMatch, ": metric needs at least one channel, got shape ", metric.sizes());

  at::Tensor workspace = at::empty({cuda::match_workspace(B, N).bytes}, opts.dtype(at::kByte));
  at::Tensor flags = at::zeros({3}, opts.dtype(at::kInt));
  cuda::MatchArgs a;
  a.dtype = dtype;
  a.metric = metric.data_ptr();
  a.sizes = sizes.data_ptr<float>();
  a.roles = roles.data_ptr<int8_t>();
  a.B = B, a.N = N, a.C = C, a.r = r;
  a.slot = slot.data_ptr<int64_t>();
  a.dst = dst.data_ptr<int64_t>();
  a.score = score.data_ptr<float>();
  a.workspace = workspace.data_ptr();
  a.flags = flags.data_ptr<int32_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::launch_match_prepare(a, stream), kMatch, "prepare launch");
  if (can_check_on_host()) {
    const at::Tensor f = flags.cpu();
    const int32_t* fp = f.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(fp[2] == 0, kMatch, ": sizes must be finite and >= 0; ", fp[2], " values are not");
    TORCH_CHECK_VALUE(fp[1] == 0, kMatch, ": roles must be 0 (source), 1 (destination) or 2 (keep); ", fp[1],
                      " values are not");
    TORCH_CHECK_VALUE(fp[0] == 0, kMatch, ": every row needs at least r = ", r,
                      " source tokens and one destination token; ", fp[0], " of ", B, " rows do not");
  }
  check_launch(cuda::launch_match_finish(a, stream), kMatch, "match launch");
  return {slot, dst, score};
}

std::tuple<at::Tensor, at::Tensor> tome_merge_cuda(const at::Tensor& x_in, const at::Tensor& sizes_in,
                                                   const at::Tensor& slot_in, int64_t n_out) {
  TORCH_CHECK_VALUE(x_in.is_cuda(), kMerge, ": x is on ", x_in.device(), " but this is the CUDA kernel");
  TORCH_CHECK_VALUE(x_in.dim() == 3, kMerge, ": x must be [B, N, D], got shape ", x_in.sizes());
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const cuda::DType dtype = elem_dtype(kMerge, "x", x_in);
  check_per_token(kMerge, "sizes", sizes_in, x_in, B, N, at::kFloat);
  check_per_token(kMerge, "slot", slot_in, x_in, B, N, at::kLong);
  TORCH_CHECK_VALUE(n_out >= 0, kMerge, ": n_out must be >= 0, got ", n_out);
  TORCH_CHECK_VALUE(N < INT32_MAX && n_out < INT32_MAX, kMerge, ": N (", N, ") and n_out (", n_out,
                    ") must be below 2^31 on CUDA");
  TORCH_CHECK_VALUE(B * n_out / cuda::kMergeWarps < INT32_MAX && B / cuda::kMergeWarps < INT32_MAX, kMerge,
                    ": B * n_out = ", B * n_out, " output rows are too many for the CUDA grid");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), sizes = sizes_in.contiguous(), slot = slot_in.contiguous();
  at::Tensor out = at::empty({B, n_out, D}, x.options());
  at::Tensor out_sizes = at::empty({B, n_out}, x.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {out.zero_(), out_sizes.zero_()};
  TORCH_CHECK_VALUE(n_out > 0, kMerge, ": slot values must be in [0, n_out = 0), which is empty, but there are ", N,
                    " tokens per row");

  at::Tensor workspace = at::empty({cuda::merge_workspace(B, N, n_out).bytes}, x.options().dtype(at::kByte));
  at::Tensor flags = at::zeros({2}, x.options().dtype(at::kInt));
  cuda::MergeArgs a;
  a.dtype = dtype;
  a.x = x.data_ptr();
  a.sizes = sizes.data_ptr<float>();
  a.slot = slot.data_ptr<int64_t>();
  a.B = B, a.N = N, a.D = D, a.n_out = n_out;
  a.out = out.data_ptr();
  a.out_sizes = out_sizes.data_ptr<float>();
  a.workspace = workspace.data_ptr();
  a.flags = flags.data_ptr<int32_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::launch_merge_index(a, stream), kMerge, "index launch");
  if (can_check_on_host()) {
    const at::Tensor f = flags.cpu();
    const int32_t* fp = f.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(fp[1] == 0, kMerge, ": sizes must be finite and >= 0; ", fp[1], " values are not");
    TORCH_CHECK_VALUE(fp[0] == 0, kMerge, ": slot values must be in [0, n_out = ", n_out, "); ", fp[0],
                      " values are not");
  }
  check_launch(cuda::launch_merge_gather(a, stream), kMerge, "gather launch");  // D = 0: out_sizes only
  return {out, out_sizes};
}

}  // namespace
}  // namespace tome
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CUDA, m) {
  m.impl("tome_match", &slimformer::tome::tome_match_cuda);
  m.impl("tome_merge", &slimformer::tome::tome_merge_cuda);
}
