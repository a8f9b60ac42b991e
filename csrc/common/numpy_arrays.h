// The numpy arguments of the CUDA test hooks (*_cuda_test_hooks.h, included by module.cpp only):
// C-contiguous arrays of one element type; pybind11 converts (copies) an argument of another dtype or
// layout.
#pragma once
#include <pybind11/numpy.h>
#include <stdint.h>

namespace slimformer {

template <class T>
using NumpyArray = pybind11::array_t<T, pybind11::array::c_style | pybind11::array::forcecast>;
using F32Array = NumpyArray<float>;
using I8Array = NumpyArray<int8_t>;
using U8Array = NumpyArray<uint8_t>;
using I32Array = NumpyArray<int32_t>;
using I64Array = NumpyArray<int64_t>;

}  // namespace slimformer
