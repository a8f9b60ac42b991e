// slimformer._C._test_cuda_* : the CUDA kernels' index and bit math (gptq_cuda_math.h) and a host
// replay of the kernels (gptq_cuda_emulate.h), for tests/test_gptq_cuda_math.py. Compiled into
// every build, CPU-only too: nothing here needs CUDA or torch. Included by module.cpp only.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>

#include "common/numpy_arrays.h"
#include "gptq/gptq_cuda_emulate.h"
#include "gptq/gptq_cuda_math.h"
#include "gptq/gptq_format.h"

namespace slimformer {
namespace gptq {
namespace cuda {
namespace test_hooks {

namespace py = pybind11;

// A buffer tagged fp32 (float32 array) or fp16/bf16 (uint16/int16 array of the raw bits).
inline const void* typed_buffer(const py::array& a, int type, int64_t size, const char* name) {
  if (type < 0 || type > 2) throw py::value_error(std::string(name) + ": type must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (a.itemsize() != (type == 0 ? 4 : 2) || a.size() != size)
    throw py::value_error(std::string(name) + " has the wrong item size or element count");
  return a.data();
}

// The packed weights as numpy arrays (shapes as the ops take them), checked like check_weights().
inline QuantWeights weights_from_numpy(const I32Array& qweight, const I32Array& qzeros, const py::array& scales,
                                       int scale_type, const I32Array& g_idx, int bits, int zero_offset) {
  if (!supported_bits(bits)) throw py::value_error("unsupported bits");
  if (qweight.ndim() != 2 || qzeros.ndim() != 2 || g_idx.ndim() != 1) throw py::value_error("bad ranks");
  const int64_t K = g_idx.shape(0), N = qweight.shape(1), G = qzeros.shape(0);
  if (K <= 0 || (K * bits) % 32 != 0 || qweight.shape(0) != K * bits / 32)
    throw py::value_error("qweight rows do not match len(g_idx) and bits");
  if (G <= 0 || qzeros.shape(1) != qzeros_words(N, bits)) throw py::value_error("qzeros shape mismatch");
  QuantWeights w;
  w.qweight = qweight.data();
  w.qzeros = qzeros.data();
  w.scales = typed_buffer(scales, scale_type, G * N, "scales");
  w.g_idx = g_idx.data();
  w.scale_type = static_cast<ScaleType>(scale_type);
  w.K = K;
  w.N = N;
  w.G = G;
  w.zeros_stride = qzeros.shape(1);
  w.bits = bits;
  w.zero_offset = zero_offset;
  w.vector_loads = vector_loads_ok(N, reinterpret_cast<uintptr_t>(w.qweight));
  return w;
}

inline F32Array emulate_gemv_np(const I32Array& qweight, const I32Array& qzeros, const py::array& scales,
                                int scale_type, const I32Array& g_idx, const F32Array& x,
                                const std::optional<I32Array>& perm, const std::optional<py::array>& bias,
                                int bias_type, int bits, int zero_offset, int sm_count,
                                std::optional<int64_t> splits) {
  const QuantWeights w = weights_from_numpy(qweight, qzeros, scales, scale_type, g_idx, bits, zero_offset);
  if (x.ndim() != 2 || x.shape(1) != w.K || x.shape(0) < 1 || x.shape(0) > kMaxGemvRows)
    throw py::value_error("x must be [M, K] with 1 <= M <= 16");
  if (perm && perm->size() != w.K) throw py::value_error("perm must have K entries");
  const void* b = bias ? typed_buffer(*bias, bias_type, w.N, "bias") : nullptr;
  if (sm_count < 1 || (splits && (*splits < 1 || *splits > kMaxGridY))) throw py::value_error("bad sm_count or splits");
  const int64_t M = x.shape(0);
  GemvPlan plan = plan_gemv(M, w.N, w.K, bits, sm_count);
  if (splits) plan.splits = *splits;  // any split count is valid; the plan only picks a fast one
  F32Array y({M, w.N});
  emulate_gemv(w, x.data(), perm ? perm->data() : nullptr, b, static_cast<ScaleType>(bias_type), M, plan,
               y.mutable_data());
  return y;
}

inline F32Array emulate_dequantize_np(const I32Array& qweight, const I32Array& qzeros, const py::array& scales,
                                      int scale_type, const I32Array& g_idx, int bits, int zero_offset) {
  const QuantWeights w = weights_from_numpy(qweight, qzeros, scales, scale_type, g_idx, bits, zero_offset);
  F32Array out({w.K, w.N});
  emulate_dequantize(w, out.mutable_data());
  return out;
}

inline void add(py::module_& m) {
  m.def("_test_cuda_split_range", [](int64_t total, int64_t parts, int64_t i) {
    if (total < 0 || parts < 1 || i < 0 || i >= parts) throw py::value_error("need total >= 0, 0 <= i < parts");
    const Range r = split_range(total, parts, i);
    return std::make_tuple(r.begin, r.end);
  });
  m.def("_test_cuda_clamp_index", &clamp_index);
  m.def("_test_cuda_vector_loads_ok", [](int64_t N, uint64_t address) { return vector_loads_ok(N, address); });
  m.def("_test_cuda_unit_word_row", &unit_word_row);
  m.def("_test_cuda_unit_value_k", &unit_value_k);
  m.def("_test_cuda_unit_shape", [](int bits) {
    if (!supported_bits(bits)) throw py::value_error("unsupported bits");
    int values = 0, words = 0;
    with_bits(bits, [&](auto b) {
      values = Unit<decltype(b)::value>::kValues;
      words = Unit<decltype(b)::value>::kWords;
    });
    return std::make_tuple(values, words);
  });
  m.def("_test_cuda_gemv_first_column", &gemv_first_column);
  m.def("_test_cuda_dequant_first_column", &dequant_first_column);
  m.def("_test_cuda_magic_float", &magic_float);
  m.def("_test_cuda_dequant_magic", [](uint32_t q, float zero_point, float scale) {
    return dequant_magic(q, magic_zero(zero_point), scale);
  });
  m.def("_test_cuda_plan_gemv", [](int64_t M, int64_t N, int64_t K, int bits, int sm_count) {
    if (M < 1 || N < 1 || K < 1 || !supported_bits(bits) || sm_count < 1) throw py::value_error("bad plan inputs");
    const GemvPlan p = plan_gemv(M, N, K, bits, sm_count);
    return std::make_tuple(p.rows, p.row_tiles, p.col_blocks, p.splits);
  });
  m.def("_test_cuda_gemv_warp_units", [](int64_t units, int64_t splits, int64_t split, int warp) {
    const Range r = gemv_warp_units(units, splits, split, warp);
    return std::make_tuple(r.begin, r.end);
  });
  m.def("_test_cuda_constants", [] {
    return py::dict(py::arg("vec") = kVec, py::arg("block_cols") = kBlockCols, py::arg("gemv_warps") = kGemvWarps,
                    py::arg("dequant_threads") = kDequantThreads, py::arg("max_gemv_rows") = kMaxGemvRows,
                    py::arg("max_row_tile") = kMaxRowTile, py::arg("max_grid_y") = kMaxGridY,
                    py::arg("target_blocks_per_sm") = kTargetBlocksPerSm, py::arg("min_k_per_warp") = kMinKPerWarp);
  });
  m.def("_test_cuda_emulate_gemv", &emulate_gemv_np, py::arg("qweight"), py::arg("qzeros"), py::arg("scales"),
        py::arg("scale_type"), py::arg("g_idx"), py::arg("x"), py::arg("perm"), py::arg("bias"), py::arg("bias_type"),
        py::arg("bits"), py::arg("zero_offset"), py::arg("sm_count"), py::arg("splits") = py::none(),
        "y [M, N] fp32 as the CUDA small-batch kernel computes it with plan_gemv(..., sm_count) (or with\n"
        "`splits` splits of K instead of the planned count), replayed thread by thread on the host.");
  m.def("_test_cuda_emulate_dequantize", &emulate_dequantize_np, py::arg("qweight"), py::arg("qzeros"),
        py::arg("scales"), py::arg("scale_type"), py::arg("g_idx"), py::arg("bits"), py::arg("zero_offset"),
        "W [K, N] fp32 as the CUDA dequantize kernel computes it, replayed thread by thread on the host.");
}

}  // namespace test_hooks
}  // namespace cuda
}  // namespace gptq
}  // namespace slimformer
