// First include of every sparse attention CPU kernel translation unit. As in
// gptq/gptq_cpu_simd_prelude.h: the SIMD files compile their kernels inside a `#pragma GCC target`
// region, so every header with inline or template code that other translation units also compile
// (the standard library, the scalar element conversions of common/float_bits.h) is included here,
// before that region; no merged weak symbol can then carry AVX/AVX-512 code into the scalar path.
// The kernel templates (sparse_attention_cpu_impl.h) live in an anonymous namespace inside each
// region.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "attention/sparse_attention_cpu.h"
#include "attention/sparse_attention_params.h"
#include "common/float_bits.h"
