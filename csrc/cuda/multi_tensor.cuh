// Multi-tensor plumbing shared by the CUDA step kernels (csrc/cuda/fused_adam*.cu).
//
// Launch plan (our variant of apex/PyTorch multi_tensor_apply):
//  * Every non-empty tensor is cut into fixed chunks of kChunk elements; one block per chunk.
//  * The tensors of one launch travel in the kernel arguments (LaunchTable, < 4 KiB, passed as
//    a __grid_constant__ so the kernel reads it from the constant bank and never copies it to
//    local memory). apex puts a block->(tensor, chunk) map of at most 320 blocks in the
//    arguments; we put only the per-tensor first block there and let each block find its
//    tensor by a uniform binary search over at most kTensorsPerLaunch entries (6 constant
//    loads). So the grid size is unbounded: one 64M-element tensor is one launch of 4096
//    blocks, and the number of launches is ceil(tensors / 64) per dtype.
//  * Per-tensor coefficients (bias corrections from the step count, hyperparameters) are
//    computed ON THE DEVICE by a small advance kernel that also increments device step
//    counters, and stored in a device array of TensorState that the step kernels read. With
//    device-resident hyper table, steps and radii nothing is copied from the host and nothing
//    waits for the device: the step is capturable in a CUDA graph, and a tensor-valued lr
//    enters by writing the lr column of the device hyper table on the device before the op
//    (hyper[:, 0].copy_(lr_tensor)); no kernel changes.
//  * A host (CPU) hyper table, CPU step counters or CPU radii (what lvopt.optim passes today)
//    are validated on the host exactly as the CPU kernel validates them, then reach the device
//    as one small copy (hyper) or as values in the advance kernel's arguments (steps, radii).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "lvopt/math.h"
#include "lvopt/step_args.h"

