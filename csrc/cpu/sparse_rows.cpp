// Sparse embedding rows on the CPU (DESIGN.md section 2): deterministic coalescing of a
// row-sparse gradient and the fused lazy / exact AdamW row update.
//
// A step moves 28 B per element of each distinct touched row (p, m, v read and written, the
// summed gradient read) plus the gradient rows as given: O(U*d), never O(V*d).
//
// Determinism: indices are sorted by a stable LSD radix sort (duplicates keep their input
// order), each distinct row sums its gradient rows in that order in fp32, and rows are
// independent work items, so the bits depend neither on the thread count nor on the ISA.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "multi_tensor.h"
#include "ops.h"

namespace lvopt {
namespace cpu {
namespace {

// The distinct rows of an index list, sorted, with the input positions of each row's
// duplicates in input order: positions perm[offsets[u] .. offsets[u+1]) belong to rows[u].
struct RowPlan {
  std::vector<int64_t> rows;
  std::vector<int64_t> offsets;
  std::vector<int64_t> perm;
};

RowPlan plan_rows(const char* op, const at::Tensor& indices, int64_t num_rows) {
  TORCH_CHECK(indices.defined() && indices.device().is_cpu() && indices.scalar_type() == at::kLong &&
                  indices.dim() == 1,
              op, ": indices must be a 1-D int64 CPU tensor, got ", indices.scalar_type(), " ",
              indices.sizes());
  const at::Tensor idx = indices.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ip[i] >= 0, op, ": negative index ", ip[i], " at position ", i);
    TORCH_CHECK(ip[i] < num_rows, op, ": index ", ip[i], " at position ", i,
                " is out of range for a table of ", num_rows, " rows");
  }
  RowPlan plan;
  plan.perm.resize(static_cast<size_t>(n));
  std::iota(plan.perm.begin(), plan.perm.end(), int64_t{0});
  // LSD radix sort on the bits that num_rows needs, 11 bits a pass: 2 passes for 262,144 rows.
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t{1} << kBits;
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < num_rows) ++bits;
  std::vector<int64_t> tmp(static_cast<size_t>(n));
  std::vector<int64_t> count(kBuckets + 1);
  for (int shift = 0; shift < bits; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[((ip[plan.perm[i]] >> shift) & (kBuckets - 1)) + 1];
    for (int64_t b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = plan.perm[i];
      tmp[count[(ip[pos] >> shift) & (kBuckets - 1)]++] = pos;
    }
    plan.perm.swap(tmp);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = ip[plan.perm[i]];
    if (plan.rows.empty() || plan.rows.back() != r) {
      plan.rows.push_back(r);
      plan.offsets.push_back(i);
    }
  }
  plan.offsets.push_back(n);
  return plan;
}

// ----- per-element loops (compiled once per ISA level, csrc/cpu/isa.h) ------------------------

template <typename T>
LVOPT_ALWAYS_INLINE void grad_add(float* __restrict dst, const T* __restrict src, int64_t n,
                                  bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) dst[i] = load_elem(src, i);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = dst[i] + load_elem(src, i);
  }
}

template <typename T>
LVOPT_ALWAYS_INLINE void catchup_adamw_row(T* __restrict p, const float* __restrict g,
                                           float* __restrict m, float* __restrict v, int64_t n,
                                           const CatchupRow& cr, const AdamCoef& c) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = load_elem(p, i);
    float mi = m[i], vi = v[i];
    catchup_element_fast(pi, mi, vi, cr);
    adamw_element(pi, g[i], mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    store_elem(p, i, pi);
  }
}

template <typename T>
LVOPT_ALWAYS_INLINE void catchup_row(T* __restrict p, float* __restrict m, float* __restrict v,
                                     int64_t n, const CatchupRow& cr) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = load_elem(p, i);
    float mi = m[i], vi = v[i];
    catchup_element_fast(pi, mi, vi, cr);
    m[i] = mi;
    v[i] = vi;
    store_elem(p, i, pi);
  }
}

