// Fused multi-tensor AdamW on CUDA (docs/design.md section 2.1): one advance launch (step counters,
// bias corrections) and one step launch per dtype per 64 tensors, for all groups at once.
// Bytes per element: fp32 28 (read p, g, m, v; write p, m, v), bf16 params/grads 20.
// The per-element math is lvopt::adamw_element of csrc/include/lvopt/math.h, as on the CPU.
// found_inf (nonfinite="skip"/"raise"): a scan launch over the gradients first (+4 B/element
// fp32); the advance kernel reads the flag on the device and a set flag makes every kernel
// leave its tensor alone (multi_tensor.cuh, stop_for_nonfinite; a host read only for host
// step counters). max_exp_avg_sqs (AMSGrad): the kAms instances, +8 B/element.
// stats (track=True): the step kernel's kTrack instance also sums W^2 and (dW)^2 per chunk
// (deterministic block tree), and one warp per tensor adds its chunks.
#include <torch/library.h>

#include "multi_tensor.cuh"

namespace lvopt {
namespace cuda {
namespace {

template <typename T, bool kTrack, bool kAms>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ LaunchTable tab, const TensorState* __restrict__ st,
                 double* __restrict__ partials) {
  const TensorEntry& e = tab.t[find_entry(tab, blockIdx.x)];
  // A skipped step (found_inf set): the whole block leaves; adamw_stats_kernel writes zeros.
  if (st[e.index].skip) return;
  const int64_t chunk = blockIdx.x - e.block_start;
  const int64_t begin = chunk * kChunk;
  const int64_t n = min(kChunk, e.numel - begin);
  const AdamCoef c = st[e.index].coef;
  T* __restrict__ p = static_cast<T*>(e.p) + begin;
  const T* __restrict__ g = static_cast<const T*>(e.g) + begin;
  float* __restrict__ m = e.m + begin;
  float* __restrict__ v = e.v + begin;
  float* __restrict__ x = kAms ? e.vmax + begin : nullptr;
  constexpr int N = VecWidth<T>::value;
  double sums[2] = {0.0, 0.0};  // kTrack: W_before^2, (W_after - W_before)^2
  int64_t done = 0;
  if (aligned16(p, g, m, v) && (!kAms || aligned16(x, x, x, x))) {
    done = n / N * N;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * N; i < done; i += kThreads * N) {
      float pf[N], gf[N], mf[N], vf[N], w0[N], xf[N];
      load_vec(p + i, pf);
      load_vec(g + i, gf);
      load_f32<N>(m + i, mf);
      load_f32<N>(v + i, vf);
      if constexpr (kAms) load_f32<N>(x + i, xf);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if constexpr (kTrack) w0[k] = pf[k];
        if constexpr (kAms) {
          adamw_amsgrad_element(pf[k], gf[k], mf[k], vf[k], xf[k], c);
        } else {
          adamw_element(pf[k], gf[k], mf[k], vf[k], c);
        }
      }
      store_f32<N>(m + i, mf);
      store_f32<N>(v + i, vf);
      if constexpr (kAms) store_f32<N>(x + i, xf);
      store_vec(p + i, pf);
      if constexpr (kTrack) {
#pragma unroll
        for (int k = 0; k < N; ++k) track(w0[k], stored_value(p, pf[k]), sums);
      }
    }
  }
  // Scalar tail (n not a multiple of the vector width) or a misaligned tensor (a view with a
  // storage offset): one element per thread.
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    const StepPair w = adamw_element_at<kAms>(p, g, m, v, x, i, c);
    if constexpr (kTrack) track(w.before, w.after, sums);
  }
  if constexpr (kTrack)
    block_sum_to<2>(sums, partials + 2 * (static_cast<int64_t>(e.chunk_start) + chunk));
}

// One warp per tensor: stats[i] = its chunks' telemetry sums.
__global__ void adamw_stats_kernel(const TensorState* __restrict__ st,
                                   const double* __restrict__ partials,
                                   double* __restrict__ stats) {
  double x[2];
  sum_chunk_partials<2>(st[blockIdx.x], partials, x);
  if (st[blockIdx.x].skip) x[0] = x[1] = 0.0;  // no chunk wrote its partials
  if (threadIdx.x == 0) {
    stats[2 * static_cast<int64_t>(blockIdx.x)] = x[0];
    stats[2 * static_cast<int64_t>(blockIdx.x) + 1] = x[1];
  }
}