namespace lvopt {
namespace cuda {

constexpr int kThreads = 256;
// Elements per block. 16 Ki elements = 64 KiB per fp32 stream: 4096 blocks for a 64M tensor
// (about 31 per SM on an H100, so the last wave is a small fraction of the step), and 16
// float4 iterations per thread. A multiple of 8, so chunk starts keep 16-byte alignment.
constexpr int64_t kChunk = 16384;
// 60 entries of 64 bytes keep a LaunchTable under the 4 KiB argument limit (64 entries did
// before AMSGrad's vmax pointer grew an entry from 56 to 64 bytes).
constexpr int kTensorsPerLaunch = 60;
constexpr int kAdvancePerLaunch = 112;

struct TensorEntry {
  void* p;
  const void* g;
  float* m;
  float* v;
  float* vmax;          // AMSGrad's running maximum of v (nullptr without amsgrad)
  int64_t numel;
  int32_t block_start;  // first block of this tensor in its launch
  int32_t chunk_start;  // global index of its first chunk (AdamH partial sums)
  int32_t index;        // position in the op's tensor lists (TensorState, stats)
  int32_t pad_;
};

struct LaunchTable {
  int32_t count;
  int32_t blocks;
  TensorEntry t[kTensorsPerLaunch];
};
// The classic kernel-argument limit (CUDA 12.1+ allows 32 KiB on sm_70+, but 4 KiB keeps the
// launch small and portable).
static_assert(sizeof(LaunchTable) <= 4096, "kernel arguments are limited to 4 KiB");

// Per-tensor device state of one step, written by advance_kernel.
struct TensorState {
  AdamCoef coef;
  float scale_a, scale_b;  // AdamH pass 2: W <- a*W - b*u (written by the finalize kernel)
  double lr, radius;
  int32_t first_chunk, n_chunks;
  // 1 when found_inf was set before the step (nonfinite="skip"/"raise"): every kernel of the
  // step leaves this tensor alone and its step counter was not advanced.
  int32_t skip;
  int32_t pad_;
};

enum : int32_t { kStepF32 = 0, kStepF64 = 1, kStepHost = 2, kRadiusDevice = 0, kRadiusHost = 4 };

struct AdvanceSlot {
  union {
    void* ptr;
    double value;  // the already incremented host step
  } step;
  union {
    const double* ptr;
    double value;
  } radius;
  int32_t first_chunk, n_chunks;
  int32_t kind;  // kStep* | kRadius*
  int32_t pad_;
};

struct AdvanceTable {
  int32_t base, count;
  AdvanceSlot s[kAdvancePerLaunch];
};
static_assert(sizeof(AdvanceTable) <= 4096, "kernel arguments are limited to 4 KiB");

// Increments device step counters (float32 as the CPU kernel does: s += 1 in the counter's
// precision) and derives each tensor's coefficients in fp64 with the shared math.
// static: this header is included by several translation units.
// With found_inf (device flag of nonfinite="skip"/"raise", set by the scan launched before),
// a set flag leaves every device counter as it is and marks every tensor skipped: the decision
// is taken here, on the device, with no host read (capturable).
// With advance = false the counters are read, not incremented: the coefficients of the step
// they hold (the second op of a step split in two, fused_adamh_apply_).
static __global__ void advance_kernel(const __grid_constant__ AdvanceTable tab,
                                      const double* __restrict__ hyper,
                                      TensorState* __restrict__ st, bool unit_step,
                                      const float* __restrict__ found, bool advance) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= tab.count) return;
  const AdvanceSlot& s = tab.s[i];
  const bool skip = found != nullptr && *found != 0.0f;
  double step;
  const int32_t step_kind = s.kind & 3;
  if (step_kind == kStepF32) {
    float* sp = static_cast<float*>(s.step.ptr);
    const float x = advance ? *sp + 1.0f : *sp;
    if (advance && !skip) *sp = x;
    step = x;
  } else if (step_kind == kStepF64) {
    double* sp = static_cast<double*>(s.step.ptr);
    const double x = advance ? *sp + 1.0 : *sp;
    if (advance && !skip) *sp = x;
    step = x;
  } else {
    step = s.step.value;
  }
  const int t = tab.base + i;
  const double* row = hyper + static_cast<int64_t>(t) * kHyperCols;
  AdamCoef c = make_adam_coef(row, step);
  if (unit_step) c = unit_lr(c, row, step);
  TensorState out;
  out.coef = c;
  out.scale_a = 1.0f;
  out.scale_b = 0.0f;
  out.lr = row[kLr];
  out.radius = (s.kind & kRadiusHost) ? s.radius.value : (s.radius.ptr ? *s.radius.ptr : 0.0);
  out.first_chunk = s.first_chunk;
  out.n_chunks = s.n_chunks;
  out.skip = skip ? 1 : 0;
  out.pad_ = 0;
  st[t] = out;
}

__device__ __forceinline__ int find_entry(const LaunchTable& tab, int block) {
  int lo = 0, hi = tab.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.t[mid].block_start <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// 16-byte vectors: 4 fp32 or 8 bf16 parameters per load; moments are always fp32, so a bf16
// vector step moves two float4 of m and of v.
template <typename T>
struct VecWidth;
template <>
struct VecWidth<float> {
  static constexpr int value = 4;
};
template <>
struct VecWidth<uint16_t> {
  static constexpr int value = 8;
};

template <int N>
__device__ __forceinline__ void load_f32(const float* p, float (&x)[N]) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    const float4 a = reinterpret_cast<const float4*>(p)[k];
    x[4 * k] = a.x;
    x[4 * k + 1] = a.y;
    x[4 * k + 2] = a.z;
    x[4 * k + 3] = a.w;
  }
}

template <int N>
__device__ __forceinline__ void store_f32(float* p, const float (&x)[N]) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    reinterpret_cast<float4*>(p)[k] =
        make_float4(x[4 * k], x[4 * k + 1], x[4 * k + 2], x[4 * k + 3]);
  }
}

__device__ __forceinline__ void load_vec(const float* p, float (&x)[4]) { load_f32<4>(p, x); }
__device__ __forceinline__ void store_vec(float* p, const float (&x)[4]) { store_f32<4>(p, x); }

