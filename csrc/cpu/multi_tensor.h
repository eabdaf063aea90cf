// Multi-tensor plumbing shared by the CPU step kernels: argument checks that run before
// anything is written, the fixed chunk plan, and element loads/stores for fp32 and bf16.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "isa.h"
#include "lvopt/math.h"
#include "lvopt/step_args.h"

namespace lvopt {
namespace cpu {

// Elements per work item. Fixed (not derived from the thread count) so that the partial
// sums of AdamH's reduction, taken per chunk in a fixed order, give the same bits for any
// number of threads. 64 Ki fp32 elements = 256 KiB per stream, 1.75 MiB over AdamW's 7
// streams: long enough for the hardware prefetchers, short enough to balance 148 tensors.
constexpr int64_t kChunk = int64_t{1} << 16;

struct Chunk {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

// Chunks of every tensor, in tensor order; tensors with no elements contribute none.
std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels);

// Runs fn(chunk, k) over all chunks (k: the chunk's index, for per-chunk partial sums) in one
// parallel region. Each thread takes a contiguous range of chunks, so each streams through
// contiguous memory.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) fn(chunks[k], k);
  });
}

// The tensors of one multi-tensor step and their checks: lvopt/step_args.h (shared with CUDA).
using ::lvopt::StepArgs;
inline void check_step_args(const char* op, const StepArgs& a) {
  ::lvopt::check_step_args(op, a, c10::DeviceType::CPU);
}

// Per-tensor coefficients for this step; increments each step counter (after all checks).
// The new step numbers go to *steps_out when it is given.
std::vector<AdamCoef> advance_steps(const StepArgs& a, std::vector<double>* steps_out = nullptr);

// The coefficients of the step the counters hold now, without incrementing them (the second
// op of a step split in two: fused_adamh_apply_ after fused_adamh_reduce_).
std::vector<AdamCoef> current_coefs(const StepArgs& a, std::vector<double>* steps_out = nullptr);

// Element loads and stores (fp32 / bf16 storage as fp32): load_elem, store_elem of lvopt/math.h.

// AdamW over n contiguous elements: parameters of storage type T (float or bf16 bits),
// gradients of storage type G (T for the dense step, float for a summed sparse row). The one
// AdamW loop of the CPU kernels; each caller compiles it per ISA (LVOPT_ISA_DISPATCH).
template <typename T, typename G>
LVOPT_ALWAYS_INLINE void adamw_span(T* __restrict p, const G* __restrict g, float* __restrict m,
                                    float* __restrict v, int64_t n, const AdamCoef& c) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = load_elem(p, i);
    float mi = m[i], vi = v[i];
    adamw_element(pi, load_elem(g, i), mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    store_elem(p, i, pi);
  }
}

// adamw_span with AMSGrad: the running maximum vmax of v (fp32, laid out like m and v) is
// read and written too (+8 B/element).
template <typename T>
LVOPT_ALWAYS_INLINE void adamw_span_ams(T* __restrict p, const T* __restrict g, float* __restrict m,
                                        float* __restrict v, float* __restrict vmax, int64_t n,
                                        const AdamCoef& c) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = load_elem(p, i);
    float mi = m[i], vi = v[i], xi = vmax[i];
    adamw_amsgrad_element(pi, load_elem(g, i), mi, vi, xi, c);
    m[i] = mi;
    v[i] = vi;
    vmax[i] = xi;
    store_elem(p, i, pi);
  }
}

// Telemetry lanes: like AdamH's reductions, element i of a span sums into lane i mod 16 and
// the lanes are added in order, so the bits do not depend on the ISA (the dense step's lanes
// take fp32 partials of 16 squares first, below; the sparse rows' lanes are fp64 throughout).
constexpr int kTrackLanes = 16;

// adamw_span that also returns, in out[0..1], the sums of W^2 (W before the step) and of
// (W_after - W_before)^2 over the span, W as stored: fp32 partials of 16 squares per lane,
// then fp64 lanes (below). The telemetry of `track=True`; the
// untracked loop above stays the hot path.
template <typename T, typename G, bool kAms = false>
LVOPT_ALWAYS_INLINE void adamw_tracked_element(T* __restrict p, const G* __restrict g,
                                               float* __restrict m, float* __restrict v, int64_t i,
                                               const AdamCoef& c, float& ww, float& dd,
                                               float* __restrict vmax = nullptr) {
  const StepPair w = adamw_element_at<kAms>(p, g, m, v, vmax, i, c);
  const float d = w.after - w.before;
  ww += w.before * w.before;
  dd += d * d;
}

