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

// The level the kernels run at: the best this CPU supports, capped by the LVOPT_CPU_ISA
// environment variable ("baseline", "avx2", "avx512") when it is set (read at the first
// call), or the last set_active_isa.
Isa active_isa();
// Runs the kernels at `want` from now on, capped at the hardware's level; returns the level
// set. All levels give the same bits, so this only changes speed (the bench's --isa all).
Isa set_active_isa(Isa want);
// "baseline", "avx2", "avx512" -> *out; false for any other name.
bool parse_isa(const char* name, Isa* out);
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

// Defines NAME(args) that runs a body compiled for the active ISA: BODY_NO_FMA(args) at baseline,
// BODY_FMA(args) at AVX2 and AVX-512 (which have fused multiply-add; at baseline std::fma would be
// a libm call). The bodies must be LVOPT_ALWAYS_INLINE functions (or template instances) so that
// they are compiled inside each target-specific wrapper. LVOPT_ISA_DISPATCH passes one body for
// all levels; a body template taking <..., kFma> uses it only for sums whose products are exact
// (see add_exact_product), where a fused multiply-add gives the bits of a multiply then an add,
// so the levels still agree bit for bit.
#if LVOPT_X86_DISPATCH
#define LVOPT_ISA_DISPATCH_FMA(NAME, SIGNATURE, ARGS, BODY_NO_FMA, BODY_FMA) \
  static void NAME##_baseline SIGNATURE { BODY_NO_FMA ARGS; }                \
  LVOPT_TARGET_AVX2 static void NAME##_avx2 SIGNATURE { BODY_FMA ARGS; }     \
  LVOPT_TARGET_AVX512 static void NAME##_avx512 SIGNATURE { BODY_FMA ARGS; } \
  static void NAME SIGNATURE {                                               \
    switch (::lvopt::cpu::active_isa()) {                                    \
      case ::lvopt::cpu::Isa::kAvx512: NAME##_avx512 ARGS; return;           \
      case ::lvopt::cpu::Isa::kAvx2: NAME##_avx2 ARGS; return;               \
      default: NAME##_baseline ARGS; return;                                 \
    }                                                                        \
  }
#else
#define LVOPT_ISA_DISPATCH_FMA(NAME, SIGNATURE, ARGS, BODY_NO_FMA, BODY_FMA) \
  static void NAME SIGNATURE { BODY_NO_FMA ARGS; }
#endif
#define LVOPT_ISA_DISPATCH(NAME, SIGNATURE, ARGS, BODY_FN) \
  LVOPT_ISA_DISPATCH_FMA(NAME, SIGNATURE, ARGS, BODY_FN, BODY_FN)

namespace lvopt {
namespace cpu {
// acc + a * b where a * b is exact in fp64 (a and b widened from fp32: 24 + 24 significand bits
// fit in 53): with kFma one fused multiply-add, which rounds once like the add alone, so both
// forms give the same bits; the fused form is one instruction instead of two.
template <bool kFma>
LVOPT_ALWAYS_INLINE double add_exact_product(double acc, double a, double b) {
  if constexpr (kFma) {
    return __builtin_fma(a, b, acc);
  } else {
    return acc + a * b;
  }
}
}  // namespace cpu
}  // namespace lvopt
