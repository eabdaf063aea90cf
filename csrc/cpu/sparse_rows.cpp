// Sparse embedding rows on the CPU (docs/design.md section 2.3): deterministic coalescing of a
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
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

#include "lvopt/sparse_args.h"
#include "lvopt/sparse_clock.h"
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
  TORCH_CHECK(indices.defined() && indices.device().is_cpu() &&
                  indices.scalar_type() == at::kLong && indices.dim() == 1,
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

// take ? a : b, by bit masks: the same bits, but a form GCC cannot turn into a conditional store.
// With the ternary, GCC sinks the arithmetic of catchup_pass below a branch and stores
// conditionally; it vectorises that only with cheap masked stores (AVX-512), so at AVX2 those
// loops ran scalar (vsqrtss/vdivss: exact mode 1.9-2.6x lazy there, 1.2x at AVX-512).
LVOPT_ALWAYS_INLINE float select_bits(bool take, float a, float b) {
  uint32_t ua, ub;
  memcpy(&ua, &a, sizeof(ua));
  memcpy(&ub, &b, sizeof(ub));
  const uint32_t mask = 0u - static_cast<uint32_t>(take);
  const uint32_t r = (ua & mask) | (ub & ~mask);
  float out;
  memcpy(&out, &r, sizeof(out));
  return out;
}

template <typename T>
LVOPT_ALWAYS_INLINE void grad_add(float* __restrict dst, const T* __restrict src, int64_t n,
                                  bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) dst[i] = load_elem(src, i);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = dst[i] + load_elem(src, i);
  }
}

// A lagging row is brought current (and, with kStep, stepped) in up to three passes, each
// element by exactly one formula chosen by its own v, so the bits depend neither on the pass
// structure nor on the ISA:
//  1. every element whose v takes the forward series (v >= fwd_v: nearly all of a row that was
//     touched recently): catchup_element_fwd (+ AdamW); the others keep their p, m, v and get
//     flag 1. The test rides in the same vectorised loop as the arithmetic: a separate counting
//     pass first read v on its own before p, m, g streamed (about 1 ms of a 9 ms exact step).
//  2. only if pass 1 flagged elements: those the reversed series serves (v <= rev_v; e.g. rows
//     never touched, v = 0) the same way; the rest (sqrt(v) within decades of eps) get flag 2.
//  3. only if pass 2 flagged elements: the exact windowed loop for them (catchup_rows_loop).
// One pass: kRev = false is pass 1 (every element), kRev = true pass 2 (the flagged ones).
template <typename T, bool kStep, bool kRev>
LVOPT_ALWAYS_INLINE void catchup_pass(T* __restrict p, const float* __restrict g,
                                      float* __restrict m, float* __restrict v,
                                      uint8_t* __restrict flag, int64_t n, const CatchupRow& cr,
                                      const AdamCoef& c, int64_t* flagged) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float p0 = load_elem(p, i), m0 = m[i], v0 = v[i];
    float pi = p0, mi = m0, vi = v0;
    if constexpr (kRev)
      catchup_apply(pi, mi, vi, catchup_rev_update(m0, sqrtf(v0), cr), cr);
    else
      catchup_element_fwd(pi, mi, vi, cr);
    if constexpr (kStep) adamw_element(pi, g[i], mi, vi, c);
    bool pending = true;
    if constexpr (kRev) pending = flag[i] != 0;
    const bool take = pending & (kRev ? v0 <= cr.rev_v : v0 >= cr.fwd_v);
    // select_bits, not ?: (multi_tensor.h): the ternary kept this loop scalar at AVX2.
    m[i] = select_bits(take, mi, m0);
    v[i] = select_bits(take, vi, v0);
    store_elem(p, i, select_bits(take, pi, p0));
    flag[i] = static_cast<uint8_t>((pending & !take) ? (kRev ? 2 : 1) : 0);
    count += pending & !take;
  }
  *flagged = count;
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
#define LVOPT_CATCHUP_PASS(NAME, T, STEP, REV)                                             \
  LVOPT_ISA_DISPATCH(NAME,                                                                 \
                     (T * p, const float* g, float* m, float* v, uint8_t* flag, int64_t n, \
                      const CatchupRow& cr, const AdamCoef& c, int64_t* flagged),          \
                     (p, g, m, v, flag, n, cr, c, flagged), (catchup_pass<T, STEP, REV>))
