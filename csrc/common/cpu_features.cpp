#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace slimformer {
namespace {

CpuIsa best_isa() { return cpu_supports_avx2() ? CpuIsa::kAvx2 : CpuIsa::kScalar; }

CpuIsa initial_isa() {
  const char* env = std::getenv("SLIMFORMER_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "scalar") == 0) return CpuIsa::kScalar;
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

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(isa_slot().load(std::memory_order_relaxed)); }

bool set_cpu_isa(const char* name) {
  CpuIsa isa;
  if (std::strcmp(name, "scalar") == 0) {
    isa = CpuIsa::kScalar;
  } else if (std::strcmp(name, "avx2") == 0) {
    if (!cpu_supports_avx2()) return false;
    isa = CpuIsa::kAvx2;
  } else if (std::strcmp(name, "auto") == 0) {
    isa = best_isa();
  } else {
    return false;
  }
  isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "scalar"; }

}  // namespace slimformer
