// Sparse embedding rows on CUDA (docs/design.md section 2.3, docs/sparse-rows.md):
// lvopt::coalesce_rows, sparse_adamw_ (lazy and exact) and sparse_catchup_, with the semantics and
// checks of the CPU kernels (csrc/cpu/sparse_rows.cpp; the argument checks are lvopt/sparse_args.h,
// shared).
//
// The host path of a step reads no device memory and its launches and grid sizes depend only
// on N (the number of ids), never on the data (the plan of FBGEMM's table-batched embedding
// backward), so the step can be captured in a CUDA graph for a fixed N. Per call, in order:
//
//   launch                       grid                what
//   at::aminmax                  (reduction)         the ids' range, on the device
//   setup_kernel                 1 thread            error word (ids out of range), the step
//                                                    count read from the device, AdamCoef,
//                                                    the target step, the history coverage,
//                                                    the clock's betas/eps; with a ring history
//                                                    (flags & kFlagRing) the step's history row
//   at::arange + CUB radix sort  (CUB)               ids sorted stably on ceil(log2 V) bits,
//                                                    perm = input positions in that order
//   memset + CUB run-length enc. (CUB)               distinct rows, counts, run count U (device)
//   CUB exclusive sum            (CUB)               offsets[0..U] of each row's run
//   piece_table_kernel           N threads           rows given > kRun times: pieces of kRun
//                                                    rows, numbered by one device counter
//   partial_sums_kernel          N/16 + 1 blocks     each piece's sum, in input order
//     (coalesced ids, flags & kFlagCoalesced: the five lines above are two at::arange and one
//     at::full instead: each id is its own run, no sort, no piece)
//   catchup_scalars_kernel       N threads (exact)   per row: last step, catch-up scalars
//                                                    (sparse_clock.h, fp64), clock check
//   sparse_rows_kernel           N blocks            one block per distinct row
//   loop_rows_kernel             N blocks (exact)    rows with elements for the exact loop
//   row_stats_kernel             1 warp (track)      telemetry sums, in row order
//   finish_kernel                1 thread            step count += 1 unless the word is set
//
// Every kernel past the plan reads the run count U (and the loop count) on the device and its
// blocks past it return at once. A ring history (kFlagRing: lvopt/sparse.py RingClock, the
// capturable exact mode) is indexed (step - base) % rows (Clock::ring) and appended by
// setup_kernel from the device step count and hyper row, so a captured call appends at each
// replay; catchup_scalars_kernel refuses (kErrClock) a row whose epoch start the ring lost. The
// error word (sparse_args.h, check_sparse_error) is set on the device and every kernel that writes
// checks it first, so a bad batch writes nothing; the caller reads it back when it chooses
// (lvopt/sparse.py). Without an error word (a direct call of the op) the op raises, which needs
// host reads of the ids' range and of the touched rows' last steps: those sites are marked "host
// read:" and are the only ones the static scan of tests/test_sync_free.py allows.
//
// Per element (unchanged): one block per distinct row. Each thread owns fixed columns of the
// row (16-byte vectors when the row and every gradient row are aligned), sums that row's
// gradient rows in input order in fp32 and applies math.h's per-element step: the bits of an
// element depend on neither the block schedule nor the number of SMs, and equal the CPU
// kernel's for rows given at most kRun = 32 times; a longer run is summed in pieces of 32 rows
// by blocks of their own, then the pieces in order. Exact mode: behind rows catch up by the
// series (math.h) after a scan of the row's v; a row with an element that needs the exact
// windowed loop (rare) is left to loop_rows_kernel (Clock::term in fp64).
//
// Bytes: 4*N*d of gradient rows read (N ids) plus 24*U*d for p, m, v of the U distinct rows
// (fp32), plus the sort of N int64 ids (~3 passes over 16*N bytes for V = 2^18).
#include <ATen/TensorOperators.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include <tuple>

#include "lvopt/sparse_args.h"
#include "lvopt/sparse_clock.h"
#include "multi_tensor.cuh"