__device__ __forceinline__ void load_vec(const uint16_t* p, float (&x)[8]) {
  const uint4 a = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    x[2 * k] = bf16_to_float(static_cast<uint16_t>(w[k] & 0xFFFFu));
    x[2 * k + 1] = bf16_to_float(static_cast<uint16_t>(w[k] >> 16));
  }
}

__device__ __forceinline__ void store_vec(uint16_t* p, const float (&x)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    w[k] = static_cast<uint32_t>(float_to_bf16(x[2 * k])) |
           (static_cast<uint32_t>(float_to_bf16(x[2 * k + 1])) << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// One element (scalar paths): load_elem, store_elem of lvopt/math.h.

// The telemetry sums of one element (W_after as stored: lvopt::stored_value of math.h):
// sums[0] += W_before^2, sums[1] += (W_after - W_before)^2, in fp64.
__device__ __forceinline__ void track(float w0, float w1, double (&sums)[2]) {
  const double d = static_cast<double>(w1) - static_cast<double>(w0);
  sums[0] += static_cast<double>(w0) * static_cast<double>(w0);
  sums[1] += d * d;
}

__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c,
                                          const void* d) {
  return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
           reinterpret_cast<uintptr_t>(c) | reinterpret_cast<uintptr_t>(d)) &
          15u) == 0;
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions (AdamH's norms, AdamW's telemetry): each thread sums its own
// elements in a fixed order, a block adds its threads by a fixed xor-shuffle tree and its
// warps in order into one partial per chunk, and one warp per tensor adds the chunk partials
// by a fixed lane assignment and tree. No atomics: the bits depend on neither the schedule nor
// the number of SMs.

constexpr unsigned kFullMask = 0xFFFFFFFFu;

template <int K>
__device__ __forceinline__ void warp_sum(double (&x)[K]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int j = 0; j < K; ++j) x[j] += __shfl_xor_sync(kFullMask, x[j], off);
  }
}

// The block's sums of x[0..K) (one value per thread each) go to out[0..K), written by
// threads 0..K-1. Every thread of the block must call it.
template <int K>
__device__ __forceinline__ void block_sum_to(double (&x)[K], double* __restrict__ out) {
  warp_sum<K>(x);
  __shared__ double sh[K][kThreads / 32];
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int j = 0; j < K; ++j) sh[j][warp] = x[j];
  }
  __syncthreads();
  if (threadIdx.x < K) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += sh[threadIdx.x][w];
    out[threadIdx.x] = s;
  }
}

// One warp per tensor (blockDim 32): the sums of its chunks' K-column partials, in x on
// every lane.
template <int K>
__device__ __forceinline__ void sum_chunk_partials(const TensorState& s,
                                                   const double* __restrict__ partials,
                                                   double (&x)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) x[j] = 0.0;
  for (int k = threadIdx.x; k < s.n_chunks; k += 32) {
    const double* q = partials + K * (static_cast<int64_t>(s.first_chunk) + k);
#pragma unroll
    for (int j = 0; j < K; ++j) x[j] += q[j];
  }
  warp_sum<K>(x);
}

// One thread's share of a non-finite scan of x[0, n): elements first, first + stride, ... (in
// 16-byte vectors when x is aligned, then the scalar tail). True if one is NaN or infinite.
template <typename T>
__device__ __forceinline__ bool thread_nonfinite(const T* __restrict__ x, int64_t n, int64_t first,
                                                 int64_t stride) {
  constexpr int N = VecWidth<T>::value;
  bool bad = false;
  int64_t done = 0;
  if (aligned16(x, x, x, x)) {
    done = n / N * N;
    for (int64_t i = first * N; i < done; i += stride * N) {
      float xf[N];
      load_vec(x + i, xf);
#pragma unroll
      for (int k = 0; k < N; ++k) bad |= !isfinite(xf[k]);
    }
  }
  for (int64_t i = done + first; i < n; i += stride) bad |= !isfinite(load_elem(x, i));
  return bad;
}