// Number of elements whose sqrt(v) is too close to eps for either series.
LVOPT_ALWAYS_INLINE void count_mid(const float* __restrict v, int64_t n, float fwd_v, float rev_v,
                                   int64_t* out) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) k += !(v[i] >= fwd_v) & !(v[i] <= rev_v);
  *out = k;
}

LVOPT_ISA_DISPATCH(grad_add_f32, (float* d, const float* s, int64_t n, bool f), (d, s, n, f),
                   grad_add<float>)
LVOPT_ISA_DISPATCH(grad_add_bf16, (float* d, const uint16_t* s, int64_t n, bool f), (d, s, n, f),
                   grad_add<uint16_t>)
LVOPT_ISA_DISPATCH(adamw_row_f32,
                   (float* p, const float* g, float* m, float* v, int64_t n, const AdamCoef& c),
                   (p, g, m, v, n, c), (adamw_span<float, float>))
LVOPT_ISA_DISPATCH(adamw_row_bf16,
                   (uint16_t* p, const float* g, float* m, float* v, int64_t n, const AdamCoef& c),
                   (p, g, m, v, n, c), (adamw_span<uint16_t, float>))
LVOPT_ISA_DISPATCH(catchup_adamw_row_f32,
                   (float* p, const float* g, float* m, float* v, int64_t n, const CatchupRow& cr,
                    const AdamCoef& c),
                   (p, g, m, v, n, cr, c), catchup_adamw_row<float>)
LVOPT_ISA_DISPATCH(catchup_adamw_row_bf16,
                   (uint16_t* p, const float* g, float* m, float* v, int64_t n,
                    const CatchupRow& cr, const AdamCoef& c),
                   (p, g, m, v, n, cr, c), catchup_adamw_row<uint16_t>)
LVOPT_ISA_DISPATCH(catchup_row_f32, (float* p, float* m, float* v, int64_t n, const CatchupRow& cr),
                   (p, m, v, n, cr), catchup_row<float>)
LVOPT_ISA_DISPATCH(catchup_row_bf16,
                   (uint16_t* p, float* m, float* v, int64_t n, const CatchupRow& cr),
                   (p, m, v, n, cr), catchup_row<uint16_t>)
LVOPT_ISA_DISPATCH(count_mid_any,
                   (const float* v, int64_t n, float fwd_v, float rev_v, int64_t* out),
                   (v, n, fwd_v, rev_v, out), count_mid)

template <typename T>
LVOPT_ALWAYS_INLINE void dispatch_grad_add(float* d, const T* s, int64_t n, bool f) {
  if constexpr (std::is_same_v<T, float>) grad_add_f32(d, s, n, f);
  else grad_add_bf16(d, s, n, f);
}