namespace lvopt {
namespace cuda {
namespace {

// A row given more than kRun times (the head of a Zipf batch: the most frequent id of 16,384
// Zipf(1.1) draws comes ~1,500 times) would make its block read its gradient rows one after
// the other while the rest of the grid has long finished. Its run is cut into pieces of kRun
// rows, one block each (partial_sums_kernel, in input order), and the row's block adds the
// pieces in order: a fixed grouping, so the bits stay deterministic; they equal the CPU
// kernel's (one sequential sum) for every row given at most kRun times.
constexpr int64_t kRun = 32;

// The most pieces N ids can make: a run of c > kRun rows makes ceil(c / kRun) <= c / 16
// pieces, so at most N / 16 in all (the partial sums' buffer: 1/16 of the gradient values).
inline int64_t max_pieces(int64_t n) { return n > kRun ? n / 16 + 1 : 0; }

// What every kernel of one call reads: written by setup_kernel.
struct StepInfo {
  AdamCoef coef;  // the step's coefficients (sparse_adamw_)
  int64_t target;  // exact: rows are brought current to this step first
  int64_t new_last;  // exact: every touched row's last step afterwards
  // exact: the betas and eps of Clock::row, from the hyper row where it lives (a device row, as
  // a captured step passes, is read here and nowhere on the host)
  double clock_beta1, clock_beta2;
  float clock_eps;
};

// The step's coefficients, field by field from global memory into registers (a struct copy
// through the pointer put the exact-mode row kernel's copy in local memory), handed on by
// value.
__device__ __forceinline__ AdamCoef load_coef(const StepInfo* __restrict__ info) {
  AdamCoef c;
  c.beta1 = __ldg(&info->coef.beta1);
  c.one_minus_beta1 = __ldg(&info->coef.one_minus_beta1);
  c.beta2 = __ldg(&info->coef.beta2);
  c.one_minus_beta2 = __ldg(&info->coef.one_minus_beta2);
  c.decay = __ldg(&info->coef.decay);
  c.step_size = __ldg(&info->coef.step_size);
  c.inv_bc2_sqrt = __ldg(&info->coef.inv_bc2_sqrt);
  c.eps = __ldg(&info->coef.eps);
  c.grad_sign = __ldg(&info->coef.grad_sign);
  return c;
}

// Where the step count and the hyperparameter row are: on the device (read by setup_kernel:
// nothing is read on the host, and a captured graph reads the current values at each replay)
// or on the host (values passed by value).
struct StepSource {
  const float* step_f32 = nullptr;  // device counter, one of the two, or neither
  const double* step_f64 = nullptr;
  double step_host = 0.0;
  const double* hyper_dev = nullptr;  // device row [kHyperCols], or nullptr
  double hyper_host[kHyperCols] = {0, 0, 0, 0, 0, 0};
};

// The plan of one call on the device: ids sorted (perm: input positions in sorted order,
// duplicates in input order), the distinct rows, each row's run [offsets[k], offsets[k+1]),
// the run count U, and the long runs' pieces. Sizes depend on N only.
struct DevicePlan {
  at::Tensor sorted, perm, rows, counts, offsets, num_runs, pieces, part_start, owner, partials;
  int64_t n = 0;
  int64_t max_parts = 0;
};

// Bits of the ops' `flags` argument (lvopt/sparse.py SPARSE_COALESCED, SPARSE_RING).
// kFlagCoalesced, kFlagRing: lvopt/sparse_args.h.

// Pointers of one launch (the kernels' arguments).
template <typename T>
struct RowArgs {
  T* p;  // [V, d] table
  float* m;
  float* v;
  const T* vals;  // [N, d] gradient rows as given (nullptr: catch-up only)
  const int64_t *rows, *offsets, *perm;
  const int64_t* num_runs;  // U, on the device
  const float* partials;  // [max_parts, d] sums of kRun gradient rows each (long runs only)
  const int64_t* part_start;  // [N] first partial of a row given more than kRun times
  int64_t* last;  // last_step (exact mode), else nullptr
  int64_t* err;  // the error word: nonzero -> write nothing
  const StepInfo* info;
  int64_t d;
  bool vec;  // every row start (table and gradient rows) is 16-byte aligned
};

// The gradient of `col` (N consecutive columns starting there) of distinct row k, whose
// gradient rows are perm[lo .. hi): summed in input order in fp32, the first one as it is (the
// CPU kernel's order); a row given more than kRun times adds its pieces' sums in order.
template <typename T, int N>
__device__ __forceinline__ void row_grad(const RowArgs<T>& a, int64_t k, int64_t lo, int64_t hi,
                                         int64_t col, float (&g)[N]) {
  if (hi - lo > kRun) {
    const float* part = a.partials + a.part_start[k] * a.d + col;
    const int64_t n = (hi - lo + kRun - 1) / kRun;
#pragma unroll 1
    for (int64_t c = 0; c < n; ++c) {
      float x[N];
      if constexpr (N == 1) {
        x[0] = part[c * a.d];
      } else {
        load_f32<N>(part + c * a.d, x);
      }
#pragma unroll
      for (int q = 0; q < N; ++q) g[q] = c == 0 ? x[q] : g[q] + x[q];
    }
    return;
  }
#pragma unroll 2
  for (int64_t i = lo; i < hi; ++i) {
    const T* src = a.vals + a.perm[i] * a.d + col;
    float x[N];
    if constexpr (N == 1) {
      x[0] = load_elem(src, 0);
    } else {
      load_vec(src, x);
    }
#pragma unroll
    for (int q = 0; q < N; ++q) g[q] = i == lo ? x[q] : g[q] + x[q];
  }
}

// One block per piece q of a long run: the sum of its (at most kRun) gradient rows, in input
// order, into sums[q].
template <typename T, int N>
__device__ __forceinline__ void piece_columns(const RowArgs<T>& a, int64_t lo, int64_t hi,
                                              float* out, int64_t first, int64_t end) {
  for (int64_t j = first + static_cast<int64_t>(threadIdx.x) * N; j < end; j += kThreads * N) {
    float g[N];
    // Below kRun rows: row_grad's direct sum (k is not read on that path).
    row_grad<T, N>(a, 0, lo, hi, j, g);
    if constexpr (N == 1) {
      out[j] = g[0];
    } else {
      store_f32<N>(out + j, g);
    }
  }
}

// One block per piece q of a long run (the grid covers max_pieces(N); blocks past the device
// counter return): the sum of its (at most kRun) gradient rows, in input order, into sums[q].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    partial_sums_kernel(const RowArgs<T> a, const int64_t* __restrict__ owner,
                        const int64_t* __restrict__ count, float* __restrict__ sums) {
  const int64_t q = blockIdx.x;
  if (q >= *count || a.err[0] != 0) return;
  const int64_t k = owner[q];
  const int64_t lo = a.offsets[k] + (q - a.part_start[k]) * kRun;
  const int64_t hi = min(lo + kRun, a.offsets[k + 1]);
  constexpr int N = VecWidth<T>::value;
  float* out = sums + q * a.d;
  int64_t done = 0;
  if (a.vec) {
    done = a.d / N * N;
    piece_columns<T, N>(a, lo, hi, out, 0, done);
  }
  piece_columns<T, 1>(a, lo, hi, out, done, a.d);
}

// The columns [first, end) of distinct row k, N at a time (N = 1: scalar), thread i taking
// columns first + i*N, first + (i + kThreads)*N, ...: the series catch-up (behind rows of a
// row kernel launched in exact mode; every element of the row is known to take it) and the step.
template <typename T, int N, bool kStep, bool kTrack>
__device__ __forceinline__ void row_columns(const RowArgs<T>& a, int64_t k, int64_t first,
                                            int64_t end, bool behind, const CatchupRow cr,
                                            const AdamCoef c, double (&sums)[2]) {
  const int64_t r = a.rows[k];
  T* p = a.p + r * a.d;
  float* m = a.m + r * a.d;
  float* v = a.v + r * a.d;
  const int64_t lo = kStep ? a.offsets[k] : 0, hi = kStep ? a.offsets[k + 1] : 0;
  for (int64_t j = first + static_cast<int64_t>(threadIdx.x) * N; j < end; j += kThreads * N) {
    float pf[N], gf[N], mf[N], vf[N], w0[N];
    if constexpr (N == 1) {
      pf[0] = load_elem(p, j);
      mf[0] = m[j];
      vf[0] = v[j];
    } else {
      load_vec(p + j, pf);
      load_f32<N>(m + j, mf);
      load_f32<N>(v + j, vf);
    }
    if constexpr (kStep) row_grad<T, N>(a, k, lo, hi, j, gf);
#pragma unroll
    for (int q = 0; q < N; ++q) {
      if constexpr (kTrack) w0[q] = pf[q];
      if (behind) catchup_element_fast(pf[q], mf[q], vf[q], cr);
      if constexpr (kStep) adamw_element(pf[q], gf[q], mf[q], vf[q], c);
    }
    if constexpr (N == 1) {
      store_elem(p, j, pf[0]);
      m[j] = mf[0];
      v[j] = vf[0];
    } else {
      store_f32<N>(m + j, mf);
      store_f32<N>(v + j, vf);
      store_vec(p + j, pf);
    }
    if constexpr (kTrack) {
#pragma unroll
      for (int q = 0; q < N; ++q) track(w0[q], stored_value(p, pf[q]), sums);
    }
  }
}

// True on every thread when an element of row k's v needs the exact windowed loop (its v is
// between rev_v and fwd_v: too close to eps**2 for either series; ~2e-5 of the elements). The
// row's v is read here first; the update's second read of it hits the cache.
template <typename T>
__device__ __forceinline__ bool row_needs_loop(const RowArgs<T>& a, int64_t k,
                                               const CatchupRow& cr) {
  const float* v = a.v + a.rows[k] * a.d;
  bool mid = false;
  int64_t done = 0;
  if (a.vec) {
    done = a.d / 4 * 4;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * 4; j < done; j += kThreads * 4) {
      float vf[4];
      load_f32<4>(v + j, vf);
#pragma unroll
      for (int q = 0; q < 4; ++q) mid |= !(vf[q] >= cr.fwd_v) && !(vf[q] <= cr.rev_v);
    }
  }
  for (int64_t j = done + threadIdx.x; j < a.d; j += kThreads) {
    mid |= !(v[j] >= cr.fwd_v) && !(v[j] <= cr.rev_v);
  }
  return __syncthreads_or(mid) != 0;
}

// One thread per distinct row k (the grid covers N): a row given more than kRun times gets
// ceil(count / kRun) consecutive pieces, numbered from one device counter (the pieces of one
// row are consecutive and in order; which row gets which numbers is the schedule's, and no
// result depends on it).
__global__ void piece_table_kernel(const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ num_runs,
                                   int64_t* __restrict__ part_start, int64_t* __restrict__ owner,
                                   unsigned long long* __restrict__ count) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= *num_runs) return;
  const int64_t c = offsets[k + 1] - offsets[k];
  if (c <= kRun) return;
  const int64_t n = (c + kRun - 1) / kRun;
  const int64_t first = static_cast<int64_t>(atomicAdd(count, static_cast<unsigned long long>(n)));
  part_start[k] = first;
  for (int64_t j = 0; j < n; ++j) owner[first + j] = k;
}

