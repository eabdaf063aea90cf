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

// One AdamW element (docs/design.md section 2.1): decoupled decay, moments, update.
LVOPT_HD void adamw_element(float& p, float g, float& m, float& v, const AdamCoef& c) {
  g = c.grad_sign * g;
  p = p * c.decay;
  adam_moments(g, m, v, c);
  p = p - adam_update(m, v, c);
}

// AMSGrad (torch.optim.AdamW(amsgrad=True)): the update divides by the running maximum of
// the second moment, vmax = max(vmax, v) taken after v's update, instead of by v. A NaN in
// either operand propagates, as torch.maximum does.
LVOPT_HD float amsgrad_max(float vmax, float v) { return (vmax != vmax || vmax >= v) ? vmax : v; }

// One AMSGrad AdamW element: adamw_element with the running maximum in the denominator.
LVOPT_HD void adamw_amsgrad_element(float& p, float g, float& m, float& v, float& vmax,
                                    const AdamCoef& c) {
  g = c.grad_sign * g;
  p = p * c.decay;
  adam_moments(g, m, v, c);
  vmax = amsgrad_max(vmax, v);
  p = p - adam_update(m, vmax, c);
}

// AdamH direction u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps): adam_update with lr = 1, because
// in AdamH the learning rate enters through the norms (docs/design.md section 2.2), not per
// element.
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

// The scales pass 2 applies, hyperball_scales of the sums (||u||^2, <W,u>, ||W||^2) rounded
// once to fp32: what every AdamH kernel computes per tensor between its two passes.
LVOPT_HD void hyperball_scales_f32(double lr, double radius, const double* sums, float& a,
                                   float& b) {
  const HyperballScales h = hyperball_scales(lr, radius, sums[0], sums[1], sums[2]);
  a = static_cast<float>(h.a);
  b = static_cast<float>(h.b);
}

// Columns of the per-step history table of an exact-mode sparse parameter (float64,
// [steps, kHistCols], row i describes step hist_base + i; built by lvopt/sparse.py RowClock).
// Series i in 0..3 is M_i (q_i = beta1 * beta2^-(i+1)/2), series 4..7 is N_(i-3)
// (q = beta1 * beta2^(i-4)/2): the epoch-relative prefix sums
//   E_i(j) = sum_{l=b+1}^{j} f_i(l) q_i^(l-b) Pi_b/Pi_l,  b = the start of j's epoch,
// f_i(l) = (lr_l/bc1_l) bc2_l^((i+1)/2) for M_i and (lr_l/bc1_l) bc2_l^((1-n)/2) for N_n.
// Epochs are `epoch` steps long and start at hist_base + epoch*k, so that a difference of
// two E values loses at most a factor q^-epoch <= 1e6 of fp64's precision.
enum HistCol : int {
  kHLr = 0,         // lr_j
  kHDecay = 1,      // D_j = 1 - lr_j wd_j
  kHLogPi = 2,      // log Pi_j = sum_{i<=j} log D_i (only differences are used)
  kHU = 3,          // (lr_j / bc1_j) sqrt(bc2_j): w_j without its decay and rho^k factors
  kHSqrtBc2 = 4,    // sqrt(bc2_j)
  kHSeries = 5,     // 8 series columns follow
  kHistSeries = 8,
  kHistCols = 13,
};

// ---------------------------------------------------------------------------------------------
// Sparse embedding rows, exact mode (docs/design.md section 2.3.1): bringing a row current.
//
// A row last brought current at step s is caught up to step c >= s as if dense AdamW had run
// with g = 0 on steps s+1..c. With K = c - s, r = sqrt(v), e = eps/r and the per-row fp64
// scalars P = prod D_j, M_n = sum_j w_j a_j^n (n = 0..3) and N_n = sum_j w_j a_j^-n (n = 1..4)
// (lvopt/sparse.py and csrc/cpu/sparse_rows.cpp build them from per-step prefix sums):
//   p <- p*P - (m/r) * sum_j w_j/(1 + e a_j)      m <- beta1^K m      v <- beta2^K v
// The sum is the series sum_n (-e)^n M_n where e*a_max <= 1e-2 (four terms: relative error
// <= 1e-8, below fp32 rounding), the reversed series in 1/(e a_j), (m/eps) * sum_n (-x)^n
// N_(n+1) with x = r/eps, where e*a_min >= 1e2, and an exact loop over the window for the elements
// in between (CatchupRow::mid_lo/mid_hi bound them in v, so a row without such elements takes the
// vectorised path).
struct CatchupRow {
  float P;             // prod_{j=s+1}^{c} (1 - lr_j wd_j)
  float b1k, b2k;      // beta1^K, beta2^K
  float M0, M1, M2, M3;
  float N1, N2, N3, N4;
  float eps;
  // Elements with fwd_v <= v take the forward series (e*a_max <= 1e-2 <=> v >= (1e2 eps
  // a_max)^2); elements with v <= rev_v the reversed one (e*a_min >= 1e2); others the loop.
  float fwd_v, rev_v;
};

// The two series of the catch-up's update (see above): forward, from 1/r; reversed, from r.
LVOPT_HD float catchup_fwd_update(float m, float inv_r, const CatchupRow& c) {
  const float e = c.eps * inv_r;
  return (m * inv_r) * (c.M0 - e * (c.M1 - e * (c.M2 - e * c.M3)));
}

LVOPT_HD float catchup_rev_update(float m, float r, const CatchupRow& c) {
  const float inv_eps = 1.0f / c.eps;
  const float x = r * inv_eps;
  return (m * inv_eps) * (c.N1 - x * (c.N2 - x * (c.N3 - x * c.N4)));
}

