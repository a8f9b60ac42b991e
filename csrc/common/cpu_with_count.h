// with_count<N>(n, fn): fn(IntTag<n>{}) for a run-time n in [1, N] (nothing for other n): the tails
// of the register blocking in the CPU kernel templates. Included by those templates
// (tome_cpu_impl.h, sparse_attention_cpu_impl.h) inside each ISA's `#pragma GCC target` region, never
// from a prelude: it lives in an anonymous namespace, so every region compiles its own copy for its
// ISA and the micro-kernel lambdas it calls inline into it.
#pragma once
#include "common/int_tag.h"

namespace slimformer {
namespace {  // internal linkage: one copy per ISA

template <int N, class Fn>
inline void with_count(int n, Fn&& fn) {
  if constexpr (N >= 1) {
    if (n == N) {
      fn(IntTag<N>{});
      return;
    }
    with_count<N - 1>(n, fn);
  }
}

}  // namespace
}  // namespace slimformer