template <typename T, bool kTrack>
void launch_adamw(const StepArgs& args, at::ScalarType dtype, const std::vector<int32_t>& first,
                  const TensorState* state, double* partials, cudaStream_t stream,
                  at::TensorList vmax) {
  for_each_launch(
      args, dtype, first,
      [&](const LaunchTable& tab) {
        if (vmax.empty()) {
          adamw_kernel<T, kTrack, false><<<tab.blocks, kThreads, 0, stream>>>(tab, state, partials);
        } else {
          adamw_kernel<T, kTrack, true><<<tab.blocks, kThreads, 0, stream>>>(tab, state, partials);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      vmax);
}

void fused_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& stats,
                      std::optional<at::TensorList> max_exp_avg_sqs) {
  const char* op = "lvopt::fused_adamw_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  const at::TensorList vmax =
      ::lvopt::check_amsgrad_args(op, args, max_exp_avg_sqs) ? *max_exp_avg_sqs : at::TensorList{};
  check_found_inf(op, found_inf, args);
  const int64_t n = static_cast<int64_t>(params.size());
  if (stats.has_value()) {
    const at::Tensor& s = *stats;
    TORCH_CHECK(s.defined() && s.scalar_type() == at::kDouble && s.dim() == 2 && s.size(0) == n &&
                    s.size(1) == 2 && s.is_contiguous() &&
                    (n == 0 || s.device() == params[0].device()),
                op, ": stats must be a contiguous float64 tensor of shape [", n,
                ", 2] on the parameters' device, got ", s.scalar_type(), " ", s.sizes(), " on ",
                s.device());
  }
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t total_chunks = 0;
  const std::vector<int32_t> first = first_chunks(params, &total_chunks);
  if (stats.has_value()) stats->zero_();
  if (stop_for_nonfinite(args, first, found_inf, stream)) return;
  at::Tensor hyper_dev;
  const at::Tensor st =
      advance_steps(args, {}, /*unit_step=*/false, first, stream, &hyper_dev, found_inf);
  const auto* state = reinterpret_cast<const TensorState*>(st.data_ptr());
  if (!stats.has_value()) {
    launch_adamw<float, false>(args, at::kFloat, first, state, nullptr, stream, vmax);
    launch_adamw<uint16_t, false>(args, at::kBFloat16, first, state, nullptr, stream, vmax);
    return;
  }
  // Every chunk's slot is written by its block, so no zero fill is needed.
  at::Tensor partials =
      at::empty({std::max<int64_t>(total_chunks, 1) * 2}, params[0].options().dtype(at::kDouble));
  launch_adamw<float, true>(args, at::kFloat, first, state, partials.data_ptr<double>(), stream,
                            vmax);
  launch_adamw<uint16_t, true>(args, at::kBFloat16, first, state, partials.data_ptr<double>(),
                               stream, vmax);
  adamw_stats_kernel<<<static_cast<unsigned>(n), 32, 0, stream>>>(
      state, partials.data_ptr<double>(), stats->data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// lvopt::nonfinite_scan_ on CUDA: one grid-stride launch per tensor (any layout that is dense;
// the pre-scan of a step's other batches and of sparse gradient values). No synchronisation.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scan_kernel(const T* __restrict__ x, int64_t n, float* __restrict__ found) {
  const bool bad = thread_nonfinite(x, n, static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x,
                                    static_cast<int64_t>(gridDim.x) * kThreads);
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found = 1.0f;
}

void nonfinite_scan_cuda(at::TensorList tensors, const at::Tensor& found_inf) {
  const char* op = "lvopt::nonfinite_scan_";
  TORCH_CHECK(
      found_inf.is_cuda() && found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1, op,
      ": found_inf must be a one-element float32 CUDA tensor, got ", found_inf.scalar_type(), " ",
      found_inf.sizes(), " on ", found_inf.device());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == found_inf.device() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) &&
                    t.is_non_overlapping_and_dense(),
                op, ": tensors[", i, "] must be a dense float32/bfloat16 tensor on ",
                found_inf.device(), ", got ", t.scalar_type(), " on ", t.device());
  }
  const c10::cuda::CUDAGuard guard(found_inf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const at::Tensor& t : tensors) {
    const int64_t n = t.numel();
    if (n == 0) continue;
    const unsigned blocks =
        static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
    if (t.scalar_type() == at::kFloat) {
      scan_kernel<float>
          <<<blocks, kThreads, 0, stream>>>(t.data_ptr<float>(), n, found_inf.data_ptr<float>());
    } else {
      scan_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(
          reinterpret_cast<const uint16_t*>(t.data_ptr()), n, found_inf.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace cuda
}  // namespace lvopt

TORCH_LIBRARY_IMPL(lvopt, CUDA, m) {
  m.impl("fused_adamw_", &lvopt::cuda::fused_adamw_cuda);
  m.impl("nonfinite_scan_", &lvopt::cuda::nonfinite_scan_cuda);
}