// ----- exact-mode clock: per-row catch-up scalars from the per-step history ------------------

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

  const double* at(int64_t step) const { return hist + (step - base) * kHistCols; }

  // Scalars that bring a row current from step s to step c (c > s). When w/a are given, the
  // window's per-step weights are written there (for the elements that need the loop).
  CatchupRow row(int64_t s, int64_t c, std::vector<double>* w = nullptr,
                 std::vector<double>* a = nullptr) const {
    CatchupRow cr;
    const double log_pi_c = at(c)[kHLogPi];
    const int64_t k_all = c - s;
    cr.P = static_cast<float>(std::exp(log_pi_c - at(s)[kHLogPi]));
    cr.b1k = static_cast<float>(std::pow(beta1, static_cast<double>(k_all)));
    cr.b2k = static_cast<float>(std::pow(beta2, static_cast<double>(k_all)));
    cr.eps = eps;
    double S[kHistSeries] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t yend = std::min(c, s + window);
    if (yend > s) {
      int64_t b = base + epoch * ((s - base) / epoch);
      int64_t x = s;
      while (x < yend) {
        const int64_t ye = std::min(b + epoch, yend);
        const double scale = std::exp(log_pi_c - at(b)[kHLogPi]);
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
      const double a_min = at(s + 1)[kHSqrtBc2] / std::sqrt(beta2);
      const double a_max = at(yend)[kHSqrtBc2] * std::pow(beta2, -0.5 * static_cast<double>(yend - s));
      const double fwd = kSeriesLimit * static_cast<double>(eps) * a_max;
      const double rev = static_cast<double>(eps) * a_min / kSeriesLimit;
      cr.fwd_v = static_cast<float>(fwd * fwd);
      cr.rev_v = static_cast<float>(rev * rev);
      if (w != nullptr) {
        w->clear();
        a->clear();
        for (int64_t j = s + 1; j <= yend; ++j) {
          const double* h = at(j);
          w->push_back(std::exp(log_pi_c - h[kHLogPi]) * h[kHU] * qpow[(j - s) + epoch]);
          // beta2^(-k/2) = q_1^k / q_0^k (q_0 = rho = beta1/sqrt(beta2), q_1 = beta1/beta2).
          a->push_back(h[kHSqrtBc2] * qpow[qcols + (j - s) + epoch] / qpow[(j - s) + epoch]);
        }
      }
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
};

// The catch-up of a row with (rare) loop elements: the elements' inputs are saved, the whole
// row takes the vectorised pass, then those elements are recomputed with the exact loop (and
// the AdamW step when c is given).
template <typename T>
void catchup_row_with_loop(T* p, const float* g, float* m, float* v, int64_t n, const CatchupRow& cr,
                           const Clock& ck, int64_t s, int64_t target, const AdamCoef* c) {
  struct Saved {
    int64_t i;
    float p, m, v;
  };
  std::vector<Saved> saved;
  for (int64_t i = 0; i < n; ++i) {
    if (!(v[i] >= cr.fwd_v) && !(v[i] <= cr.rev_v)) saved.push_back({i, load_elem(p, i), m[i], v[i]});
  }
  if constexpr (std::is_same_v<T, float>) {
    if (c != nullptr) catchup_adamw_row_f32(p, g, m, v, n, cr, *c);
    else catchup_row_f32(p, m, v, n, cr);
  } else {
    if (c != nullptr) catchup_adamw_row_bf16(p, g, m, v, n, cr, *c);
    else catchup_row_bf16(p, m, v, n, cr);
  }
  std::vector<double> w, a;
  ck.row(s, target, &w, &a);
  for (const Saved& e : saved) {
    float pi = e.p, mi = e.m, vi = e.v;
    catchup_element_loop(pi, mi, vi, cr, w.data(), a.data(), static_cast<int64_t>(w.size()));
    if (c != nullptr) adamw_element(pi, g[e.i], mi, vi, *c);
    m[e.i] = mi;
    v[e.i] = vi;
    store_elem(p, e.i, pi);
  }
}

// ----- argument checks (all before any write) -------------------------------------------------

void check_table(const char* op, const at::Tensor& param, const at::Tensor& exp_avg,
                 const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& hyper) {
  TORCH_CHECK(param.defined() && param.device().is_cpu(), op, ": param must be a CPU tensor");
  TORCH_CHECK(param.dim() == 2, op, ": param must be 2-D (rows x width), got shape ", param.sizes());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16, op,
              ": param has dtype ", param.scalar_type(), "; supported: float32, bfloat16");
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous (row-major)");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"exp_avg", exp_avg},
                                {"exp_avg_sq", exp_avg_sq}}) {
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
                    t.sizes() == param.sizes() && t.is_contiguous(),
                op, ": ", name, " must be a contiguous float32 CPU tensor of the param's shape ",
                param.sizes(), ", got ", t.scalar_type(), " ", t.sizes());
  }
  TORCH_CHECK(step.defined() && step.device().is_cpu() && step.numel() == 1 &&
                  (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
              op, ": step must be a one-element float32/float64 CPU tensor");
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.size(0) == 1 && hyper.size(1) == kHyperCols && hyper.is_contiguous(),
              op, ": hyper must be a contiguous CPU float64 tensor of shape [1, ",
              static_cast<int>(kHyperCols), "], got ", hyper.scalar_type(), " ", hyper.sizes());
  const double* row = hyper.data_ptr<double>();
  TORCH_CHECK(std::isfinite(row[kLr]) && row[kLr] >= 0.0, op, ": lr must be finite and >= 0, got ",
              row[kLr]);
  TORCH_CHECK(row[kBeta1] >= 0.0 && row[kBeta1] < 1.0, op, ": beta1 must be in [0, 1), got ",
              row[kBeta1]);
  TORCH_CHECK(row[kBeta2] >= 0.0 && row[kBeta2] < 1.0, op, ": beta2 must be in [0, 1), got ",
              row[kBeta2]);
  TORCH_CHECK(std::isfinite(row[kEps]) && row[kEps] > 0.0, op, ": eps must be finite and > 0, got ",
              row[kEps]);
  TORCH_CHECK(std::isfinite(row[kWeightDecay]), op, ": weight_decay must be finite, got ",
              row[kWeightDecay]);
}

