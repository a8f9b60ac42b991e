#include "common/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace slimformer {
namespace {

CpuIsa best_isa() {
  if (cpu_supports_avx512vnni()) return CpuIsa::kAvx512Vnni;
  if (cpu_supports_avxvnni()) return CpuIsa::kAvxVnni;
  return cpu_supports_avx2() ? CpuIsa::kAvx2 : CpuIsa::kScalar;
}

// SLIMFORMER_CPU_ISA (scalar, avx2, avxvnni, avx512vnni) caps the level, e.g. to test the AVX2
// path on an AVX-512 machine; unknown or unsupported values leave the best level.
CpuIsa initial_isa() {
  const char* env = std::getenv("SLIMFORMER_CPU_ISA");
  if (env == nullptr) return best_isa();
  const struct {
    const char* name;
    CpuIsa isa;
    bool supported;
  } levels[] = {{"scalar", CpuIsa::kScalar, true},
                {"avx2", CpuIsa::kAvx2, cpu_supports_avx2()},
                {"avxvnni", CpuIsa::kAvxVnni, cpu_supports_avxvnni()},
                {"avx512vnni", CpuIsa::kAvx512Vnni, cpu_supports_avx512vnni()}};
  for (const auto& level : levels) {
    if (std::strcmp(env, level.name) == 0 && level.supported) return level.isa;
  }
  return best_isa();
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

bool cpu_supports_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool cpu_supports_avxvnni() {
#if defined(__x86_64__) || defined(__i386__)
  // GCC 12's __builtin_cpu_supports has no "avxvnni": read CPUID leaf 7, subleaf 1, EAX bit 4.
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return cpu_supports_avx2() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1u);
  }();
  return ok;
#else
  return false;
#endif
}

bool cpu_supports_avx512vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = cpu_supports_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

bool cpu_supports_avx512vpopcntdq() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = cpu_supports_avx512vnni() && __builtin_cpu_supports("avx512vpopcntdq");
  return ok;
#else
  return false;
#endif
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(isa_slot().load(std::memory_order_relaxed)); }

bool set_cpu_isa(const char* name) {
  CpuIsa isa;
  if (std::strcmp(name, "scalar") == 0) {
    isa = CpuIsa::kScalar;
  } else if (std::strcmp(name, "avx2") == 0) {
    if (!cpu_supports_avx2()) return false;
    isa = CpuIsa::kAvx2;
  } else if (std::strcmp(name, "avxvnni") == 0) {
    if (!cpu_supports_avxvnni()) return false;
    isa = CpuIsa::kAvxVnni;
  } else if (std::strcmp(name, "avx512vnni") == 0) {
    if (!cpu_supports_avx512vnni()) return false;
    isa = CpuIsa::kAvx512Vnni;
  } else if (std::strcmp(name, "auto") == 0) {
    isa = best_isa();
  } else {
    return false;
  }
  isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Vnni: return "avx512vnni";
    case CpuIsa::kAvxVnni: return "avxvnni";
    case CpuIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace slimformer
