#include "isa.h"

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
  if (std::strcmp(env, "baseline") == 0) want = Isa::kBaseline;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  // An unknown value or a level above the hardware's gives the hardware level:
  // lvopt.build_info() reports the level actually used, and importing lvopt warns
  // (lvopt/_ops.py, check_cpu_isa_env).
  return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
}

Isa active_isa() {
  static const Isa isa = resolve_isa();
  return isa;
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