double read_step(const at::Tensor& step) {
  return step.scalar_type() == at::kFloat ? static_cast<double>(*step.data_ptr<float>())
                                          : *step.data_ptr<double>();
}

void write_step(const at::Tensor& step, double value) {
  if (step.scalar_type() == at::kFloat) *step.data_ptr<float>() = static_cast<float>(value);
  else *step.data_ptr<double>() = value;
}

Clock check_clock(const char* op, const at::Tensor& param, const at::Tensor& last_step,
                  const at::Tensor& hist, const at::Tensor& qpow, const at::Tensor& hyper,
                  int64_t hist_base, int64_t epoch, int64_t window) {
  TORCH_CHECK(last_step.defined() && last_step.device().is_cpu() &&
                  last_step.scalar_type() == at::kLong && last_step.dim() == 1 &&
                  last_step.size(0) == param.size(0) && last_step.is_contiguous(),
              op, ": last_step must be a contiguous int64 CPU tensor of shape [", param.size(0),
              "], got ", last_step.scalar_type(), " ", last_step.sizes());
  TORCH_CHECK(hist.defined() && hist.device().is_cpu() && hist.scalar_type() == at::kDouble &&
                  hist.dim() == 2 && hist.size(1) == kHistCols && hist.size(0) >= 1 &&
                  hist.is_contiguous(),
              op, ": hist must be a contiguous float64 CPU tensor of shape [steps, ",
              static_cast<int>(kHistCols), "], got ", hist.scalar_type(), " ", hist.sizes());
  TORCH_CHECK(epoch >= 1 && window >= 0 && hist_base >= 0, op,
              ": need epoch >= 1, window >= 0, hist_base >= 0; got ", epoch, ", ", window, ", ",
              hist_base);
  const int64_t qcols = epoch + std::max(window, epoch) + 1;
  TORCH_CHECK(qpow.defined() && qpow.device().is_cpu() && qpow.scalar_type() == at::kDouble &&
                  qpow.dim() == 2 && qpow.size(0) == kHistSeries && qpow.size(1) == qcols &&
                  qpow.is_contiguous(),
              op, ": qpow must be a contiguous float64 CPU tensor of shape [",
              static_cast<int>(kHistSeries), ", ", qcols, "], got ", qpow.sizes());
  const double* row = hyper.data_ptr<double>();
  TORCH_CHECK(row[kBeta2] > 0.0, op, ": exact mode needs beta2 > 0");
  return Clock{hist.data_ptr<double>(), hist.size(0), hist_base, epoch, window,
               qpow.data_ptr<double>(), qcols, row[kBeta1], row[kBeta2],
               static_cast<float>(row[kEps])};
}