// Ring history (kFlagRing): the row of step t, from the rows of t - 1 and of t's epoch start and
// the step's lr and weight decay, as lvopt/sparse.py RowClock.append builds it on the host (fp64;
// bc2^(h/2) from sqrt and products; libm's last bits may differ from the host's). The ring holds
// the last ck.ring steps; a row whose epoch start has been overwritten sets kErrClock
// (catchup_scalars_kernel).
__device__ void append_history(const Clock& ck, int64_t t, double lr, double wd, double b1,
                               double b2) {
  double* out = const_cast<double*>(ck.at(t));
  const double* prev = ck.at(t - 1);
  const int64_t b = ck.base + ck.epoch * ((t - 1 - ck.base) / ck.epoch);
  const int64_t k = t - b;
  const bool inside = t - 1 > b;
  const double d = 1.0 - lr * wd;
  const double log_pi = prev[kHLogPi] + log(d);
  const double bc1 = 1.0 - pow(b1, static_cast<double>(t));
  const double bc2 = 1.0 - pow(b2, static_cast<double>(t));
  const double sb = sqrt(bc2);
  const double scale = exp(ck.at(b)[kHLogPi] - log_pi);
  const double lb = lr / bc1;
  // bc2^(h/2) for M_0..M_3 (h = 1..4) and N_1..N_4 (h = 0, -1, -2, -3).
  const double pw[kHistSeries] = {sb,  bc2,      bc2 * sb,  bc2 * bc2,
                                  1.0, 1.0 / sb, 1.0 / bc2, 1.0 / (bc2 * sb)};
  double series[kHistSeries];
#pragma unroll
  for (int i = 0; i < kHistSeries; ++i) {
    series[i] = (inside ? prev[kHSeries + i] : 0.0) +
                lb * pw[i] * ck.qpow[i * ck.qcols + k + ck.epoch] * scale;
  }
  out[kHLr] = lr;
  out[kHDecay] = d;
  out[kHLogPi] = log_pi;
  out[kHU] = lb * sb;
  out[kHSqrtBc2] = sb;
#pragma unroll
  for (int i = 0; i < kHistSeries; ++i) out[kHSeries + i] = series[i];
}

// One thread: the error word for the ids' range (when the range was taken: n_ids > 0), the step
// count (read where it lives), the target step and the step's coefficients, and in exact mode
// the clock's betas and eps, the history's coverage of the target and, with a ring history,
// the step's history row (appended here, so that a captured step appends at each replay).
__global__ void setup_kernel(StepSource src, const int64_t* __restrict__ id_min,
                             const int64_t* __restrict__ id_max, int64_t num_rows, bool step_op,
                             bool exact, const Clock ck, int64_t* __restrict__ err,
                             StepInfo* __restrict__ info) {
  if (id_min != nullptr && err[0] == 0) {
    const int64_t lo = *id_min, hi = *id_max;
    if (lo < 0 || hi >= num_rows) {
      err[0] = kErrIds;
      err[1] = lo;
      err[2] = hi;
    }
  }
  const double s = src.step_f32 != nullptr   ? static_cast<double>(*src.step_f32)
                   : src.step_f64 != nullptr ? *src.step_f64
                                             : src.step_host;
  const double t = step_op ? s + 1.0 : s;
  const int64_t target = static_cast<int64_t>(step_op ? t - 1.0 : t);
  info->target = target;
  info->new_last = static_cast<int64_t>(t);
  // The row in registers (indexing the parameter array through a pointer would copy it to
  // local memory).
  double row[kHyperCols];
#pragma unroll
  for (int i = 0; i < kHyperCols; ++i)
    row[i] = src.hyper_dev != nullptr ? src.hyper_dev[i] : src.hyper_host[i];
  if (exact) {
    info->clock_beta1 = row[kBeta1];
    info->clock_beta2 = row[kBeta2];
    info->clock_eps = static_cast<float>(row[kEps]);
    const bool covered =
        ck.ring > 0 ? target >= ck.base : target >= ck.base && target - ck.base < ck.hist_rows;
    if (!covered) err[0] |= kErrClock;
    if (step_op && ck.ring > 0 && err[0] == 0) {
      append_history(ck, target + 1, row[kLr], row[kWeightDecay], row[kBeta1], row[kBeta2]);
    }
  }
  if (step_op) {
    const AdamCoef c = make_adam_coef(row, t);
    info->coef.beta1 = c.beta1;
    info->coef.one_minus_beta1 = c.one_minus_beta1;
    info->coef.beta2 = c.beta2;
    info->coef.one_minus_beta2 = c.one_minus_beta2;
    info->coef.decay = c.decay;
    info->coef.step_size = c.step_size;
    info->coef.inv_bc2_sqrt = c.inv_bc2_sqrt;
    info->coef.eps = c.eps;
    info->coef.grad_sign = c.grad_sign;
  }
}

