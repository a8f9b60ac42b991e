// Placeholder: host replays of the token merging CUDA kernels (filled in by the CUDA work).
#pragma once
#include <pybind11/pybind11.h>

namespace slimformer::tome::cuda::test_hooks {
inline void add(pybind11::module_& /*m*/) {}
}  // namespace slimformer::tome::cuda::test_hooks