// Elements per fp32 partial: each of the kTrackLanes lanes adds 16 squares in fp32 (relative
// error <= 16 * 2^-24 = 1e-6) before they join the fp64 lane sums, so the telemetry costs a
// few fp32 vector operations per 16 elements.
constexpr int64_t kTrackBlock = 16 * kTrackLanes;

template <typename T, typename G, bool kAms = false>
LVOPT_ALWAYS_INLINE void adamw_span_tracked(T* __restrict p, const G* __restrict g,
                                            float* __restrict m, float* __restrict v, int64_t n,
                                            const AdamCoef& c, double* __restrict out,
                                            float* __restrict vmax = nullptr) {
  double ww[kTrackLanes] = {}, dd[kTrackLanes] = {};
  int64_t i = 0;
  for (; i + kTrackBlock <= n; i += kTrackBlock) {
    float fw[kTrackLanes] = {}, fd[kTrackLanes] = {};
    for (int64_t j = 0; j < kTrackBlock; j += kTrackLanes) {
      // Element i + j + l into lane l. ivdep: p, g, m, v do not overlap (restrict), which the
      // inlined loop no longer knows; without it the compiler re-checks aliasing every 16.
#pragma GCC ivdep
      for (int l = 0; l < kTrackLanes; ++l) {
        adamw_tracked_element<T, G, kAms>(p, g, m, v, i + j + l, c, fw[l], fd[l], vmax);
      }
    }
    for (int l = 0; l < kTrackLanes; ++l) {
      ww[l] += fw[l];
      dd[l] += fd[l];
    }
  }
  float fw[kTrackLanes] = {}, fd[kTrackLanes] = {};
  for (int l = 0; i < n; ++i, l = (l + 1) % kTrackLanes) {
    adamw_tracked_element<T, G, kAms>(p, g, m, v, i, c, fw[l], fd[l], vmax);
  }
  double s_ww = 0.0, s_dd = 0.0;
  for (int l = 0; l < kTrackLanes; ++l) {
    s_ww += ww[l] + static_cast<double>(fw[l]);
    s_dd += dd[l] + static_cast<double>(fd[l]);
  }
  out[0] = s_ww;
  out[1] = s_dd;
}

// Whether x holds a NaN or an infinity (exponent bits all ones), branch-free so it vectorises.
template <typename T>
LVOPT_ALWAYS_INLINE bool span_nonfinite(const T* __restrict x, int64_t n);
template <>
LVOPT_ALWAYS_INLINE bool span_nonfinite(const float* __restrict x, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>((u[i] & 0x7F800000u) == 0x7F800000u);
  return bad != 0;
}
template <>
LVOPT_ALWAYS_INLINE bool span_nonfinite(const uint16_t* __restrict x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>((x[i] & 0x7F80u) == 0x7F80u);
  return bad != 0;
}

// Whether any element of `tensors` (float32 or bfloat16, dense) is NaN or infinite: one
// parallel pass over fixed chunks. The gradient scan of nonfinite="skip"/"raise".
bool any_nonfinite(at::TensorList tensors);

// The optional found_inf argument of the step ops: a one-element float32 CPU tensor.
// Returns its data pointer (nullptr when absent).
float* check_found_inf(const char* op, const std::optional<at::Tensor>& found_inf);

// The optional stats output of the step ops: a contiguous float64 CPU tensor [n, cols],
// zeroed here. Returns its data pointer (nullptr when absent).
double* check_stats(const char* op, const std::optional<at::Tensor>& stats, size_t n, int cols);

// Adds per-chunk partial sums (cols per chunk) into out[tensor * cols + j], in chunk order:
// the same bits for any thread count.
void add_chunk_partials(const std::vector<Chunk>& chunks, const std::vector<double>& partial,
                        int cols, double* out);

// Raw storage type of a parameter dtype: float for fp32, uint16_t bits for bf16.
template <typename Fn>
void dispatch_param_dtype(at::ScalarType t, const Fn& fn) {
  if (t == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else {
    fn(static_cast<uint16_t*>(nullptr));
  }
}

}  // namespace cpu
}  // namespace lvopt
