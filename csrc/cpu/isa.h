// Run-time choice of the CPU vector ISA, so one wheel runs on any x86-64 machine.
//
// Each hot loop is compiled three times in the same translation unit: for baseline x86-64
// (SSE2), for AVX2 and for AVX-512, through GCC/Clang `target` attributes on thin wrappers
// around one always-inline loop. The loop body is the shared per-element math of
// csrc/include/lvopt/math.h. With -ffp-contract=off every level computes the same bits.
#pragma once

#include <cstdint>
#include <string>

namespace lvopt {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level this CPU supports, capped by the LVOPT_CPU_ISA environment variable
// ("baseline", "avx2", "avx512") when it is set; read once per process.
Isa active_isa();
// The best level this CPU supports, ignoring the environment.
Isa hardware_isa();
const char* isa_name(Isa isa);
// Levels compiled into this build (all three on x86-64, only baseline elsewhere).
std::string compiled_isas();

}  // namespace cpu
}  // namespace lvopt

#define LVOPT_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LVOPT_X86_DISPATCH 1
#define LVOPT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)
#define LVOPT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define LVOPT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
#endif
#else
#define LVOPT_X86_DISPATCH 0
#endif

// Defines NAME(args) that runs BODY_FN(args) compiled for the active ISA. BODY_FN must be an
// LVOPT_ALWAYS_INLINE function (or template instance) so that it is compiled inside each
// target-specific wrapper.
#if LVOPT_X86_DISPATCH
#define LVOPT_ISA_DISPATCH(NAME, SIGNATURE, ARGS, BODY_FN)                              \
  static void NAME##_baseline SIGNATURE { BODY_FN ARGS; }                              \
  LVOPT_TARGET_AVX2 static void NAME##_avx2 SIGNATURE { BODY_FN ARGS; }                \
  LVOPT_TARGET_AVX512 static void NAME##_avx512 SIGNATURE { BODY_FN ARGS; }            \
  static void NAME SIGNATURE {                                                         \
    switch (::lvopt::cpu::active_isa()) {                                              \
      case ::lvopt::cpu::Isa::kAvx512: NAME##_avx512 ARGS; return;                     \
      case ::lvopt::cpu::Isa::kAvx2: NAME##_avx2 ARGS; return;                         \
      default: NAME##_baseline ARGS; return;                                           \
    }                                                                                  \
  }
#else
#define LVOPT_ISA_DISPATCH(NAME, SIGNATURE, ARGS, BODY_FN) \
  static void NAME SIGNATURE { BODY_FN ARGS; }
#endif
