// The pybind11 module slimformer._C: build and run-time facts plus test hooks for the torch-free
// bit math. The ops themselves go through the dispatcher (torch.ops.slimformer.*).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "attention/sparse_attention_cuda_test_hooks.h"
#include "binary/binary_cuda_test_hooks.h"
#include "common/cpu_features.h"
#include "gptq/gptq_cuda_test_hooks.h"
#include "gptq/gptq_format.h"
#include "tome/tome_cuda_test_hooks.h"

#ifndef SLIMFORMER_CUDA_ARCHS
#define SLIMFORMER_CUDA_ARCHS ""
#endif
#ifndef SLIMFORMER_VERSION
#define SLIMFORMER_VERSION "0+unknown"
#endif

namespace py = pybind11;
using namespace slimformer;

namespace {

py::array_t<uint32_t> unpack_stream_np(py::array_t<int32_t, py::array::c_style> words, int64_t stride,
                                       int bits, int64_t count) {
  if (!gptq::supported_bits(bits)) throw py::value_error("unsupported bits");
  if (stride <= 0) throw py::value_error("stride must be positive");
  const int64_t needed_words = (count * bits + 31) / 32;
  if (count < 0 || (needed_words - 1) * stride >= words.size())
    throw py::value_error("words too short for count values");
  py::array_t<uint32_t> out(count);
  auto o = out.mutable_unchecked<1>();
  for (int64_t i = 0; i < count; ++i) o(i) = gptq::unpack_stream(words.data(), stride, bits, i);
  return out;
}

uint32_t unpack_unit(uint32_t w0, uint32_t w1, uint32_t w2, int bits, int j) {
  if (!gptq::supported_bits(bits) || j < 0 || j >= gptq::values_per_unit(bits))
    throw py::value_error("bad bits or value index");
  return gptq::unpack_unit(w0, w1, w2, bits, j);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "slimformer compiled kernels (ops are in torch.ops.slimformer)";
  m.attr("__version__") = SLIMFORMER_VERSION;
  m.attr("built_torch_version") = SLIMFORMER_TORCH_VERSION;
#ifdef SLIMFORMER_WITH_CUDA
  m.attr("has_cuda_kernels") = true;
#else
  m.attr("has_cuda_kernels") = false;
#endif
  m.attr("cuda_archs") = std::string(SLIMFORMER_CUDA_ARCHS);
  m.attr("compiled_cpu_isas") = std::vector<std::string>{"scalar", "avx2", "avxvnni", "avx512vnni"};
  m.def("cpu_supports_avx2", &cpu_supports_avx2, "Whether this CPU has AVX2, FMA and F16C.");
  m.def("cpu_supports_avxvnni", &cpu_supports_avxvnni, "Whether this CPU also has AVX-VNNI.");
  m.def("cpu_supports_avx512vnni", &cpu_supports_avx512vnni, "Whether this CPU has AVX-512 F/BW/VL/VNNI.");
  m.def("cpu_supports_avx512vpopcntdq", &cpu_supports_avx512vpopcntdq,
        "Whether this CPU also has AVX512_VPOPCNTDQ (the W1A1 binary kernel at 512 bits).");
  m.def("active_cpu_isa", [] { return std::string(cpu_isa_name(active_cpu_isa())); },
        "The CPU kernel implementation in use: 'scalar', 'avx2', 'avxvnni' or 'avx512vnni'.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        if (!set_cpu_isa(name.c_str()))
          throw py::value_error("cannot use CPU ISA '" + name +
                                 "' (choose scalar, avx2, avxvnni, avx512vnni or auto; the CPU must support it)");
      },
      py::arg("name"), "Force the CPU kernel implementation: 'scalar', 'avx2', 'avxvnni', 'avx512vnni' or 'auto'.");

  // Test hooks: the same __host__ __device__ functions the CUDA kernels run.
  m.def("_test_unpack_stream", &unpack_stream_np);
  m.def("_test_unpack_unit", &unpack_unit);
  m.def("_test_half_bits_to_float", [](uint16_t h) { return slimformer::half_bits_to_float(h); });
  m.def("_test_bf16_bits_to_float", [](uint16_t b) { return slimformer::bf16_bits_to_float(b); });

  // ---- CUDA kernel test hooks: _test_cuda_* (index/bit math and a host replay of the kernels;
  // torch- and CUDA-free, so present in CPU-only builds too). See gptq/gptq_cuda_test_hooks.h.
  gptq::cuda::test_hooks::add(m);
  // _test_binary_cuda_*: the binary CUDA kernels' math and host replays (binary/binary_cuda_test_hooks.h).
  binary::cuda::test_hooks::add(m);
  // _test_sparse_cuda_*: the sparse attention CUDA kernels' math and host replays
  // (attention/sparse_attention_cuda_test_hooks.h).
  attention::cuda::test_hooks::add(m);
  // _test_tome_cuda_*: the token merging CUDA kernels' math and host replays (tome/tome_cuda_test_hooks.h).
  tome::cuda::test_hooks::add(m);
}
