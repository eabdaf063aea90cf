// Sparse embedding rows on CUDA (docs/design.md section 2.3; this plan is section 2.3.3): lvopt::coalesce_rows, sparse_adamw_
// (lazy and exact) and sparse_catchup_, with the semantics and checks of the CPU kernels
// (csrc/cpu/sparse_rows.cpp; the checks are lvopt/sparse_args.h, shared with them).
//
// Plan (the model is FBGEMM's row-wise backward: sort the ids, one block per distinct row):
//  * The ids are sorted by a stable sort (at::sort, stable=true) and run-length encoded
//    (unique_consecutive): rows[u] and the input positions perm[offsets[u] .. offsets[u+1])
//    of its duplicates, in input order.
//  * One block per distinct row. Each thread owns fixed columns of the row (16-byte vectors
//    when the row and every gradient row are aligned), sums that row's gradient rows in input
//    order in fp32 and applies math.h's per-element step: the bits of an element depend on
//    neither the block schedule nor the number of SMs, and equal the CPU kernel's for rows
//    given at most kRun = 32 times. A longer run (a frequent token) is first cut into pieces
//    of 32 rows summed by blocks of their own, as FBGEMM splits long segments, so that one
//    row does not serialise the step; its sum is then the in-order sum of its pieces.
//  * Exact mode: a first kernel (one thread per distinct row) snapshots each row's last step and
//    computes its catch-up scalars (sparse_clock.h Clock::row, fp64, on the device copy of the
//    step history). The row kernel catches behind rows up by the series (math.h), after a scan
//    of the row's v; a row with an element that needs the exact windowed loop (rare) is left
//    to a third kernel that does it element by element (Clock::term in fp64). The fp64 code
//    stays out of the streaming kernel, whose register count stays that of a plain AdamW row.
//  * stats (track=True): per-row fp64 sums by the block's fixed tree, then one warp adds the
//    rows in a fixed lane order (deterministic, no atomics).
// Bytes: 4*N*d of gradient rows read (N ids) plus 24*U*d for p, m, v of the U distinct rows
// (fp32), the CPU kernel's count; plus the sort of N int64 ids.
// Host synchronisations: the id range check, the distinct-row count, and in exact mode the
// touched rows' last_step range: a sparse step sizes its launch from the data (as
// torch.optim.SparseAdam's coalesce() does), so it is not CUDA-graph capturable.
#include <ATen/TensorOperators.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/unique_consecutive.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

#include "lvopt/sparse_args.h"
#include "lvopt/sparse_clock.h"
#include "multi_tensor.cuh"