// One thread: the step count advances unless the call wrote nothing.
__global__ void finish_kernel(float* step_f32, double* step_f64, const int64_t* __restrict__ err) {
  if (err[0] != 0) return;
  if (step_f32 != nullptr) *step_f32 += 1.0f;
  if (step_f64 != nullptr) *step_f64 += 1.0;
}

// Exact mode, one thread per distinct row k (the grid covers N): its last step s (a snapshot:
// the row kernel moves the clock), the clock check (s within [base, target], else kErrClock),
// and, when the row is behind, its catch-up scalars (sparse_clock.h, fp64 on the device copy of
// the history). A kernel of its own, so that the fp64 exp/pow code does not raise the register
// count of the streaming kernel.
__global__ void __launch_bounds__(128)
    catchup_scalars_kernel(const int64_t* __restrict__ rows, const int64_t* __restrict__ num_runs,
                           const int64_t* __restrict__ last, const Clock ck,
                           const StepInfo* __restrict__ info, int64_t* __restrict__ err,
                           int64_t* __restrict__ row_last, CatchupRow* __restrict__ row_cr) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= *num_runs || err[0] != 0) return;
  const int64_t target = info->target;
  const int64_t s = last[rows[k]];
  row_last[k] = s;
  // A ring history must still hold the row's epoch start (and not have reused its slot for the
  // step this call appended).
  const bool lost =
      ck.ring > 0 && target + 1 - (ck.base + ck.epoch * ((s - ck.base) / ck.epoch)) >= ck.ring;
  if (s < ck.base || s > target || lost) {
    atomicOr(reinterpret_cast<unsigned long long*>(err),
             static_cast<unsigned long long>(kErrClock));
    return;
  }
  if (s < target) {
    Clock c = ck;
    c.beta1 = info->clock_beta1;
    c.beta2 = info->clock_beta2;
    c.eps = info->clock_eps;
    row_cr[k] = c.row(s, target);
  }
}

// The per-row inputs of exact mode: the snapshot of last_step and the catch-up scalars of each
// distinct row, and the list of rows left to the loop kernel (count, then row numbers k).
struct ExactRows {
  const int64_t* last;
  const CatchupRow* cr;
  int32_t* loop_count;
  int64_t* loop_rows;
};

// One block per distinct row k (the grid covers N): sparse_adamw_ (kStep) or sparse_catchup_
// (!kStep; exact only). A behind row with an element that needs the exact loop is left
// untouched and appended to the loop list (its order there is the schedule's; each listed row
// is then done by one block of loop_rows_kernel, so the bits do not depend on it).
// (Two blocks per SM as the launch bound: ptxas otherwise held the fp32 exact+track variant to
// 64 registers and spilled 20 loads' worth to local memory; with it no variant spills, 55-110
// registers: benchmarks/sass_report.py.)
template <typename T, bool kExact, bool kStep, bool kTrack>
__global__ void __launch_bounds__(kThreads, 2)
    sparse_rows_kernel(const RowArgs<T> a, const ExactRows ex, double* __restrict__ row_stats) {
  const int64_t k = blockIdx.x;
  if (k >= *a.num_runs || a.err[0] != 0) return;
  const int64_t target = a.info->target;
  bool behind = false;
  CatchupRow cr{};
  if constexpr (kExact) {
    behind = ex.last[k] < target;
    if (!kStep && !behind) return;  // a catch-up of a current row: nothing to do
    if (behind) {
      cr = ex.cr[k];
      if (row_needs_loop(a, k, cr)) {
        if (threadIdx.x == 0) ex.loop_rows[atomicAdd(ex.loop_count, 1)] = k;
        return;
      }
    }
  }
  if constexpr (kExact) {
    // The row's new last step, written before its columns (the kernel reads each row's last
    // step from the snapshot ex.last, so the write races with no read; written last, its value
    // stayed live across the row and spilled to local memory in the bf16 variant).
    if (threadIdx.x == 0) a.last[a.rows[k]] = a.info->new_last;
  }
  const AdamCoef c = kStep ? load_coef(a.info) : AdamCoef{};
  double sums[2] = {0.0, 0.0};
  constexpr int N = VecWidth<T>::value;
  int64_t done = 0;
  if (a.vec) {
    done = a.d / N * N;
    row_columns<T, N, kStep, kTrack>(a, k, 0, done, behind, cr, c, sums);
  }
  row_columns<T, 1, kStep, kTrack>(a, k, done, a.d, behind, cr, c, sums);
  if constexpr (kTrack) block_sum_to<2>(sums, row_stats + 2 * k);
}

// The rows sparse_rows_kernel listed, one block each, element by element: the series where
// they serve, the exact windowed loop (fp64, Clock::term on the device history) where not,
// then the step. The grid covers N; blocks past the list's end return.
template <typename T, bool kStep, bool kTrack>
__global__ void __launch_bounds__(kThreads)
    loop_rows_kernel(const RowArgs<T> a, const ExactRows ex, const Clock ck,
                     double* __restrict__ row_stats) {
  if (static_cast<int32_t>(blockIdx.x) >= *ex.loop_count || a.err[0] != 0) return;
  const int64_t k = ex.loop_rows[blockIdx.x];
  const int64_t s = ex.last[k];
  const int64_t target = a.info->target;
  const CatchupRow cr = ex.cr[k];
  const int64_t r = a.rows[k];
  T* p = a.p + r * a.d;
  float* m = a.m + r * a.d;
  float* v = a.v + r * a.d;
  const int64_t lo = kStep ? a.offsets[k] : 0, hi = kStep ? a.offsets[k + 1] : 0;
  const AdamCoef c = kStep ? load_coef(a.info) : AdamCoef{};
  const auto term = [&](int64_t j, double& w, double& aj) { ck.term(s, target, s + 1 + j, w, aj); };
  double sums[2] = {0.0, 0.0};
  for (int64_t j = threadIdx.x; j < a.d; j += kThreads) {
    float pi = load_elem(p, j), mi = m[j], vi = v[j];
    const float w0 = pi;
    if (!catchup_element(pi, mi, vi, cr)) {
      catchup_element_loop(pi, mi, vi, cr, ck.window_end(s, target) - s, term);
    }
    if constexpr (kStep) {
      float g[1];
      row_grad<T, 1>(a, k, lo, hi, j, g);
      adamw_element(pi, g[0], mi, vi, c);
    }
    store_elem(p, j, pi);
    m[j] = mi;
    v[j] = vi;
    if constexpr (kTrack) track(w0, stored_value(p, pi), sums);
  }
  if constexpr (kTrack) block_sum_to<2>(sums, row_stats + 2 * k);
  if (threadIdx.x == 0) a.last[r] = a.info->new_last;
}