LVOPT_HD void catchup_apply(float& p, float& m, float& v, float upd, const CatchupRow& c) {
  p = p * c.P - upd;
  m = m * c.b1k;
  v = v * c.b2k;
}

// The catch-up of one element; false when the element needs the exact windowed loop
// (p, m, v are then left as they were).
// One division per element: 1/r serves e = eps/r and m/r, and 1/eps (loop-invariant) serves
// x = r/eps and m/eps (2 + 2 sqrt/div per element with AdamW's own, instead of 2 + 5). Measured,
// this did not change the exact-mode step time (benchmarks/RESULTS.md): it is not divider-bound.
LVOPT_HD bool catchup_element(float& p, float& m, float& v, const CatchupRow& c) {
  const float r = sqrtf(v);
  float upd;
  if (v >= c.fwd_v) {
    upd = catchup_fwd_update(m, 1.0f / r, c);
  } else if (v <= c.rev_v) {
    upd = catchup_rev_update(m, r, c);
  } else {
    return false;
  }
  catchup_apply(p, m, v, upd, c);
  return true;
}

// Branch-free form for the vectorised path of rows that have no loop elements (every
// element satisfies v >= fwd_v or v <= rev_v, checked beforehand).
LVOPT_HD void catchup_element_fast(float& p, float& m, float& v, const CatchupRow& c) {
  const float r = sqrtf(v);
  const float fwd = catchup_fwd_update(m, 1.0f / r, c);
  const float rev = catchup_rev_update(m, r, c);
  catchup_apply(p, m, v, v >= c.fwd_v ? fwd : rev, c);
}

// The forward series alone, for rows whose every element has v >= fwd_v (the common case):
// the same bits as catchup_element_fast there, without computing the reversed series.
LVOPT_HD void catchup_element_fwd(float& p, float& m, float& v, const CatchupRow& c) {
  catchup_apply(p, m, v, catchup_fwd_update(m, 1.0f / sqrtf(v), c), c);
}

// The exact windowed catch-up of one element, in fp64, for elements whose sqrt(v) is within a
// few decades of eps: sum over the window's n steps of w_j / (1 + e a_j). term(j, w, a) gives
// the j-th step's weight and scale (Clock::term of sparse_clock.h; the CPU kernel reads them
// from arrays it filled once per row, the CUDA kernel computes them in place).
template <typename Terms>
LVOPT_HD void catchup_element_loop(float& p, float& m, float& v, const CatchupRow& c, int64_t n,
                                   const Terms& term) {
  const double r = sqrt(static_cast<double>(v));
  double sum = 0.0;
  double w, a;
  if (r > 0.0) {
    const double e = static_cast<double>(c.eps) / r;
    for (int64_t j = 0; j < n; ++j) {
      term(j, w, a);
      sum += w / (1.0 + e * a);
    }
    sum *= static_cast<double>(m) / r;
  } else {
    for (int64_t j = 0; j < n; ++j) {
      term(j, w, a);
      sum += w / a;
    }
    sum *= static_cast<double>(m) / static_cast<double>(c.eps);
  }
  p = p * c.P - static_cast<float>(sum);
  m = m * c.b1k;
  v = v * c.b2k;
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

// The value a store of x into T storage keeps: x for fp32 storage, x rounded to bf16 for bf16
// bits (the telemetry's W_after).
LVOPT_HD float stored_value(const float*, float x) { return x; }
LVOPT_HD float stored_value(const uint16_t*, float x) { return bf16_to_float(float_to_bf16(x)); }

// One element of fp32 or bf16 (uint16_t bits) storage read as fp32, and an fp32 value written
// into it: the element access of the CPU loops and of the CUDA kernels' scalar paths.
LVOPT_HD float load_elem(const float* p, int64_t i) { return p[i]; }
LVOPT_HD float load_elem(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
LVOPT_HD void store_elem(float* p, int64_t i, float x) { p[i] = x; }
LVOPT_HD void store_elem(uint16_t* p, int64_t i, float x) { p[i] = float_to_bf16(x); }

// W before and after one element's step, after as stored (stored_value): the telemetry's pair.
struct StepPair {
  float before, after;
};

// One AdamW element in memory: element i of p (storage T), g (storage G), m, v and, with kAms,
// vmax (else unused) read, stepped by adamw_element / adamw_amsgrad_element, and written back.
// The CPU's tracked span (csrc/cpu/multi_tensor.h) and the CUDA step kernel's scalar path
// (csrc/cuda/fused_adamw.cu) both run it; a caller that does not track leaves the returned
// pair unused, which costs nothing once inlined.
template <bool kAms, typename T, typename G>
LVOPT_HD StepPair adamw_element_at(T* __restrict p, const G* __restrict g, float* __restrict m,
                                   float* __restrict v, float* __restrict vmax, int64_t i,
                                   const AdamCoef& c) {
  const float w0 = load_elem(p, i);
  float pi = w0, mi = m[i], vi = v[i];
  if constexpr (kAms) {
    float xi = vmax[i];
    adamw_amsgrad_element(pi, load_elem(g, i), mi, vi, xi, c);
    vmax[i] = xi;
  } else {
    adamw_element(pi, load_elem(g, i), mi, vi, c);
  }
  m[i] = mi;
  v[i] = vi;
  store_elem(p, i, pi);
  return StepPair{w0, stored_value(p, pi)};
}

}  // namespace lvopt
