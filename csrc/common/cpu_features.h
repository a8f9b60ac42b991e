// Run-time choice of the CPU kernel implementation. The AVX2 kernels live in their own
// translation units compiled with -mavx2 -mfma -mf16c; nothing else may use those flags, so a wheel
// never executes an AVX2 instruction on a CPU without it.
#pragma once

namespace slimformer {

// Ordered: each level includes the ones below it.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };

// True when the CPU supports AVX2, FMA and F16C.
bool cpu_supports_avx2();
// True when it also supports AVX-VNNI (256-bit vpdpbusd; Intel Alder Lake+, AMD Zen 4+).
bool cpu_supports_avxvnni();
// True when it also supports AVX-512 F/BW/VL/VNNI (Intel Ice Lake+ servers, AMD Zen 4+).
bool cpu_supports_avx512vnni();
// True when it also supports AVX512_VPOPCNTDQ (vpopcntd/q; Intel Ice Lake+, AMD Zen 4+). Not an ISA
// level of its own: kernels that need it check it at level kAvx512Vnni and fall back to AVX2.
bool cpu_supports_avx512vpopcntdq();

// The implementation the kernels use now: the best supported one unless forced to scalar by
// set_cpu_isa() or capped by the SLIMFORMER_CPU_ISA environment variable (read once at start-up).
CpuIsa active_cpu_isa();

// Force an implementation ("scalar", "avx2", "avxvnni", "avx512vnni" or "auto"); false if the name is
// unknown or the CPU lacks the ISA.
bool set_cpu_isa(const char* name);

const char* cpu_isa_name(CpuIsa isa);

}  // namespace slimformer