namespace lvopt {
namespace cuda {
namespace {

// The distinct rows of the ids (sorted), the start of each row's run in perm (U + 1 entries),
// and perm: input positions sorted stably by id.
struct DevicePlan {
  at::Tensor rows, offsets, perm;
  int64_t u = 0;
};

// Raises, naming the first offending position, when an id is negative or >= num_rows (one
// host read of the ids' range; the position only on the error path).
void check_id_range(const char* op, const at::Tensor& idx, int64_t num_rows) {
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  const at::Tensor range = at::stack({lo, hi}).cpu();
  const int64_t mn = range.data_ptr<int64_t>()[0], mx = range.data_ptr<int64_t>()[1];
  if (mn < 0) {
    const int64_t pos = at::nonzero(idx < 0)[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": negative index ", idx[pos].item<int64_t>(), " at position ", pos);
  }
  if (mx >= num_rows) {
    const int64_t pos = at::nonzero(idx >= num_rows)[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": index ", idx[pos].item<int64_t>(), " at position ", pos,
                " is out of range for a table of ", num_rows, " rows");
  }
}

DevicePlan plan_rows(const at::Tensor& idx) {
  DevicePlan plan;
  const auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  plan.perm = std::get<1>(sorted);
  const auto runs = at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/false,
                                           /*return_counts=*/true);
  plan.rows = std::get<0>(runs);
  plan.u = plan.rows.numel();
  plan.offsets = at::cat({at::zeros({1}, idx.options()), at::cumsum(std::get<2>(runs), 0)});
  return plan;
}

// A row given more than kRun times (the head of a Zipf batch: the most frequent id of 16,384
// Zipf(1.1) draws comes ~1,500 times) would make its block read its gradient rows one after
// the other while the rest of the grid has long finished. Its run is cut into pieces of kRun
// rows, one block each (partial_sums_kernel, in input order), and the row's block adds the
// pieces in order: a fixed grouping, so the bits stay deterministic; they equal the CPU
// kernel's (one sequential sum) for every row given at most kRun times.
constexpr int64_t kRun = 32;

struct RunSplit {
  at::Tensor start;  // [U]: first piece of each long row (rows given <= kRun times: unused)
  at::Tensor owner;  // [parts]: the distinct row of each piece
  at::Tensor sums;   // [parts, d] fp32
  int64_t parts = 0;
};

// One host read (the number of pieces), to size the pieces' launch and buffer.
RunSplit split_long_runs(const DevicePlan& plan, int64_t d) {
  RunSplit out;
  if (plan.u == 0) return out;
  const at::Tensor counts = plan.offsets.slice(0, 1) - plan.offsets.slice(0, 0, plan.u);
  const at::Tensor pieces = at::where(counts > kRun, at::floor_divide(counts + (kRun - 1), kRun),
                                      at::zeros_like(counts));
  const at::Tensor ends = at::cumsum(pieces, 0);
  out.parts = ends[plan.u - 1].item<int64_t>();
  if (out.parts == 0) return out;
  out.start = ends - pieces;
  // Row k repeated pieces[k] times. (Spelled with arange as the repeated tensor: the one-tensor
  // form at::repeat_interleave(pieces, parts) binds to the (self, int repeats) overload and
  // repeats the piece counts themselves, which sent pieces to the wrong rows.)
  out.owner = at::arange(plan.u, counts.options()).repeat_interleave(pieces, /*dim=*/0, out.parts);
  out.sums = at::empty({out.parts, d}, plan.rows.options().dtype(at::kFloat));
  return out;
}

// Pointers of one launch (the kernels' arguments).
template <typename T>
struct RowArgs {
  T* p;              // [V, d] table
  float* m;
  float* v;
  const T* vals;     // [N, d] gradient rows as given (nullptr: catch-up only)
  const int64_t* rows, *offsets, *perm;
  const float* partials;      // [parts, d] sums of kRun gradient rows each (long runs only)
  const int64_t* part_start;  // [U] first partial of a row given more than kRun times
  int64_t* last;     // last_step (exact mode), else nullptr
  int64_t d;
  int64_t target;    // exact: bring rows current to this step (the step before the update)
  int64_t new_last;  // exact: last_step after the call
  bool vec;          // every row start (table and gradient rows) is 16-byte aligned
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
      x[0] = load_one(src, 0);
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

template <typename T>
__global__ void __launch_bounds__(kThreads)
    partial_sums_kernel(const RowArgs<T> a, const int64_t* __restrict__ owner,
                        const int64_t* __restrict__ start, float* __restrict__ sums) {
  const int64_t q = blockIdx.x;
  const int64_t k = owner[q];
  const int64_t lo = a.offsets[k] + (q - start[k]) * kRun;
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
                                            int64_t end, bool behind, const CatchupRow& cr,
                                            const AdamCoef& c, double (&sums)[2]) {
  const int64_t r = a.rows[k];
  T* p = a.p + r * a.d;
  float* m = a.m + r * a.d;
  float* v = a.v + r * a.d;
  const int64_t lo = kStep ? a.offsets[k] : 0, hi = kStep ? a.offsets[k + 1] : 0;
  for (int64_t j = first + static_cast<int64_t>(threadIdx.x) * N; j < end; j += kThreads * N) {
    float pf[N], gf[N], mf[N], vf[N], w0[N];
    if constexpr (N == 1) {
      pf[0] = load_one(p, j);
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
      store_one(p, j, pf[0]);
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
__device__ __forceinline__ bool row_needs_loop(const RowArgs<T>& a, int64_t k, const CatchupRow& cr) {
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

// Exact mode, one thread per distinct row k: its last step s (a snapshot: the row kernel moves
// the clock) and, when the row is behind, its catch-up scalars (sparse_clock.h, fp64 on the
// device copy of the history). A kernel of its own, so that the fp64 exp/pow code does not
// raise the register count of the streaming kernel.
__global__ void __launch_bounds__(128)
    catchup_scalars_kernel(const int64_t* __restrict__ rows, const int64_t* __restrict__ last,
                           int64_t u, const Clock ck, int64_t target,
                           int64_t* __restrict__ row_last, CatchupRow* __restrict__ row_cr) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= u) return;
  const int64_t s = last[rows[k]];
  row_last[k] = s;
  if (s < target) row_cr[k] = ck.row(s, target);
}

// The per-row inputs of exact mode: the snapshot of last_step and the catch-up scalars of each
// distinct row, and the list of rows left to the loop kernel (count, then row numbers k).
struct ExactRows {
  const int64_t* last;
  const CatchupRow* cr;
  int32_t* loop_count;
  int64_t* loop_rows;
};

// One block per distinct row k: sparse_adamw_ (kStep) or sparse_catchup_ (!kStep; exact only).
// A behind row with an element that needs the exact loop is left untouched and appended to the
// loop list (its order there is the schedule's; each listed row is then done by one block of
// loop_rows_kernel, so the bits do not depend on it).
template <typename T, bool kExact, bool kStep, bool kTrack>
__global__ void __launch_bounds__(kThreads)
    sparse_rows_kernel(const RowArgs<T> a, const AdamCoef c, const ExactRows ex,
                       double* __restrict__ row_stats) {
  const int64_t k = blockIdx.x;
  bool behind = false;
  CatchupRow cr{};
  if constexpr (kExact) {
    behind = ex.last[k] < a.target;
    if (!kStep && !behind) return;  // a catch-up of a current row: nothing to do
    if (behind) {
      cr = ex.cr[k];
      if (row_needs_loop(a, k, cr)) {
        if (threadIdx.x == 0) ex.loop_rows[atomicAdd(ex.loop_count, 1)] = k;
        return;
      }
    }
  }
  double sums[2] = {0.0, 0.0};
  constexpr int N = VecWidth<T>::value;
  int64_t done = 0;
  if (a.vec) {
    done = a.d / N * N;
    row_columns<T, N, kStep, kTrack>(a, k, 0, done, behind, cr, c, sums);
  }
  row_columns<T, 1, kStep, kTrack>(a, k, done, a.d, behind, cr, c, sums);
  if constexpr (kTrack) block_sum_to<2>(sums, row_stats + 2 * k);
  if constexpr (kExact) {
    if (threadIdx.x == 0) a.last[a.rows[k]] = a.new_last;
  }
}

// The rows sparse_rows_kernel listed, one block each, element by element: the series where
// they serve, the exact windowed loop (fp64, Clock::term on the device history) where not,
// then the step. Launched with one block per distinct row; blocks past the list's end return.
template <typename T, bool kStep, bool kTrack>
__global__ void __launch_bounds__(kThreads)
    loop_rows_kernel(const RowArgs<T> a, const AdamCoef c, const ExactRows ex, const Clock ck,
                     double* __restrict__ row_stats) {
  if (static_cast<int32_t>(blockIdx.x) >= *ex.loop_count) return;
  const int64_t k = ex.loop_rows[blockIdx.x];
  const int64_t s = ex.last[k];
  const CatchupRow cr = ex.cr[k];
  const int64_t r = a.rows[k];
  T* p = a.p + r * a.d;
  float* m = a.m + r * a.d;
  float* v = a.v + r * a.d;
  const int64_t lo = kStep ? a.offsets[k] : 0, hi = kStep ? a.offsets[k + 1] : 0;
  const auto term = [&](int64_t j, double& w, double& aj) { ck.term(s, a.target, s + 1 + j, w, aj); };
  double sums[2] = {0.0, 0.0};
  for (int64_t j = threadIdx.x; j < a.d; j += kThreads) {
    float pi = load_one(p, j), mi = m[j], vi = v[j];
    const float w0 = pi;
    if (!catchup_element(pi, mi, vi, cr)) {
      catchup_element_loop(pi, mi, vi, cr, ck.window_end(s, a.target) - s, term);
    }
    if constexpr (kStep) {
      float g[1];
      row_grad<T, 1>(a, k, lo, hi, j, g);
      adamw_element(pi, g[0], mi, vi, c);
    }
    store_one(p, j, pi);
    m[j] = mi;
    v[j] = vi;
    if constexpr (kTrack) track(w0, stored_value(p, pi), sums);
  }
  if constexpr (kTrack) block_sum_to<2>(sums, row_stats + 2 * k);
  if (threadIdx.x == 0) a.last[r] = a.new_last;
}

// One warp: stats = the per-row sums added by lane (row % 32) in row order, then the fixed
// xor tree of warp_sum.
__global__ void row_stats_kernel(const double* __restrict__ row_stats, int64_t u,
                                 double* __restrict__ stats) {
  double x[2] = {0.0, 0.0};
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
      store_one(out + k * a.d, j, g[0]);
    } else {
      store_vec(out + k * a.d + j, g);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) coalesce_kernel(const RowArgs<T> a, T* __restrict__ out) {
  constexpr int N = VecWidth<T>::value;
  const int64_t k = blockIdx.x;
  int64_t done = 0;
  if (a.vec) {
    done = a.d / N * N;
    coalesce_columns<T, N>(a, k, out, 0, done);
  }
  coalesce_columns<T, 1>(a, k, out, done, a.d);
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
RowArgs<T> row_args(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                    const at::Tensor* vals, const DevicePlan& plan, int64_t* last) {
  RowArgs<T> a{};
  a.p = reinterpret_cast<T*>(param.data_ptr());
  a.m = exp_avg.data_ptr<float>();
  a.v = exp_avg_sq.data_ptr<float>();
  a.vals = vals != nullptr ? reinterpret_cast<const T*>(vals->data_ptr()) : nullptr;
  a.rows = plan.rows.data_ptr<int64_t>();
  a.offsets = plan.offsets.data_ptr<int64_t>();
  a.perm = plan.perm.data_ptr<int64_t>();
  a.last = last;
  a.d = param.size(1);
  a.vec = rows_vectorisable<T>(a.p, a.m, a.v, a.vals, a.d);
  return a;
}

// Points the launch at the pieces of its long runs and sums them (before the row kernel).
template <typename T>
void sum_long_runs(RowArgs<T>& a, const RunSplit& split, cudaStream_t stream) {
  if (split.parts == 0) return;
  a.partials = split.sums.data_ptr<float>();
  a.part_start = split.start.data_ptr<int64_t>();
  partial_sums_kernel<T><<<static_cast<unsigned>(split.parts), kThreads, 0, stream>>>(
      a, split.owner.data_ptr<int64_t>(), split.start.data_ptr<int64_t>(), split.sums.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
              op, ": values must be a float32/bfloat16 tensor on ", indices.device(),
              " of shape [", indices.numel(), ", width], got ", values.scalar_type(), " ",
              values.sizes());
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  check_id_range(op, idx, num_rows);
  const at::Tensor vals = values.contiguous();
  const DevicePlan plan = plan_rows(idx);
  const int64_t d = vals.size(1);
  at::Tensor out = at::empty({plan.u, d}, vals.options());
  if (plan.u == 0 || d == 0) return {plan.rows, out};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RunSplit split = split_long_runs(plan, d);
  // The table is the output here: its pointer stands in for p, m and v in the alignment test.
  const auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    RowArgs<T> a{};
    a.vals = reinterpret_cast<const T*>(vals.data_ptr());
    a.rows = plan.rows.data_ptr<int64_t>();
    a.offsets = plan.offsets.data_ptr<int64_t>();
    a.perm = plan.perm.data_ptr<int64_t>();
    a.d = d;
    a.vec = rows_vectorisable<T>(out.data_ptr(), out.data_ptr(), out.data_ptr(), a.vals, d);
    sum_long_runs(a, split, stream);
    coalesce_kernel<T><<<static_cast<unsigned>(plan.u), kThreads, 0, stream>>>(
        a, reinterpret_cast<T*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vals.scalar_type() == at::kFloat) launch(static_cast<float*>(nullptr));
  else launch(static_cast<uint16_t*>(nullptr));
  return {plan.rows, out};
}

// The exact-mode clock on the device: hist and qpow copied there when given on the host.
struct DeviceClock {
  Clock ck{};
  at::Tensor hist, qpow;  // keep the device copies alive until the launch is queued
};

DeviceClock device_clock(const Clock& host_view, const at::Tensor& hist, const at::Tensor& qpow,
                         const c10::Device dev) {
  DeviceClock out;
  out.hist = hist.device() == dev ? hist : hist.to(dev);
  out.qpow = qpow.device() == dev ? qpow : qpow.to(dev);
  out.ck = host_view;
  out.ck.hist = out.hist.data_ptr<double>();
  out.ck.qpow = out.qpow.data_ptr<double>();
  return out;
}

// The touched rows' last_step range (one host read), checked against the clock.
void check_rows_clock(const char* op, const at::Tensor& last_step, const DevicePlan& plan,
                      const Clock& ck, int64_t target) {
  int64_t lo = target, hi = ck.base;
  if (plan.u > 0) {
    const auto [mn, mx] = at::aminmax(at::index_select(last_step, 0, plan.rows));
    const at::Tensor range = at::stack({mn, mx}).cpu();
    lo = range.data_ptr<int64_t>()[0];
    hi = range.data_ptr<int64_t>()[1];
  }
  check_sparse_rows_clock(op, lo, hi, ck, target);
}

// The per-row inputs of exact mode (ExactRows) and the tensors that hold them.
struct ExactState {
  at::Tensor last, cr, loop;  // [u] int64; [u] CatchupRow; [1 + u] int64 (count, rows)
  ExactRows rows{};
};

ExactState exact_state(const at::Tensor& last_step, const DevicePlan& plan, const Clock& ck,
                       int64_t target, cudaStream_t stream) {
  ExactState out;
  out.last = at::empty({plan.u}, last_step.options());
  out.cr = at::empty({plan.u * static_cast<int64_t>(sizeof(CatchupRow))},
                     last_step.options().dtype(at::kByte));
  out.loop = at::zeros({plan.u + 1}, last_step.options());
  out.rows.last = out.last.data_ptr<int64_t>();
  out.rows.cr = reinterpret_cast<const CatchupRow*>(out.cr.data_ptr());
  out.rows.loop_count = reinterpret_cast<int32_t*>(out.loop.data_ptr<int64_t>());
  out.rows.loop_rows = out.loop.data_ptr<int64_t>() + 1;
  catchup_scalars_kernel<<<static_cast<unsigned>((plan.u + 127) / 128), 128, 0, stream>>>(
      plan.rows.data_ptr<int64_t>(), last_step.data_ptr<int64_t>(), plan.u, ck, target,
      out.last.data_ptr<int64_t>(), reinterpret_cast<CatchupRow*>(out.cr.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The row kernel, then (exact mode) the loop kernel for the rows it listed.
template <typename T, bool kExact, bool kStep, bool kTrack>
void launch_rows(const RowArgs<T>& a, const Clock& ck, const AdamCoef& c, const ExactRows& ex,
                 double* row_stats, int64_t u, cudaStream_t stream) {
  sparse_rows_kernel<T, kExact, kStep, kTrack><<<static_cast<unsigned>(u), kThreads, 0, stream>>>(
      a, c, ex, row_stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (kExact) {
    loop_rows_kernel<T, kStep, kTrack><<<static_cast<unsigned>(u), kThreads, 0, stream>>>(
        a, c, ex, ck, row_stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void sparse_adamw_cuda(const at::Tensor& param, const at::Tensor& indices, const at::Tensor& values,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                       const at::Tensor& last_step, const at::Tensor& hist, const at::Tensor& qpow,
                       const at::Tensor& hyper, int64_t hist_base, int64_t epoch, int64_t window,
                       bool exact, const std::optional<at::Tensor>& stats) {
  const char* op = "lvopt::sparse_adamw_";
  check_sparse_adamw_args(op, c10::DeviceType::CUDA, param, indices, values, exp_avg, exp_avg_sq, step,
                          hyper, stats);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor idx = indices.contiguous();
  check_id_range(op, idx, param.size(0));
  const DevicePlan plan = plan_rows(idx);
  const double t = read_step(step) + 1.0;
  const int64_t ti = static_cast<int64_t>(t);
  DeviceClock dck;
  if (exact) {
    const Clock host_view =
        check_sparse_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
    check_rows_clock(op, last_step, plan, host_view, ti - 1);
    dck = device_clock(host_view, hist, qpow, param.device());
  }
  // Every check has passed: from here on, writes.
  write_step(step, t);
  if (stats.has_value()) stats->zero_();
  if (plan.u == 0 || param.size(1) == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const AdamCoef coef = make_adam_coef(hyper.data_ptr<double>(), t);
  const at::Tensor vals = values.contiguous();
  at::Tensor row_stats;
  double* rs = nullptr;
  if (stats.has_value()) {
    row_stats = at::empty({plan.u, 2}, param.options().dtype(at::kDouble));
    rs = row_stats.data_ptr<double>();
  }
  const ExactState xs = exact ? exact_state(last_step, plan, dck.ck, ti - 1, stream) : ExactState{};
  const RunSplit split = split_long_runs(plan, param.size(1));
  const auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    RowArgs<T> a = row_args<T>(param, exp_avg, exp_avg_sq, &vals, plan,
                               exact ? last_step.data_ptr<int64_t>() : nullptr);
    a.target = ti - 1;
    a.new_last = ti;
    sum_long_runs(a, split, stream);
    if (exact) {
      if (rs) launch_rows<T, true, true, true>(a, dck.ck, coef, xs.rows, rs, plan.u, stream);
      else launch_rows<T, true, true, false>(a, dck.ck, coef, xs.rows, rs, plan.u, stream);
    } else {
      if (rs) launch_rows<T, false, true, true>(a, dck.ck, coef, xs.rows, rs, plan.u, stream);
      else launch_rows<T, false, true, false>(a, dck.ck, coef, xs.rows, rs, plan.u, stream);
    }
  };
  if (param.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<uint16_t*>(nullptr));
  if (rs != nullptr) {
    row_stats_kernel<<<1, 32, 0, stream>>>(rs, plan.u, stats->data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void sparse_catchup_cuda(const at::Tensor& param, const at::Tensor& indices,
                         const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& step, const at::Tensor& last_step, const at::Tensor& hist,
                         const at::Tensor& qpow, const at::Tensor& hyper, int64_t hist_base,
                         int64_t epoch, int64_t window) {
  const char* op = "lvopt::sparse_catchup_";
  check_sparse_table(op, c10::DeviceType::CUDA, param, exp_avg, exp_avg_sq, step, hyper);
  check_sparse_indices(op, indices, param);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor idx = indices.contiguous();
  check_id_range(op, idx, param.size(0));
  const Clock host_view =
      check_sparse_clock(op, param, last_step, hist, qpow, hyper, hist_base, epoch, window);
  const DevicePlan plan = plan_rows(idx);
  const int64_t c = static_cast<int64_t>(read_step(step));
  check_rows_clock(op, last_step, plan, host_view, c);
  if (plan.u == 0 || param.size(1) == 0) return;
  const DeviceClock dck = device_clock(host_view, hist, qpow, param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ExactState xs = exact_state(last_step, plan, dck.ck, c, stream);
  const auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    RowArgs<T> a = row_args<T>(param, exp_avg, exp_avg_sq, nullptr, plan,
                               last_step.data_ptr<int64_t>());
    a.target = c;
    a.new_last = c;
    launch_rows<T, true, false, false>(a, dck.ck, AdamCoef{}, xs.rows, nullptr, plan.u, stream);
  };
  if (param.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<uint16_t*>(nullptr));
}

}  // namespace
}  // namespace cuda
}  // namespace lvopt

TORCH_LIBRARY_IMPL(lvopt, CUDA, m) {
  m.impl("coalesce_rows", &lvopt::cuda::coalesce_rows_cuda);
  m.impl("sparse_adamw_", &lvopt::cuda::sparse_adamw_cuda);
  m.impl("sparse_catchup_", &lvopt::cuda::sparse_catchup_cuda);
}