// Sets *found to 1 when an element of the launch's gradients is NaN or infinite (the scan of
// nonfinite="skip"/"raise"; reads g only, 16-byte loads). Every writer writes the same value.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    nonfinite_kernel(const __grid_constant__ LaunchTable tab, float* __restrict__ found) {
  const TensorEntry& e = tab.t[find_entry(tab, blockIdx.x)];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - e.block_start) * kChunk;
  const int64_t n = min(kChunk, e.numel - begin);
  const bool bad = thread_nonfinite(static_cast<const T*>(e.g) + begin, n, threadIdx.x, kThreads);
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found = 1.0f;
}

// ---------------------------------------------------------------------------------------------
// Host side.

using ::lvopt::StepArgs;
// The checks are lvopt/step_args.h's, shared with the CPU kernels.
inline void check_step_args(const char* op, const StepArgs& a) {
  ::lvopt::check_step_args(op, a, c10::DeviceType::CUDA);
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Global chunk numbering in tensor order (AdamH's partial sums are indexed by it).
inline std::vector<int32_t> first_chunks(at::TensorList params, int64_t* total) {
  std::vector<int32_t> first(params.size());
  int64_t c = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    first[i] = static_cast<int32_t>(c);
    c += chunks_of(params[i].numel());
    TORCH_CHECK(c < INT32_MAX, "lvopt: more than 2^31 chunks of ", kChunk, " elements in one step");
  }
  *total = c;
  return first;
}

// Increments host step counters (after all checks), launches the advance kernel(s) for device
// ones, and returns the device TensorState array (n entries) and the device hyper table.
// advance = false: the counters are only read (see advance_kernel).
inline at::Tensor advance_steps(const StepArgs& a, at::TensorList radii, bool unit_step,
                                const std::vector<int32_t>& first, cudaStream_t stream,
                                at::Tensor* hyper_dev,
                                const std::optional<at::Tensor>& found_inf = std::nullopt,
                                bool advance = true) {
  const int64_t n = static_cast<int64_t>(a.params.size());
  const auto dev = a.params[0].device();
  // host copy: a hyper table given on the host (a direct call of the op); the optimizer passes
  // its cached device table (lvopt/optim.py), so a step makes no copy here.
  *hyper_dev =
      a.hyper.device().is_cpu() ? a.hyper.to(dev, at::kDouble, /*non_blocking=*/true) : a.hyper;
  at::Tensor st = at::empty({n * static_cast<int64_t>(sizeof(TensorState))},
                            a.params[0].options().dtype(at::kByte));
  for (int64_t base = 0; base < n; base += kAdvancePerLaunch) {
    AdvanceTable tab{};
    tab.base = static_cast<int32_t>(base);
    tab.count = static_cast<int32_t>(std::min<int64_t>(kAdvancePerLaunch, n - base));
    for (int k = 0; k < tab.count; ++k) {
      const int64_t i = base + k;
      AdvanceSlot& s = tab.s[k];
      const at::Tensor& step = a.steps[i];
      int32_t kind;
      if (step.device().is_cpu()) {
        double x;
        if (step.scalar_type() == at::kFloat) {
          float* sp = step.data_ptr<float>();
          if (advance) *sp += 1.0f;
          x = *sp;
        } else {
          double* sp = step.data_ptr<double>();
          if (advance) *sp += 1.0;
          x = *sp;
        }
        s.step.value = x;
        kind = kStepHost;
      } else {
        s.step.ptr = step.data_ptr();
        kind = step.scalar_type() == at::kFloat ? kStepF32 : kStepF64;
      }
      if (!radii.empty() && radii[i].device().is_cpu()) {
        s.radius.value = radii[i].data_ptr<double>()[0];
        kind |= kRadiusHost;
      } else {
        s.radius.ptr = radii.empty() ? nullptr : radii[i].data_ptr<double>();
      }
      s.kind = kind;
      s.first_chunk = first[i];
      s.n_chunks = static_cast<int32_t>(chunks_of(a.params[i].numel()));
    }
    advance_kernel<<<(tab.count + 127) / 128, 128, 0, stream>>>(
        tab, hyper_dev->data_ptr<double>(), reinterpret_cast<TensorState*>(st.data_ptr()),
        unit_step, found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr, advance);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return st;
}

// Calls launch(table) for the non-empty tensors of dtype `dtype`, at most kTensorsPerLaunch
// per table, in tensor order.
template <typename Launch>
void for_each_launch(const StepArgs& a, at::ScalarType dtype, const std::vector<int32_t>& first,
                     const Launch& launch, at::TensorList vmax = {}) {
  LaunchTable tab{};
  int64_t blocks = 0;
  auto flush = [&]() {
    if (tab.count == 0) return;
    tab.blocks = static_cast<int32_t>(blocks);
    launch(tab);
    tab = LaunchTable{};
    blocks = 0;
  };
  for (size_t i = 0; i < a.params.size(); ++i) {
    const at::Tensor& p = a.params[i];
    if (p.scalar_type() != dtype || p.numel() == 0) continue;
    const int64_t nb = chunks_of(p.numel());
    if (tab.count == kTensorsPerLaunch || blocks + nb > INT32_MAX) flush();
    TensorEntry& e = tab.t[tab.count++];
    e.p = p.data_ptr();
    e.g = a.grads[i].data_ptr();
    e.m = a.exp_avgs[i].data_ptr<float>();
    e.v = a.exp_avg_sqs[i].data_ptr<float>();
    e.vmax = vmax.empty() ? nullptr : vmax[i].data_ptr<float>();
    e.numel = p.numel();
    e.block_start = static_cast<int32_t>(blocks);
    e.chunk_start = first[i];
    e.index = static_cast<int32_t>(i);
    blocks += nb;
  }
  flush();
}

// The optional found_inf argument: a one-element float32 tensor on the parameters' device.
inline void check_found_inf(const char* op, const std::optional<at::Tensor>& found_inf,
                            const StepArgs& a) {
  if (!found_inf.has_value()) return;
  const at::Tensor& f = *found_inf;
  TORCH_CHECK(f.defined() && f.scalar_type() == at::kFloat && f.numel() == 1 &&
                  (a.params.empty() || f.device() == a.params[0].device()),
              op,
              ": found_inf must be a one-element float32 tensor on the parameters' device, got ",
              f.scalar_type(), " ", f.sizes(), " on ", f.device());
}

// nonfinite="skip"/"raise": scans every gradient into found_inf on the device. With every step
// counter on the device (lvopt.optim keeps them there for CUDA parameters), nothing is read
// back: the advance kernel sees the flag and marks the step skipped (TensorState::skip), and
// returns false. Only when a counter lives on the host (an old checkpoint's layout) is the flag
// read back, one host synchronisation, since a host counter can only advance from the host.
// Returns true when the step must write nothing (found_inf was set, here or by an earlier op).
inline bool stop_for_nonfinite(const StepArgs& a, const std::vector<int32_t>& first,
                               const std::optional<at::Tensor>& found_inf, cudaStream_t stream) {
  if (!found_inf.has_value()) return false;
  float* found = found_inf->data_ptr<float>();
  for_each_launch(a, at::kFloat, first, [&](const LaunchTable& tab) {
    nonfinite_kernel<float><<<tab.blocks, kThreads, 0, stream>>>(tab, found);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for_each_launch(a, at::kBFloat16, first, [&](const LaunchTable& tab) {
    nonfinite_kernel<uint16_t><<<tab.blocks, kThreads, 0, stream>>>(tab, found);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  bool host_step = false;
  for (const at::Tensor& s : a.steps) host_step = host_step || s.device().is_cpu();
  return host_step && found_inf->item<float>() != 0.0f;
}

}  // namespace cuda
}  // namespace lvopt
