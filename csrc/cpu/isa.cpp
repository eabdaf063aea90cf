#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lvopt {
namespace cpu {

Isa hardware_isa() {
#if LVOPT_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

static Isa resolve_isa() {
  const Isa hw = hardware_isa();
  const char* env = std::getenv("LVOPT_CPU_ISA");
  if (env == nullptr || *env == '\0') return hw;
  Isa want = hw;
  parse_isa(env, &want);
  // An unknown value or a level above the hardware's gives the hardware level:
  // lvopt.build_info() reports the level actually used, and importing lvopt warns
  // (lvopt/_ops.py, check_cpu_isa_env).
  return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
}

// -1 until the first call resolves LVOPT_CPU_ISA; set_active_isa overrides it. Every dispatch
// reads it once per call (a relaxed load): the levels compute the same bits, so a step that
// overlaps a switch is still exact, only partly at the other speed.
static std::atomic<int> g_active{-1};

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    int expected = -1;
    g_active.compare_exchange_strong(expected, static_cast<int>(resolve_isa()),
                                     std::memory_order_relaxed);
    v = g_active.load(std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

Isa set_active_isa(Isa want) {
  const Isa hw = hardware_isa();
  const Isa isa = static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa;
}

bool parse_isa(const char* name, Isa* out) {
  if (std::strcmp(name, "baseline") == 0)
    *out = Isa::kBaseline;
  else if (std::strcmp(name, "avx2") == 0)
    *out = Isa::kAvx2;
  else if (std::strcmp(name, "avx512") == 0)
    *out = Isa::kAvx512;
  else
    return false;
  return true;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

std::string compiled_isas() {
#if LVOPT_X86_DISPATCH
  return "baseline,avx2,avx512";
#else
  return "baseline";
#endif
}

}  // namespace cpu
}  // namespace lvopt