// Every row of the plan must have a last_step in [hist_base, target] and the history must
// cover the target step.
void check_rows_clock(const char* op, const RowPlan& plan, const int64_t* last, const Clock& ck,
                      int64_t target) {
  TORCH_CHECK(target >= ck.base && target - ck.base < ck.hist_rows, op, ": hist covers steps ",
              ck.base, "..", ck.base + ck.hist_rows - 1, " but step ", target, " is needed");
  for (int64_t r : plan.rows) {
    TORCH_CHECK(last[r] >= ck.base && last[r] <= target, op, ": row ", r, " has last_step ",
                last[r], ", outside [", ck.base, ", ", target, "] (stale clock state?)");
  }
}

// Runs fn(k) for every distinct row k of the plan, in parallel, with each thread's share of the
// rows balanced by the rows' memory traffic rather than their count: a row costs one read of
// each of its gradient rows plus p, m, v read and written. Plans are sorted by row id, and with
// Zipf-distributed tokens the frequent (low-id) rows hold most of a batch's gradient rows, so
// an even split by count would give one thread most of the work. The split depends only on
// the plan, and each row is computed by one thread, so the bits do not depend on the split.
template <typename Fn>
void for_each_row_balanced(const RowPlan& plan, bool with_grad, const Fn& fn) {
  const int64_t u = static_cast<int64_t>(plan.rows.size());
  if (u == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::min<int64_t>(u, 32 * threads);
  constexpr int64_t kRowTraffic = 6;  // p, m, v read and written, in units of one row
  const int64_t total = (with_grad ? plan.offsets[u] : 0) + kRowTraffic * u;
  std::vector<int64_t> splits(static_cast<size_t>(parts) + 1, u);
  splits[0] = 0;
  int64_t part = 1, acc = 0;
  for (int64_t k = 0; k < u && part < parts; ++k) {
    acc += (with_grad ? plan.offsets[k + 1] - plan.offsets[k] : 0) + kRowTraffic;
    while (part < parts && acc * parts >= total * part) splits[part++] = k + 1;
  }
  // Parts are handed out dynamically: rows are sorted by id, and with Zipf ids the rare rows
  // (high ids, the ones exact mode must catch up) cost more than their traffic says, so a
  // static split gave one thread the catch-up work while the other waited.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      for (int64_t q = next.fetch_add(1, std::memory_order_relaxed); q < parts;
           q = next.fetch_add(1, std::memory_order_relaxed)) {
        for (int64_t k = splits[q]; k < splits[q + 1]; ++k) fn(k);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> coalesce_rows(const at::Tensor& indices, const at::Tensor& values,
                                                 int64_t num_rows) {
  const char* op = "lvopt::coalesce_rows";
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(values.defined() && values.device().is_cpu() && values.dim() == 2 &&
                  values.size(0) == indices.numel() &&
                  (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              op, ": values must be a float32/bfloat16 CPU tensor of shape [", indices.numel(),
              ", width], got ", values.scalar_type(), " ", values.sizes());
  const RowPlan plan = plan_rows(op, indices, num_rows);
  const at::Tensor vals = values.contiguous();
  const int64_t u = static_cast<int64_t>(plan.rows.size());
  const int64_t d = vals.size(1);
  at::Tensor rows = at::empty({u}, indices.options().dtype(at::kLong));
  std::copy(plan.rows.begin(), plan.rows.end(), rows.data_ptr<int64_t>());
  at::Tensor out = at::empty({u, d}, vals.options());
  dispatch_param_dtype(vals.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* src = reinterpret_cast<const T*>(vals.data_ptr());
    T* dst = reinterpret_cast<T*>(out.data_ptr());
    for_each_row_balanced(plan, true, [&](int64_t k) {
      thread_local std::vector<float> acc;
      acc.resize(static_cast<size_t>(d));
      for (int64_t i = plan.offsets[k]; i < plan.offsets[k + 1]; ++i) {
        dispatch_grad_add(acc.data(), src + plan.perm[i] * d, d, i == plan.offsets[k]);
      }
      for (int64_t j = 0; j < d; ++j) store_elem(dst + k * d, j, acc[j]);
    });
  });
  return {rows, out};
}

namespace {

// Telemetry of one row: out[0] = sum of W_before^2, out[1] = sum of (W_after - W_before)^2,
// in kTrackLanes fp64 lanes (the same bits for every ISA, as for the dense step).
template <typename T>
void row_sums(const float* before, const T* after, int64_t d, double* out) {
  double ww[kTrackLanes] = {}, dd[kTrackLanes] = {};
  for (int64_t j = 0; j < d; ++j) {
    const double w0 = before[j];
    const double dw = static_cast<double>(load_elem(after, j)) - w0;
    ww[j % kTrackLanes] += w0 * w0;
    dd[j % kTrackLanes] += dw * dw;
  }
  out[0] = out[1] = 0.0;
  for (int l = 0; l < kTrackLanes; ++l) {
    out[0] += ww[l];
    out[1] += dd[l];
  }
}

}  // namespace

void sparse_adamw_(const at::Tensor& param, const at::Tensor& indices, const at::Tensor& values,
                   const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                   const at::Tensor& last_step, const at::Tensor& hist, const at::Tensor& qpow,
                   const at::Tensor& hyper, int64_t hist_base, int64_t epoch, int64_t window,
                   bool exact, const std::optional<at::Tensor>& stats) {
  const char* op = "lvopt::sparse_adamw_";
  check_table(op, param, exp_avg, exp_avg_sq, step, hyper);
  TORCH_CHECK(values.defined() && values.device().is_cpu() && values.dim() == 2 &&
                  values.size(0) == indices.numel() && values.size(1) == param.size(1),
              op, ": values must have shape [", indices.numel(), ", ", param.size(1), "], got ",
              values.sizes());
  TORCH_CHECK(values.scalar_type() == param.scalar_type(), op, ": values have dtype ",
              values.scalar_type(), " but param has ", param.scalar_type());
  const RowPlan plan = plan_rows(op, indices, param.size(0));
  const double t = read_step(step) + 1.0;
  Clock ck{};
  int64_t* last = nullptr;
  if (exact) {
    ck = check_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
    last = last_step.data_ptr<int64_t>();
    check_rows_clock(op, plan, last, ck, static_cast<int64_t>(t) - 1);
  }
  double* st = nullptr;
  if (stats.has_value()) {
    const at::Tensor& s = *stats;
    TORCH_CHECK(s.defined() && s.device().is_cpu() && s.scalar_type() == at::kDouble &&
                    s.numel() == 2 && s.is_contiguous(),
                op, ": stats must be a contiguous two-element float64 CPU tensor, got ",
                s.scalar_type(), " ", s.sizes(), " on ", s.device());
    st = s.data_ptr<double>();
  }
  // Every check has passed: from here on, writes.
  write_step(step, t);
  const AdamCoef coef = make_adam_coef(hyper.data_ptr<double>(), t);
  const at::Tensor vals = values.contiguous();
  const int64_t u = static_cast<int64_t>(plan.rows.size());
  const int64_t d = param.size(1);
  const int64_t ti = static_cast<int64_t>(t);
  float* m_all = exp_avg.data_ptr<float>();
  float* v_all = exp_avg_sq.data_ptr<float>();
  // Telemetry (stats): per-row fp64 sums of W^2 and (dW)^2, added in row order below.
  std::vector<double> row_stats(st != nullptr ? 2 * static_cast<size_t>(u) : 0);
  dispatch_param_dtype(param.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* src = reinterpret_cast<const T*>(vals.data_ptr());
    T* p_all = reinterpret_cast<T*>(param.data_ptr());
    for_each_row_balanced(plan, true, [&](int64_t k) {
      thread_local std::vector<float> gbuf;
      gbuf.resize(static_cast<size_t>(d));
      const int64_t r = plan.rows[k];
      const float* g = gbuf.data();
      if constexpr (std::is_same_v<T, float>) {
        // A row given once (most rows of a Zipf batch) is read where it lies.
        if (plan.offsets[k + 1] - plan.offsets[k] == 1) g = src + plan.perm[plan.offsets[k]] * d;
      }
      if (g == gbuf.data()) {
        for (int64_t i = plan.offsets[k]; i < plan.offsets[k + 1]; ++i) {
          dispatch_grad_add(gbuf.data(), src + plan.perm[i] * d, d, i == plan.offsets[k]);
        }
      }
      {
        T* p = p_all + r * d;
        float* m = m_all + r * d;
        float* v = v_all + r * d;
        thread_local std::vector<float> before;
        if (st != nullptr) {
          // The row is about to be read by the update: this copy costs cache traffic only.
          before.resize(static_cast<size_t>(d));
          for (int64_t j = 0; j < d; ++j) before[j] = load_elem(p, j);
        }
        const bool behind = exact && last[r] < ti - 1;
        if (!behind) {
          if constexpr (std::is_same_v<T, float>) adamw_row_f32(p, g, m, v, d, coef);
          else adamw_row_bf16(p, g, m, v, d, coef);
        } else {
          const CatchupRow cr = ck.row(last[r], ti - 1);
          int64_t mid = 0;
          count_mid_any(v, d, cr.fwd_v, cr.rev_v, &mid);
          if (mid == 0) {
            if constexpr (std::is_same_v<T, float>) catchup_adamw_row_f32(p, g, m, v, d, cr, coef);
            else catchup_adamw_row_bf16(p, g, m, v, d, cr, coef);
          } else {
            catchup_row_with_loop(p, g, m, v, d, cr, ck, last[r], ti - 1, &coef);
          }
        }
        if (exact) last[r] = ti;
        if (st != nullptr) row_sums(before.data(), p, d, &row_stats[2 * k]);
      }
    });
  });
  if (st != nullptr) {
    st[0] = st[1] = 0.0;
    for (int64_t k = 0; k < u; ++k) {
      st[0] += row_stats[2 * k];
      st[1] += row_stats[2 * k + 1];
    }
  }
}

void sparse_catchup_(const at::Tensor& param, const at::Tensor& indices, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& step,
                     const at::Tensor& last_step, const at::Tensor& hist, const at::Tensor& qpow,
                     const at::Tensor& hyper, int64_t hist_base, int64_t epoch, int64_t window) {
  const char* op = "lvopt::sparse_catchup_";
  check_table(op, param, exp_avg, exp_avg_sq, step, hyper);
  const RowPlan plan = plan_rows(op, indices, param.size(0));
  const Clock ck = check_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
  int64_t* last = last_step.data_ptr<int64_t>();
  const int64_t c = static_cast<int64_t>(read_step(step));
  check_rows_clock(op, plan, last, ck, c);
  const int64_t u = static_cast<int64_t>(plan.rows.size());
  const int64_t d = param.size(1);
  float* m_all = exp_avg.data_ptr<float>();
  float* v_all = exp_avg_sq.data_ptr<float>();
  dispatch_param_dtype(param.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* p_all = reinterpret_cast<T*>(param.data_ptr());
    for_each_row_balanced(plan, false, [&](int64_t k) {
      {
        const int64_t r = plan.rows[k];
        if (last[r] >= c) return;
        T* p = p_all + r * d;
        float* m = m_all + r * d;
        float* v = v_all + r * d;
        const CatchupRow cr = ck.row(last[r], c);
        int64_t mid = 0;
        count_mid_any(v, d, cr.fwd_v, cr.rev_v, &mid);
        if (mid == 0) {
          if constexpr (std::is_same_v<T, float>) catchup_row_f32(p, m, v, d, cr);
          else catchup_row_bf16(p, m, v, d, cr);
        } else {
          catchup_row_with_loop(p, static_cast<const float*>(nullptr), m, v, d, cr, ck, last[r], c,
                                static_cast<const AdamCoef*>(nullptr));
        }
        last[r] = c;
      }
    });
  });
}

}  // namespace cpu
}  // namespace lvopt
