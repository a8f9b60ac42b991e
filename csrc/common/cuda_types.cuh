// The float types of the CUDA kernels: hardware conversions to and from fp32 (one instruction each)
// and the dispatch from a run-time dtype enum to a kernel template argument. Shared by every .cu file.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/hostdev.h"

namespace slimformer {
namespace cuda_types {

SF_HD float to_float(float v) { return v; }
SF_HD float to_float(__half v) { return __half2float(v); }
SF_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
SF_HD T from_float(float v);
template <>
SF_HD float from_float<float>(float v) { return v; }
template <>
SF_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
SF_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) with T the type `t` names: any enum with kFloat16 and kBFloat16; other values mean float.
template <class E, class F>
void with_type(E t, F&& f) {
  switch (t) {
    case E::kFloat16: f(TypeTag<__half>{}); break;
    case E::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: f(TypeTag<float>{}); break;
  }
}

}  // namespace cuda_types
}  // namespace slimformer
