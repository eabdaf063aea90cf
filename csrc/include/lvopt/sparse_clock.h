// Exact-mode sparse rows (docs/design.md sections 2.3.1-2.3.2): the per-row catch-up scalars,
// computed from the per-step history of lvopt/sparse.py's RowClock, written once for host and
// device code. The CPU kernel (csrc/cpu/sparse_rows.cpp) calls Clock::row per behind row on a CPU
// thread; the CUDA kernel (csrc/cuda/sparse_rows.cu) calls it from one thread of the row's block,
// on the device copy of the same tables. The per-element use of the scalars is math.h's
// catchup_element / catchup_element_loop.
#pragma once

#include <cmath>
#include <cstdint>

#include "lvopt/math.h"

namespace lvopt {

// The series serve where e*a_max <= 1/kSeriesLimit (forward) or e*a_min >= kSeriesLimit
// (reversed): four terms leave a relative error <= kSeriesLimit^-4 = 1e-8 of the catch-up's
// update, below fp32 rounding. Elements in between (|g| of order 1e-5 relative to eps/1e-8
// for unit-scale gradients: ~2e-5 of them) take the exact loop.
constexpr double kSeriesLimit = 1e2;

struct Clock {
  const double* hist;  // [rows, kHistCols]
  int64_t hist_rows;
  int64_t base;        // step of hist row 0; epochs start at base + epoch*k
  int64_t epoch;
  int64_t window;
  const double* qpow;  // [kHistSeries, qcols], qpow[i][k + epoch] = q_i^k, k in [-epoch, window]
  int64_t qcols;
  double beta1, beta2;
  float eps;
  // 0: hist row i is step base + i (lvopt/sparse.py RowClock). > 0: hist is a ring of `ring`
  // rows on the device, step j in row (j - base) % ring, appended by the CUDA and Triton step
  // ops themselves (RingClock, the capturable exact mode); the CPU kernels never get one.
  int64_t ring = 0;

  LVOPT_HD const double* at(int64_t step) const {
    const int64_t i = step - base;
    return hist + (ring > 0 ? i % ring : i) * kHistCols;
  }

  // The last step of the window that a catch-up from s to c sums over.
  LVOPT_HD int64_t window_end(int64_t s, int64_t c) const {
    return c < s + window ? c : s + window;
  }

  // Scalars that bring a row current from step s to step c (c > s).
  LVOPT_HD CatchupRow row(int64_t s, int64_t c) const {
    CatchupRow cr;
    const double log_pi_c = at(c)[kHLogPi];
    const int64_t k_all = c - s;
    cr.P = static_cast<float>(exp(log_pi_c - at(s)[kHLogPi]));
    cr.b1k = static_cast<float>(pow(beta1, static_cast<double>(k_all)));
    cr.b2k = static_cast<float>(pow(beta2, static_cast<double>(k_all)));
    cr.eps = eps;
    double S[kHistSeries] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t yend = window_end(s, c);
    if (yend > s) {
      int64_t b = base + epoch * ((s - base) / epoch);
      int64_t x = s;
      while (x < yend) {
        const int64_t ye = b + epoch < yend ? b + epoch : yend;
        const double scale = exp(log_pi_c - at(b)[kHLogPi]);
        const double* hy = at(ye) + kHSeries;
        const double* hx = at(x) + kHSeries;
        const bool inside = x > b;
        for (int i = 0; i < kHistSeries; ++i) {
          const double q = qpow[i * qcols + (b - s) + epoch];
          S[i] += scale * q * (hy[i] - (inside ? hx[i] : 0.0));
        }
        x = ye;
        b += epoch;
      }
      const double a_min = at(s + 1)[kHSqrtBc2] / sqrt(beta2);
      const double a_max = at(yend)[kHSqrtBc2] * pow(beta2, -0.5 * static_cast<double>(yend - s));
      const double fwd = kSeriesLimit * static_cast<double>(eps) * a_max;
      const double rev = static_cast<double>(eps) * a_min / kSeriesLimit;
      cr.fwd_v = static_cast<float>(fwd * fwd);
      cr.rev_v = static_cast<float>(rev * rev);
    } else {
      // beta1 = 0 (window 0): the skipped steps move nothing but the decay.
      cr.fwd_v = INFINITY;
      cr.rev_v = INFINITY;
    }
    cr.M0 = static_cast<float>(S[0]);
    cr.M1 = static_cast<float>(S[1]);
    cr.M2 = static_cast<float>(S[2]);
    cr.M3 = static_cast<float>(S[3]);
    cr.N1 = static_cast<float>(S[4]);
    cr.N2 = static_cast<float>(S[5]);
    cr.N3 = static_cast<float>(S[6]);
    cr.N4 = static_cast<float>(S[7]);
    return cr;
  }

  // The weight w_j and the scale a_j of step j (s < j <= window_end(s, c)) in the exact loop
  // of catchup_element_loop: p <- p*P - (m/r) * sum_j w_j / (1 + (eps/r) a_j).
  LVOPT_HD void term(int64_t s, int64_t c, int64_t j, double& w, double& a) const {
    const double* h = at(j);
    const double q0 = qpow[(j - s) + epoch];
    w = exp(at(c)[kHLogPi] - h[kHLogPi]) * h[kHU] * q0;
    // beta2^(-k/2) = q_1^k / q_0^k (q_0 = rho = beta1/sqrt(beta2), q_1 = beta1/beta2).
    a = h[kHSqrtBc2] * qpow[qcols + (j - s) + epoch] / q0;
  }
};

}  // namespace lvopt
