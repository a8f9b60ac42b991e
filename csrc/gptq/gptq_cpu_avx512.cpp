// AVX-512 CPU kernels (compiled for AVX-512 F/BW/VL/VNNI plus AVX2/FMA/F16C for the shared
// 256-bit helpers, inside the region below: see gptq_cpu_simd_prelude.h; called only at ISA level
// avx512vnni): the float gptq_gemm kernel and the int8-activation kernel (512-bit vpdpbusd) at
// 32 columns per register tile and up to 8 rows per pass. On cores with full-width AVX-512 (Zen 5,
// Intel server parts) this doubles the throughput of the 256-bit kernels.
#include "gptq/gptq_cpu_simd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include "gptq/gptq_cpu_a8_simd.h"
#include "gptq/gptq_cpu_gemm_simd.h"
#include "gptq/gptq_cpu_vec512.h"

namespace slimformer {
namespace gptq {

void gemm_avx512(const GemmArgs& a, int64_t n_begin, int64_t n_end) { fp::gemm<Zmm>(a, n_begin, n_end); }

void gemm_a8_avx512vnni(const A8Args& a, int64_t n_begin, int64_t n_end) { a8::gemm<Zmm>(a, n_begin, n_end); }

}  // namespace gptq
}  // namespace slimformer

#pragma GCC pop_options
