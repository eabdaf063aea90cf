// The per-element math of every lvopt kernel, written once for host and device code.
//
// CPU kernels call these from loops that the compiler vectorises once per ISA level
// (csrc/cpu/isa.h); CUDA kernels call them per thread. Everything here is plain fp32
// arithmetic with no reassociation, so a given input gives the same bits on every CPU ISA
// level (the build sets -ffp-contract=off for the CPU sources).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LVOPT_HD __host__ __device__ __forceinline__
#else
#define LVOPT_HD inline __attribute__((always_inline))
#endif

namespace lvopt {

// Layout of one row of the per-tensor hyperparameter table (float64, [n_tensors, kHyperCols]).
// The table is built by lvopt/optim.py once per step; it is the only way hyperparameters reach
// a kernel, so one launch / one parallel region serves every group.
enum HyperCol : int {
  kLr = 0,
  kBeta1 = 1,
  kBeta2 = 2,
  kWeightDecay = 3,
  kEps = 4,
  kMaximize = 5,  // 1.0 or 0.0
  kHyperCols = 6,
};

// Per-tensor coefficients of one AdamW step, derived in fp64 from the table row and the
// step count, then rounded once to fp32.
struct AdamCoef {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float decay;         // 1 - lr * wd
  float step_size;     // lr / bc1
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^t): a multiply, not a divide, per element
  float eps;
  float grad_sign;     // -1 under maximize (exact: multiplication by +-1)
};

// step is the step number after the increment (t >= 1).
LVOPT_HD AdamCoef make_adam_coef(const double* row, double step) {
  const double lr = row[kLr], b1 = row[kBeta1], b2 = row[kBeta2];
  const double bc1 = 1.0 - pow(b1, step);
  const double bc2 = 1.0 - pow(b2, step);
  AdamCoef c;
  c.beta1 = static_cast<float>(b1);
  c.one_minus_beta1 = static_cast<float>(1.0 - b1);
  c.beta2 = static_cast<float>(b2);
  c.one_minus_beta2 = static_cast<float>(1.0 - b2);
  c.decay = static_cast<float>(1.0 - lr * row[kWeightDecay]);
  c.step_size = static_cast<float>(lr / bc1);
  c.inv_bc2_sqrt = static_cast<float>(1.0 / sqrt(bc2));
  c.eps = static_cast<float>(row[kEps]);
  c.grad_sign = row[kMaximize] != 0.0 ? -1.0f : 1.0f;
  return c;
}

// Moment update shared by AdamW and AdamH (torch's order: m = b1*m + (1-b1)*g,
// v = b2*v + (1-b2)*g*g).
LVOPT_HD void adam_moments(float g, float& m, float& v, const AdamCoef& c) {
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * (g * g);
}

// Adam direction times the step size, torch.optim.AdamW's step_size * m / (sqrt(v)/sqrt(bc2)
// + eps), with the division by sqrt(bc2) done as a multiplication by its fp64-rounded inverse
// (one divide and one square root per element are what bound the in-cache throughput).
LVOPT_HD float adam_update(float m, float v, const AdamCoef& c) {
  const float denom = sqrtf(v) * c.inv_bc2_sqrt + c.eps;
  return c.step_size * m / denom;
}

// One AdamW element (DESIGN.md section 2): decoupled decay, moments, update.
LVOPT_HD void adamw_element(float& p, float g, float& m, float& v, const AdamCoef& c) {
  g = c.grad_sign * g;
  p = p * c.decay;
  adam_moments(g, m, v, c);
  p = p - adam_update(m, v, c);
}

// AdamH direction u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps): adam_update with lr = 1, because
// in AdamH the learning rate enters through the norms (DESIGN.md section 2), not per element.
LVOPT_HD AdamCoef unit_lr(AdamCoef c, const double* row, double step) {
  c.step_size = static_cast<float>(1.0 / (1.0 - pow(row[kBeta1], step)));
  return c;
}

// AdamH's second pass is W <- a*W - b*u. With s = lr*R/||u||, W' = W - s*u and
// ||W'||^2 = ||W||^2 - 2 s <W,u> + s^2 ||u||^2, so one fp64 reduction of (||u||^2, <W,u>, ||W||^2)
// gives both scales: a = R/||W'||, b = a*s. A zero direction (||u|| = 0) or a zero matrix
// (||W'|| = 0, only when R = 0) leaves W as it is.
struct HyperballScales {
  double a, b;
};

LVOPT_HD HyperballScales hyperball_scales(double lr, double radius, double uu, double wu,
                                          double ww) {
  const double s = uu > 0.0 ? lr * radius / sqrt(uu) : 0.0;
  const double norm2 = ww - 2.0 * s * wu + s * s * uu;
  if (!(norm2 > 0.0)) return HyperballScales{1.0, 0.0};
  const double a = radius / sqrt(norm2);
  return HyperballScales{a, a * s};
}

// bf16 <-> fp32 with round-to-nearest-even, as c10::BFloat16 does (NaN stays a quiet NaN).
LVOPT_HD float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

LVOPT_HD uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

}  // namespace lvopt