LVOPT_CATCHUP_PASS(catchup_fwd_step_f32, float, true, false)
LVOPT_CATCHUP_PASS(catchup_fwd_step_bf16, uint16_t, true, false)
LVOPT_CATCHUP_PASS(catchup_fwd_only_f32, float, false, false)
LVOPT_CATCHUP_PASS(catchup_fwd_only_bf16, uint16_t, false, false)
LVOPT_CATCHUP_PASS(catchup_rev_step_f32, float, true, true)
LVOPT_CATCHUP_PASS(catchup_rev_step_bf16, uint16_t, true, true)
LVOPT_CATCHUP_PASS(catchup_rev_only_f32, float, false, true)
LVOPT_CATCHUP_PASS(catchup_rev_only_bf16, uint16_t, false, true)
#undef LVOPT_CATCHUP_PASS

template <typename T>
LVOPT_ALWAYS_INLINE void dispatch_grad_add(float* d, const T* s, int64_t n, bool f) {
  if constexpr (std::is_same_v<T, float>)
    grad_add_f32(d, s, n, f);
  else
    grad_add_bf16(d, s, n, f);
}

// Pass 3 of a lagging row (see catchup_pass): the elements flagged 2, whose p, m, v the
// first passes left as they were, by the exact windowed loop (and the AdamW step with c).
template <typename T>
void catchup_rows_loop(T* p, const float* g, float* m, float* v, const uint8_t* flag, int64_t n,
                       const CatchupRow& cr, const Clock& ck, int64_t s, int64_t target,
                       const AdamCoef* c) {
  // The window's per-step weights, once for the row's loop elements.
  const int64_t n_terms = ck.window_end(s, target) - s;
  std::vector<double> w(static_cast<size_t>(std::max<int64_t>(n_terms, 0)));
  std::vector<double> a(w.size());
  for (int64_t j = 0; j < n_terms; ++j) ck.term(s, target, s + 1 + j, w[j], a[j]);
  const auto terms = [&](int64_t j, double& wj, double& aj) {
    wj = w[j];
    aj = a[j];
  };
  for (int64_t i = 0; i < n; ++i) {
    if (flag[i] != 2) continue;
    float pi = load_elem(p, i), mi = m[i], vi = v[i];
    catchup_element_loop(pi, mi, vi, cr, n_terms, terms);
    if (c != nullptr) adamw_element(pi, g[i], mi, vi, *c);
    m[i] = mi;
    v[i] = vi;
    store_elem(p, i, pi);
  }
}

// Brings a row last current at step s to step target (the three passes above) and, when c is
// given, takes the AdamW step with the row's gradient g.
template <typename T>
void catchup_row(T* p, const float* g, float* m, float* v, int64_t d, const Clock& ck, int64_t s,
                 int64_t target, const AdamCoef* c) {
  thread_local std::vector<uint8_t> flag_buf;
  flag_buf.resize(static_cast<size_t>(d));
  uint8_t* flag = flag_buf.data();
  const CatchupRow cr = ck.row(s, target);
  const AdamCoef none{};
  const AdamCoef& coef = c != nullptr ? *c : none;
  using Pass = void (*)(T*, const float*, float*, float*, uint8_t*, int64_t, const CatchupRow&,
                        const AdamCoef&, int64_t*);
  Pass fwd, rev;
  if constexpr (std::is_same_v<T, float>) {
    fwd = c != nullptr ? catchup_fwd_step_f32 : catchup_fwd_only_f32;
    rev = c != nullptr ? catchup_rev_step_f32 : catchup_rev_only_f32;
  } else {
    fwd = c != nullptr ? catchup_fwd_step_bf16 : catchup_fwd_only_bf16;
    rev = c != nullptr ? catchup_rev_step_bf16 : catchup_rev_only_bf16;
  }
  int64_t flagged = 0;
  fwd(p, g, m, v, flag, d, cr, coef, &flagged);
  if (flagged == 0) return;
  rev(p, g, m, v, flag, d, cr, coef, &flagged);
  if (flagged == 0) return;
  catchup_rows_loop(p, g, m, v, flag, d, cr, ck, s, target, c);
}

// ----- argument checks (all before any write): lvopt/sparse_args.h, shared with CUDA --------

