// IntTag<V>: an int as a type, so that a run-time value can pick a template instantiation through a
// generic lambda (f(IntTag<v>{}); the lambda reads decltype(tag)::value). Used by the CPU kernel
// templates (common/cpu_with_count.h) and the CUDA launchers. Torch- and CUDA-free; no code.
#pragma once

namespace slimformer {

template <int V>
struct IntTag {
  static constexpr int value = V;
};

}  // namespace slimformer
