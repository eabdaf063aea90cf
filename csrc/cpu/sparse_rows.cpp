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

// kFwd: every element of the row takes the forward series (catchup_element_fwd, the same
// bits as catchup_element_fast there, with half its series arithmetic).
template <typename T, bool kFwd>
LVOPT_ALWAYS_INLINE void catchup_adamw_row(T* __restrict p, const float* __restrict g,
                                           float* __restrict m, float* __restrict v, int64_t n,
                                           const CatchupRow& cr, const AdamCoef& c) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = load_elem(p, i);
    float mi = m[i], vi = v[i];
    if constexpr (kFwd) catchup_element_fwd(pi, mi, vi, cr);
    else catchup_element_fast(pi, mi, vi, cr);
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

// out[0]: the number of elements whose sqrt(v) is too close to eps for either series;
// out[1]: the number that the forward series does not serve.
LVOPT_ALWAYS_INLINE void count_mid(const float* __restrict v, int64_t n, float fwd_v, float rev_v,
                                   int64_t* out) {
  int64_t mid = 0, not_fwd = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool fwd = v[i] >= fwd_v;
    mid += !fwd & !(v[i] <= rev_v);
    not_fwd += !fwd;
  }
  out[0] = mid;
  out[1] = not_fwd;
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
                   (p, g, m, v, n, cr, c), (catchup_adamw_row<float, false>))
LVOPT_ISA_DISPATCH(catchup_adamw_row_bf16,
                   (uint16_t* p, const float* g, float* m, float* v, int64_t n,
                    const CatchupRow& cr, const AdamCoef& c),
                   (p, g, m, v, n, cr, c), (catchup_adamw_row<uint16_t, false>))
LVOPT_ISA_DISPATCH(catchup_fwd_adamw_row_f32,
                   (float* p, const float* g, float* m, float* v, int64_t n, const CatchupRow& cr,
                    const AdamCoef& c),
                   (p, g, m, v, n, cr, c), (catchup_adamw_row<float, true>))
LVOPT_ISA_DISPATCH(catchup_fwd_adamw_row_bf16,
                   (uint16_t* p, const float* g, float* m, float* v, int64_t n,
                    const CatchupRow& cr, const AdamCoef& c),
                   (p, g, m, v, n, cr, c), (catchup_adamw_row<uint16_t, true>))
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
  // The window's per-step weights, once for the row's loop elements.
  const int64_t n_terms = ck.window_end(s, target) - s;
  std::vector<double> w(static_cast<size_t>(std::max<int64_t>(n_terms, 0)));
  std::vector<double> a(w.size());
  for (int64_t j = 0; j < n_terms; ++j) ck.term(s, target, s + 1 + j, w[j], a[j]);
  const auto terms = [&](int64_t j, double& wj, double& aj) {
    wj = w[j];
    aj = a[j];
  };
  for (const Saved& e : saved) {
    float pi = e.p, mi = e.m, vi = e.v;
    catchup_element_loop(pi, mi, vi, cr, n_terms, terms);
    if (c != nullptr) adamw_element(pi, g[e.i], mi, vi, *c);
    m[e.i] = mi;
    v[e.i] = vi;
    store_elem(p, e.i, pi);
  }
}

// ----- argument checks (all before any write): lvopt/sparse_args.h, shared with CUDA --------

// Every row of the plan must have a last_step in [hist_base, target] and the history must
// cover the target step.
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
  check_sparse_adamw_args(op, c10::DeviceType::CPU, param, indices, values, exp_avg, exp_avg_sq, step,
                          hyper, stats);
  const RowPlan plan = plan_rows(op, indices, param.size(0));
  const double t = read_step(step) + 1.0;
  Clock ck{};
  int64_t* last = nullptr;
  if (exact) {
    ck = check_sparse_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
    last = last_step.data_ptr<int64_t>();
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
          if constexpr (std::is_same_v<T, float>) adamw_row_f32(p, g, m, v, d, coef);
          else adamw_row_bf16(p, g, m, v, d, coef);
        } else {
          const CatchupRow cr = ck.row(last[r], ti - 1);
          int64_t counts[2];
          count_mid_any(v, d, cr.fwd_v, cr.rev_v, counts);
          if (counts[1] == 0) {
            if constexpr (std::is_same_v<T, float>) catchup_fwd_adamw_row_f32(p, g, m, v, d, cr, coef);
            else catchup_fwd_adamw_row_bf16(p, g, m, v, d, cr, coef);
          } else if (counts[0] == 0) {
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
  check_sparse_table(op, c10::DeviceType::CPU, param, exp_avg, exp_avg_sq, step, hyper);
  const RowPlan plan = plan_rows(op, indices, param.size(0));
  const Clock ck = check_sparse_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
  int64_t* last = last_step.data_ptr<int64_t>();
  const int64_t c = static_cast<int64_t>(read_step(step));
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
        const CatchupRow cr = ck.row(last[r], c);
        int64_t counts[2];
        count_mid_any(v, d, cr.fwd_v, cr.rev_v, counts);
        if (counts[0] == 0) {
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
