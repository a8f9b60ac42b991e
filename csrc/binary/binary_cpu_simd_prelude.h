// First include of the SIMD translation units of the binary kernels (binary_cpu_avx2.cpp,
// binary_cpu_avx512.cpp). As in gptq/gptq_cpu_simd_prelude.h: those files compile their kernels
// inside a `#pragma GCC target` region, and every header with inline or template code that other
// translation units also compile (the standard library, binary_format.h, ...) is included here,
// before that region, so that no merged weak symbol can carry AVX/AVX-512 code into the scalar
// path. Code inside the regions has internal linkage (anonymous namespaces).
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <cstring>

#include "binary/binary_cpu.h"
#include "binary/binary_format.h"