// One warp: stats = the per-row sums added by lane (row % 32) in row order, then the fixed
// xor tree of warp_sum. Rows past U contribute nothing; a call that wrote nothing leaves zeros.
__global__ void row_stats_kernel(const double* __restrict__ row_stats,
                                 const int64_t* __restrict__ num_runs,
                                 const int64_t* __restrict__ err, double* __restrict__ stats) {
  double x[2] = {0.0, 0.0};
  const int64_t u = err[0] != 0 ? 0 : *num_runs;
  for (int64_t k = threadIdx.x; k < u; k += 32) {
    x[0] += row_stats[2 * k];
    x[1] += row_stats[2 * k + 1];
  }
  warp_sum<2>(x);
  if (threadIdx.x == 0) {
    stats[0] = x[0];
    stats[1] = x[1];
  }
}

// coalesce_rows: one block per distinct row, the sum of its value rows in input order.
template <typename T, int N>
__device__ __forceinline__ void coalesce_columns(const RowArgs<T>& a, int64_t k, T* out,
                                                 int64_t first, int64_t end) {
  const int64_t lo = a.offsets[k], hi = a.offsets[k + 1];
  for (int64_t j = first + static_cast<int64_t>(threadIdx.x) * N; j < end; j += kThreads * N) {
    float g[N];
    row_grad<T, N>(a, k, lo, hi, j, g);
    if constexpr (N == 1) {
      store_elem(out + k * a.d, j, g[0]);
    } else {
      store_vec(out + k * a.d + j, g);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    coalesce_kernel(const RowArgs<T> a, T* __restrict__ out) {
  constexpr int N = VecWidth<T>::value;
  const int64_t k = blockIdx.x;
  if (k >= *a.num_runs) return;
  int64_t done = 0;
  if (a.vec) {
    done = a.d / N * N;
    coalesce_columns<T, N>(a, k, out, 0, done);
  }
  coalesce_columns<T, 1>(a, k, out, done, a.d);
}

// ----- host side: no host reads except at the sites marked "host read:" ----------------------

unsigned grid_of(int64_t n, int64_t per_block) {
  const int64_t g = (n + per_block - 1) / per_block;
  TORCH_CHECK(g <= INT32_MAX, "lvopt: ", n, " ids are more than one launch can cover");
  return static_cast<unsigned>(g > 0 ? g : 1);
}

// CUB's two-call protocol: the temporary storage's size first (a host computation, no device
// access), then the call on storage from torch's caching allocator.
template <typename Call>
void cub_call(const at::Tensor& like, Call&& call) {
  size_t bytes = 0;
  C10_CUDA_CHECK(call(nullptr, bytes));
  const at::Tensor tmp =
      at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
  C10_CUDA_CHECK(call(tmp.data_ptr(), bytes));
}

int key_bits(int64_t num_rows) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < num_rows) ++bits;
  return bits;
}

// The plan of N ids (see DevicePlan): radix sort of the ids on the bits num_rows needs (stable:
// duplicates keep their input order), run-length encoding, offsets, and the long runs' piece
// table. Ids outside [0, num_rows) make a meaningless plan; the error word stops every kernel
// that would use it.
DevicePlan plan_rows(const at::Tensor& idx, int64_t num_rows, int64_t d, cudaStream_t stream,
                     bool coalesced = false) {
  DevicePlan plan;
  const int64_t n = idx.numel();
  plan.n = n;
  const auto opt = idx.options();
  if (coalesced) {
    // Sorted, distinct ids (kFlagCoalesced: a coalesced sparse gradient, a catch-up of every
    // row): each is its own run, so the plan is known without a sort: three fills, no CUB, no
    // piece table (no row is given more than once).
    plan.sorted = idx;
    plan.rows = idx;
    plan.perm = at::arange(n, opt);
    plan.offsets = at::arange(n + 1, opt);
    plan.num_runs = at::full({1}, n, opt);
    return plan;
  }
  plan.sorted = at::empty({n}, opt);
  plan.perm = at::empty({n}, opt);
  plan.rows = at::empty({n}, opt);
  plan.counts = at::zeros({n + 1}, opt);
  plan.offsets = at::empty({n + 1}, opt);
  plan.num_runs = at::zeros({1}, opt);
  if (n == 0) return plan;
  TORCH_CHECK(n <= INT32_MAX, "lvopt: more than 2^31 - 1 ids in one call");
  const int items = static_cast<int>(n);
  const at::Tensor iota = at::arange(n, opt);
  const int bits = key_bits(num_rows);
  cub_call(idx, [&](void* tmp, size_t& bytes) {
    return cub::DeviceRadixSort::SortPairs(
        tmp, bytes, idx.data_ptr<int64_t>(), plan.sorted.data_ptr<int64_t>(),
        iota.data_ptr<int64_t>(), plan.perm.data_ptr<int64_t>(), items, 0, bits, stream);
  });
  cub_call(idx, [&](void* tmp, size_t& bytes) {
    return cub::DeviceRunLengthEncode::Encode(
        tmp, bytes, plan.sorted.data_ptr<int64_t>(), plan.rows.data_ptr<int64_t>(),
        plan.counts.data_ptr<int64_t>(), plan.num_runs.data_ptr<int64_t>(), items, stream);
  });
  // counts past U are the zeros they were made with: offsets[U] = N.
  cub_call(idx, [&](void* tmp, size_t& bytes) {
    return cub::DeviceScan::ExclusiveSum(tmp, bytes, plan.counts.data_ptr<int64_t>(),
                                         plan.offsets.data_ptr<int64_t>(), items + 1, stream);
  });
  plan.max_parts = max_pieces(n);
  if (plan.max_parts > 0) {
    plan.pieces = at::zeros({1}, opt);
    plan.part_start = at::empty({n}, opt);
    plan.owner = at::empty({plan.max_parts}, opt);
    plan.partials = at::empty({plan.max_parts, d}, opt.dtype(at::kFloat));
    piece_table_kernel<<<grid_of(n, 128), 128, 0, stream>>>(
        plan.offsets.data_ptr<int64_t>(), plan.num_runs.data_ptr<int64_t>(),
        plan.part_start.data_ptr<int64_t>(), plan.owner.data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(plan.pieces.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return plan;
}

bool aligned16_ptr(const void* x) { return (reinterpret_cast<uintptr_t>(x) & 15u) == 0; }

// 16-byte vectors serve when every row start of every stream is aligned: the bases are, and
// the row pitch is a multiple of one vector (d % N == 0 makes both the T pitch d*sizeof(T)
// and the fp32 moments' pitch 4*d multiples of 16 bytes).
template <typename T>
bool rows_vectorisable(const void* p, const void* m, const void* v, const void* vals, int64_t d) {
  constexpr int N = VecWidth<T>::value;
  return d % N == 0 && aligned16_ptr(p) && aligned16_ptr(m) && aligned16_ptr(v) &&
         (vals == nullptr || aligned16_ptr(vals));
}

template <typename T>
RowArgs<T> plan_args(const DevicePlan& plan, int64_t* err, const StepInfo* info, int64_t d) {
  RowArgs<T> a{};
  a.rows = plan.rows.data_ptr<int64_t>();
  a.offsets = plan.offsets.data_ptr<int64_t>();
  a.perm = plan.perm.data_ptr<int64_t>();
  a.num_runs = plan.num_runs.data_ptr<int64_t>();
  if (plan.max_parts > 0) {
    a.partials = plan.partials.data_ptr<float>();
    a.part_start = plan.part_start.data_ptr<int64_t>();
  }
  a.err = err;
  a.info = info;
  a.d = d;
  return a;
}

// plan_args with a step's table streams: the parameter's rows and its moments', the gradient
// rows (vals; nullptr for a catch-up), last_step (exact mode; else nullptr), and whether
// 16-byte vectors serve them all.
template <typename T>
RowArgs<T> table_args(const DevicePlan& plan, const at::Tensor& err, const StepInfo* info,
                      const at::Tensor& param, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const void* vals, int64_t* last) {
  RowArgs<T> a = plan_args<T>(plan, err.data_ptr<int64_t>(), info, param.size(1));
  a.p = reinterpret_cast<T*>(param.data_ptr());
  a.m = exp_avg.data_ptr<float>();
  a.v = exp_avg_sq.data_ptr<float>();
  a.vals = static_cast<const T*>(vals);
  a.last = last;
  a.vec = rows_vectorisable<T>(a.p, a.m, a.v, a.vals, a.d);
  return a;
}

// Sums the pieces of the long runs (before the row kernel).
template <typename T>
void sum_long_runs(const RowArgs<T>& a, const DevicePlan& plan, cudaStream_t stream) {
  if (plan.max_parts == 0) return;
  partial_sums_kernel<T><<<grid_of(plan.max_parts, 1), kThreads, 0, stream>>>(
      a, plan.owner.data_ptr<int64_t>(), plan.pieces.data_ptr<int64_t>(),
      plan.partials.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Raises, naming the first offending position, when an id is negative or >= num_rows. Only
// for a call without an error word (which then wants an exception).
void raise_for_ids(const char* op, const at::Tensor& idx, int64_t num_rows) {
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  // host read: the ids' range, for a call that raises (no error word given).
  const int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
  if (mn < 0) {
    // host read: the first offending position, on the error path of a call that raises.
    const int64_t pos = at::nonzero(idx < 0)[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": negative index ", idx[pos].item<int64_t>(), " at position ", pos);
  }
  if (mx >= num_rows) {
    // host read: the first offending position, on the error path of a call that raises.
    const int64_t pos = at::nonzero(idx >= num_rows)[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": index ", idx[pos].item<int64_t>(), " at position ", pos,
                " is out of range for a table of ", num_rows, " rows");
  }
}

// The step count and hyperparameters where they live (StepSource).
StepSource step_source(const at::Tensor& step, const at::Tensor& hyper) {
  StepSource src;
  if (step.device().is_cpu()) {
    // host read: a step counter on the host (CPU memory; no device access).
    src.step_host = read_step(step);
  } else if (step.scalar_type() == at::kFloat) {
    src.step_f32 = step.data_ptr<float>();
  } else {
    src.step_f64 = step.data_ptr<double>();
  }
  if (hyper.device().is_cpu()) {
    for (int i = 0; i < kHyperCols; ++i) src.hyper_host[i] = hyper.data_ptr<double>()[i];
  } else {
    src.hyper_dev = hyper.data_ptr<double>();
  }
  return src;
}

// The error word of the call: the caller's, or a zeroed scratch word for a call that raises.
at::Tensor error_word(const std::optional<at::Tensor>& error, const at::Tensor& like) {
  return error.has_value() ? *error : at::zeros({3}, like.options().dtype(at::kLong));
}

// Queues the ids' range check and setup_kernel; returns the StepInfo buffer.
at::Tensor setup(const at::Tensor& idx, int64_t num_rows, const StepSource& src, bool step_op,
                 bool exact, const Clock& ck, const at::Tensor& err, cudaStream_t stream) {
  const at::Tensor info =
      at::empty({static_cast<int64_t>((sizeof(StepInfo) + 7) / 8)}, err.options());
  at::Tensor lo, hi;
  if (idx.numel() > 0) std::tie(lo, hi) = at::aminmax(idx);
  setup_kernel<<<1, 1, 0, stream>>>(src, idx.numel() > 0 ? lo.data_ptr<int64_t>() : nullptr,
                                    idx.numel() > 0 ? hi.data_ptr<int64_t>() : nullptr, num_rows,
                                    step_op, exact, ck, err.data_ptr<int64_t>(),
                                    reinterpret_cast<StepInfo*>(info.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return info;
}

// The touched rows' last_step range checked against the clock, for a call that raises.
void raise_for_clock(const char* op, const at::Tensor& last_step, const at::Tensor& idx,
                     const Clock& ck, int64_t target) {
  int64_t lo = target, hi = ck.base;
  if (idx.numel() > 0) {
    const auto [mn, mx] = at::aminmax(last_step.index_select(0, idx));
    // host read: the rows' last steps, for a call that raises (no error word given).
    lo = mn.item<int64_t>();
    hi = mx.item<int64_t>();
  }
  check_sparse_rows_clock(op, lo, hi, ck, target);
}

std::tuple<at::Tensor, at::Tensor> coalesce_rows_cuda(const at::Tensor& indices,
                                                      const at::Tensor& values, int64_t num_rows) {
  const char* op = "lvopt::coalesce_rows";
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(indices.defined() && indices.is_cuda() && indices.scalar_type() == at::kLong &&
                  indices.dim() == 1,
              op, ": indices must be a 1-D int64 CUDA tensor, got ", indices.scalar_type(), " ",
              indices.sizes());
  TORCH_CHECK(values.defined() && values.device() == indices.device() && values.dim() == 2 &&
                  values.size(0) == indices.numel() &&
                  (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              op, ": values must be a float32/bfloat16 tensor on ", indices.device(), " of shape [",
              indices.numel(), ", width], got ", values.scalar_type(), " ", values.sizes());
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  raise_for_ids(op, idx, num_rows);
  const at::Tensor vals = values.contiguous();
  const int64_t d = vals.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DevicePlan plan = plan_rows(idx, num_rows, d, stream);
  // host read: the number of distinct rows sizes coalesce_rows' outputs (a data-dependent shape,
  // as torch's coalesce() has); the optimizer's step does not call this op on a GPU.
  const int64_t u = idx.numel() == 0 ? 0 : plan.num_runs.item<int64_t>();
  at::Tensor out = at::empty({u, d}, vals.options());
  const at::Tensor rows = plan.rows.slice(0, 0, u);
  if (u == 0 || d == 0) return {rows, out};
  const at::Tensor err = at::zeros({3}, idx.options());
  const auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    RowArgs<T> a = plan_args<T>(plan, err.data_ptr<int64_t>(), nullptr, d);
    a.vals = reinterpret_cast<const T*>(vals.data_ptr());
    // The table is the output here: its pointer stands in for p, m and v in the alignment test.
    a.vec = rows_vectorisable<T>(out.data_ptr(), out.data_ptr(), out.data_ptr(), a.vals, d);
    sum_long_runs(a, plan, stream);
    coalesce_kernel<T>
        <<<grid_of(u, 1), kThreads, 0, stream>>>(a, reinterpret_cast<T*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vals.scalar_type() == at::kFloat)
    launch(static_cast<float*>(nullptr));
  else
    launch(static_cast<uint16_t*>(nullptr));
  return {rows, out};
}

// The per-row inputs of exact mode (ExactRows) and the tensors that hold them, sized by N.
struct ExactState {
  at::Tensor last, cr, loop;  // [N] int64; [N] CatchupRow; [1 + N] int64 (count, rows)
  ExactRows rows{};
};

ExactState exact_state(const at::Tensor& last_step, const DevicePlan& plan, const Clock& ck,
                       const at::Tensor& info, const at::Tensor& err, cudaStream_t stream) {
  ExactState out;
  const int64_t n = plan.n;
  out.last = at::empty({n}, last_step.options());
  out.cr = at::empty({n * static_cast<int64_t>(sizeof(CatchupRow))},
                     last_step.options().dtype(at::kByte));
  out.loop = at::zeros({n + 1}, last_step.options());
  out.rows.last = out.last.data_ptr<int64_t>();
  out.rows.cr = reinterpret_cast<const CatchupRow*>(out.cr.data_ptr());
  out.rows.loop_count = reinterpret_cast<int32_t*>(out.loop.data_ptr<int64_t>());
  out.rows.loop_rows = out.loop.data_ptr<int64_t>() + 1;
  catchup_scalars_kernel<<<grid_of(n, 128), 128, 0, stream>>>(
      plan.rows.data_ptr<int64_t>(), plan.num_runs.data_ptr<int64_t>(),
      last_step.data_ptr<int64_t>(), ck, reinterpret_cast<const StepInfo*>(info.data_ptr()),
      err.data_ptr<int64_t>(), out.last.data_ptr<int64_t>(),
      reinterpret_cast<CatchupRow*>(out.cr.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The row kernel, then (exact mode) the loop kernel for the rows it listed; both over N blocks.
template <typename T, bool kExact, bool kStep, bool kTrack>
void launch_rows(const RowArgs<T>& a, const Clock& ck, const ExactRows& ex, double* row_stats,
                 int64_t n, cudaStream_t stream) {
  sparse_rows_kernel<T, kExact, kStep, kTrack>
      <<<grid_of(n, 1), kThreads, 0, stream>>>(a, ex, row_stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (kExact) {
    loop_rows_kernel<T, kStep, kTrack>
        <<<grid_of(n, 1), kThreads, 0, stream>>>(a, ex, ck, row_stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The clock on the device: hist and qpow must be there already (lvopt/sparse.py's RowClock keeps
// a device mirror); host tables are copied for a direct call of the op.
struct DeviceClock {
  Clock ck{};
  at::Tensor hist, qpow;
};

DeviceClock device_clock(const Clock& host_view, const at::Tensor& hist, const at::Tensor& qpow,
                         const c10::Device dev, bool ring) {
  DeviceClock out;
  // host copy: tables given on the host (a direct call; the optimizer keeps device mirrors).
  out.hist = hist.device() == dev ? hist : hist.to(dev, /*non_blocking=*/true);
  out.qpow = qpow.device() == dev ? qpow : qpow.to(dev, /*non_blocking=*/true);
  out.ck = host_view;
  out.ck.hist = out.hist.data_ptr<double>();
  out.ck.qpow = out.qpow.data_ptr<double>();
  out.ck.ring = ring ? out.hist.size(0) : 0;
  return out;
}

// Checks of hyper for the device path: its layout always; its values when it is on the host
// (a device row was checked where it was built: lvopt/optim.py).
void check_hyper_layout(const char* op, const at::Tensor& param, const at::Tensor& hyper) {
  TORCH_CHECK(hyper.defined() && (hyper.device().is_cpu() || hyper.device() == param.device()) &&
                  hyper.scalar_type() == at::kDouble && hyper.dim() == 2 && hyper.size(0) == 1 &&
                  hyper.size(1) == kHyperCols && hyper.is_contiguous(),
              op, ": hyper must be a contiguous float64 tensor of shape [1, ",
              static_cast<int>(kHyperCols), "] on the CPU or ", param.device(), ", got ",
              hyper.scalar_type(), " ", hyper.sizes());
}

// The hyper row's values as check_sparse_table wants them: a host row is checked there; a device
// row (lazy mode, e.g. under CUDA-graph capture with a tensor lr) was checked where it was built
// and stands in with a valid placeholder, as its values are read by setup_kernel only.
at::Tensor host_checkable_hyper(const at::Tensor& hyper) {
  if (hyper.device().is_cpu()) return hyper;
  return at::empty({1, kHyperCols}, hyper.options().device(c10::kCPU)).fill_(0.5);
}

// The `flags` argument: known bits only; a ring history (kFlagRing) is exact mode's, on the
// device, with an error word (its coverage is decided on the device, never raised).
void check_flags(const char* op, int64_t flags, bool exact, const at::Tensor& param,
                 const at::Tensor& hist, const std::optional<at::Tensor>& error) {
  TORCH_CHECK((flags & ~(kFlagCoalesced | kFlagRing)) == 0, op, ": flags must be a combination of ",
              kFlagCoalesced, " (coalesced ids) and ", kFlagRing, " (ring history), got ", flags);
  if ((flags & kFlagRing) == 0) return;
  TORCH_CHECK(exact, op, ": flags has the ring-history bit (", kFlagRing, ") but exact is false");
  TORCH_CHECK(hist.device() == param.device() && hist.size(0) >= 2, op, ": a ring history (flags ",
              kFlagRing, ") must be on ", param.device(), " with at least 2 rows, got ",
              hist.sizes(), " on ", hist.device());
  TORCH_CHECK(error.has_value(), op, ": a ring history (flags ", kFlagRing,
              ") needs an error word (its coverage is checked on the device)");
}

void sparse_adamw_cuda(const at::Tensor& param, const at::Tensor& indices, const at::Tensor& values,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const at::Tensor& step, const at::Tensor& last_step, const at::Tensor& hist,
                       const at::Tensor& qpow, const at::Tensor& hyper, int64_t hist_base,
                       int64_t epoch, int64_t window, bool exact,
                       const std::optional<at::Tensor>& stats,
                       const std::optional<at::Tensor>& error, int64_t flags) {
  const char* op = "lvopt::sparse_adamw_";
  check_hyper_layout(op, param, hyper);
  check_sparse_adamw_args(op, c10::DeviceType::CUDA, param, indices, values, exp_avg, exp_avg_sq,
                          step, host_checkable_hyper(hyper), stats);
  check_sparse_error(op, error, param);
  check_flags(op, flags, exact, param, hist, error);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = indices.contiguous();
  const int64_t d = param.size(1);
  if (!error.has_value()) raise_for_ids(op, idx, param.size(0));
  Clock host_view{};
  if (exact) {
    host_view = check_sparse_clock(op, param, last_step, hist, qpow, host_checkable_hyper(hyper),
                                   hist_base, epoch, window);
    if (!error.has_value()) {
      // host read: the step count, for a call that raises (no error word given).
      const int64_t target = static_cast<int64_t>(read_step(step));
      raise_for_clock(op, last_step, idx, host_view, target);
    }
  }
  const at::Tensor err = error_word(error, param);
  const StepSource src = step_source(step, hyper);
  DeviceClock dck;
  if (exact) dck = device_clock(host_view, hist, qpow, param.device(), (flags & kFlagRing) != 0);
  const at::Tensor info =
      setup(idx, param.size(0), src, /*step_op=*/true, exact, dck.ck, err, stream);
  if (stats.has_value()) stats->zero_();
  if (step.device().is_cpu()) write_step(step, src.step_host + 1.0);  // a host counter: not gated
  const int64_t n = idx.numel();
  if (n > 0 && d > 0) {
    const DevicePlan plan = plan_rows(idx, param.size(0), d, stream, (flags & kFlagCoalesced) != 0);
    const at::Tensor vals = values.contiguous();
    at::Tensor row_stats;
    double* rs = nullptr;
    if (stats.has_value()) {
      row_stats = at::zeros({n, 2}, param.options().dtype(at::kDouble));
      rs = row_stats.data_ptr<double>();
    }
    const ExactState xs =
        exact ? exact_state(last_step, plan, dck.ck, info, err, stream) : ExactState{};
    const StepInfo* ip = reinterpret_cast<const StepInfo*>(info.data_ptr());
    const auto run = [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const RowArgs<T> a = table_args<T>(plan, err, ip, param, exp_avg, exp_avg_sq, vals.data_ptr(),
                                         exact ? last_step.data_ptr<int64_t>() : nullptr);
      sum_long_runs(a, plan, stream);
      if (exact) {
        if (rs)
          launch_rows<T, true, true, true>(a, dck.ck, xs.rows, rs, n, stream);
        else
          launch_rows<T, true, true, false>(a, dck.ck, xs.rows, rs, n, stream);
      } else {
        if (rs)
          launch_rows<T, false, true, true>(a, dck.ck, xs.rows, rs, n, stream);
        else
          launch_rows<T, false, true, false>(a, dck.ck, xs.rows, rs, n, stream);
      }
    };
    if (param.scalar_type() == at::kFloat)
      run(static_cast<float*>(nullptr));
    else
      run(static_cast<uint16_t*>(nullptr));
    if (rs != nullptr) {
      row_stats_kernel<<<1, 32, 0, stream>>>(rs, plan.num_runs.data_ptr<int64_t>(),
                                             err.data_ptr<int64_t>(), stats->data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!step.device().is_cpu()) {
    finish_kernel<<<1, 1, 0, stream>>>(src.step_f32 != nullptr ? step.data_ptr<float>() : nullptr,
                                       src.step_f64 != nullptr ? step.data_ptr<double>() : nullptr,
                                       err.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void sparse_catchup_cuda(const at::Tensor& param, const at::Tensor& indices,
                         const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& step, const at::Tensor& last_step,
                         const at::Tensor& hist, const at::Tensor& qpow, const at::Tensor& hyper,
                         int64_t hist_base, int64_t epoch, int64_t window,
                         const std::optional<at::Tensor>& error, int64_t flags) {
  const char* op = "lvopt::sparse_catchup_";
  check_hyper_layout(op, param, hyper);
  check_sparse_table(op, c10::DeviceType::CUDA, param, exp_avg, exp_avg_sq, step,
                     host_checkable_hyper(hyper));
  check_sparse_indices(op, indices, param);
  check_sparse_error(op, error, param);
  check_flags(op, flags, true, param, hist, error);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = indices.contiguous();
  const Clock host_view = check_sparse_clock(op, param, last_step, hist, qpow,
                                             host_checkable_hyper(hyper), hist_base, epoch, window);
  if (!error.has_value()) {
    raise_for_ids(op, idx, param.size(0));
    // host read: the step count, for a call that raises (no error word given).
    raise_for_clock(op, last_step, idx, host_view, static_cast<int64_t>(read_step(step)));
  }
  const int64_t n = idx.numel(), d = param.size(1);
  const at::Tensor err = error_word(error, param);
  const DeviceClock dck =
      device_clock(host_view, hist, qpow, param.device(), (flags & kFlagRing) != 0);
  const at::Tensor info = setup(idx, param.size(0), step_source(step, hyper), /*step_op=*/false,
                                true, dck.ck, err, stream);
  if (n == 0 || d == 0) return;
  const DevicePlan plan = plan_rows(idx, param.size(0), d, stream, (flags & kFlagCoalesced) != 0);
  const ExactState xs = exact_state(last_step, plan, dck.ck, info, err, stream);
  const StepInfo* ip = reinterpret_cast<const StepInfo*>(info.data_ptr());
  const auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RowArgs<T> a = table_args<T>(plan, err, ip, param, exp_avg, exp_avg_sq, nullptr,
                                       last_step.data_ptr<int64_t>());
    launch_rows<T, true, false, false>(a, dck.ck, xs.rows, nullptr, n, stream);
  };
  if (param.scalar_type() == at::kFloat)
    run(static_cast<float*>(nullptr));
  else
    run(static_cast<uint16_t*>(nullptr));
}

}  // namespace
}  // namespace cuda
}  // namespace lvopt

TORCH_LIBRARY_IMPL(lvopt, CUDA, m) {
  m.impl("coalesce_rows", &lvopt::cuda::coalesce_rows_cuda);
  m.impl("sparse_adamw_", &lvopt::cuda::sparse_adamw_cuda);
  m.impl("sparse_catchup_", &lvopt::cuda::sparse_catchup_cuda);
}