// Every row of the plan must have a last_step in [hist_base, target] and the history must
// cover the target step.
// With an error word (check_sparse_error): whether the op must write nothing, because the word
// is already set or an id lies outside the table (then recorded in the word, with the ids'
// range). The ids are read once more here; the word's protocol is for the device backends,
// and the CPU op follows it so that every backend has one contract.
bool stop_for_error(const std::optional<at::Tensor>& error, const at::Tensor& indices,
                    int64_t num_rows) {
  if (!error.has_value()) return false;
  int64_t* e = error->data_ptr<int64_t>();
  if (e[0] != 0) return true;
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kLong && indices.dim() == 1,
              "lvopt: indices must be a 1-D int64 CPU tensor, got ", indices.scalar_type(), " ",
              indices.sizes());
  const at::Tensor idx = indices.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  if (n == 0) return false;
  int64_t lo = ip[0], hi = ip[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, ip[i]);
    hi = std::max(hi, ip[i]);
  }
  if (lo >= 0 && hi < num_rows) return false;
  e[0] = kErrIds;
  e[1] = lo;
  e[2] = hi;
  return true;
}

// With an error word: whether a touched row's last_step lies outside [ck.base, target] (then
// kErrClock is recorded); without one, check_rows_clock raises instead.
bool rows_clock_bad(const RowPlan& plan, const int64_t* last, const Clock& ck, int64_t target,
                    const std::optional<at::Tensor>& error) {
  if (!error.has_value()) return false;
  bool bad = target < ck.base || target - ck.base >= ck.hist_rows;
  for (int64_t r : plan.rows) bad = bad || last[r] < ck.base || last[r] > target;
  if (bad) error->data_ptr<int64_t>()[0] |= kErrClock;
  return bad;
}

void check_rows_clock(const char* op, const RowPlan& plan, const int64_t* last, const Clock& ck,
                      int64_t target) {
  int64_t lo = target, hi = ck.base;
  for (int64_t r : plan.rows) {
    lo = std::min(lo, last[r]);
    hi = std::max(hi, last[r]);
  }
  check_sparse_rows_clock(op, lo, hi, ck, target);
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

std::tuple<at::Tensor, at::Tensor> coalesce_rows(const at::Tensor& indices,
                                                 const at::Tensor& values, int64_t num_rows) {
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
                   bool exact, const std::optional<at::Tensor>& stats,
                   const std::optional<at::Tensor>& error) {
  const char* op = "lvopt::sparse_adamw_";
  check_sparse_adamw_args(op, c10::DeviceType::CPU, param, indices, values, exp_avg, exp_avg_sq,
                          step, hyper, stats);
  check_sparse_error(op, error, param);
  if (stats.has_value()) stats->zero_();
  if (stop_for_error(error, indices, param.size(0))) return;
  const RowPlan plan = plan_rows(op, indices, param.size(0));
  const double t = read_step(step) + 1.0;
  Clock ck{};
  int64_t* last = nullptr;
  if (exact) {
    ck = check_sparse_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
    last = last_step.data_ptr<int64_t>();
    if (rows_clock_bad(plan, last, ck, static_cast<int64_t>(t) - 1, error)) return;
    check_rows_clock(op, plan, last, ck, static_cast<int64_t>(t) - 1);
  }
  double* st = stats.has_value() ? stats->data_ptr<double>() : nullptr;
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
          if constexpr (std::is_same_v<T, float>)
            adamw_row_f32(p, g, m, v, d, coef);
          else
            adamw_row_bf16(p, g, m, v, d, coef);
        } else {
          catchup_row(p, g, m, v, d, ck, last[r], ti - 1, &coef);
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
                     const at::Tensor& hyper, int64_t hist_base, int64_t epoch, int64_t window,
                     const std::optional<at::Tensor>& error) {
  const char* op = "lvopt::sparse_catchup_";
  check_sparse_table(op, c10::DeviceType::CPU, param, exp_avg, exp_avg_sq, step, hyper);
  check_sparse_error(op, error, param);
  if (stop_for_error(error, indices, param.size(0))) return;
  const RowPlan plan = plan_rows(op, indices, param.size(0));
  const Clock ck =
      check_sparse_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
  int64_t* last = last_step.data_ptr<int64_t>();
  const int64_t c = static_cast<int64_t>(read_step(step));
  if (rows_clock_bad(plan, last, ck, c, error)) return;
  check_rows_clock(op, plan, last, ck, c);
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
        catchup_row(p, static_cast<const float*>(nullptr), m, v, d, ck, last[r], c,
                    static_cast<const AdamCoef*>(nullptr));
        last[r] = c;
      }
    });
  });
}

}  // namespace cpu
}  // namespace lvopt
