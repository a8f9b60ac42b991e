// First include of every SIMD kernel translation unit (gptq_cpu_avx2.cpp, gptq_cpu_a8_avx2.cpp,
// gptq_cpu_a8_avxvnni.cpp, gptq_cpu_avx512.cpp).
//
// Why: those files are not built with -mavx2/-mavx512f. Each compiles its kernels inside a
// `#pragma GCC target(...)` region instead, and includes every header with inline or template code
// that other translation units compile too (the standard library, gptq_format.h, ...) here, before
// that region. Such functions become weak symbols that the linker merges across translation units;
// compiled with -m flags, the copy it keeps could carry AVX-512 instructions into the scalar or AVX2
// path and crash CPUs without them. Code inside the regions has internal linkage (anonymous
// namespaces) or ISA-specific template arguments, so nothing ISA-specific is shared.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <utility>

#include "gptq/gptq_cpu.h"
#include "gptq/gptq_cpu_a8.h"
#include "gptq/gptq_format.h"
