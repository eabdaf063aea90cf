// Fused multi-tensor AdamW on CUDA (DESIGN.md section 2): one advance launch (step counters,
// bias corrections) and one step launch per dtype per 64 tensors, for all groups at once.
// Bytes per element: fp32 28 (read p, g, m, v; write p, m, v), bf16 params/grads 20.
// The per-element math is lvopt::adamw_element of csrc/include/lvopt/math.h, as on the CPU.
#include <torch/library.h>

#include "multi_tensor.cuh"

namespace lvopt {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ LaunchTable tab, const TensorState* __restrict__ st) {
  const TensorEntry& e = tab.t[find_entry(tab, blockIdx.x)];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - e.block_start) * kChunk;
  const int64_t n = min(kChunk, e.numel - begin);
  const AdamCoef c = st[e.index].coef;
  T* __restrict__ p = static_cast<T*>(e.p) + begin;
  const T* __restrict__ g = static_cast<const T*>(e.g) + begin;
  float* __restrict__ m = e.m + begin;
  float* __restrict__ v = e.v + begin;
  constexpr int N = VecWidth<T>::value;
  int64_t done = 0;
  if (aligned16(p, g, m, v)) {
    done = n / N * N;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * N; i < done; i += kThreads * N) {
      float pf[N], gf[N], mf[N], vf[N];
      load_vec(p + i, pf);
      load_vec(g + i, gf);
      load_f32<N>(m + i, mf);
      load_f32<N>(v + i, vf);
#pragma unroll
      for (int k = 0; k < N; ++k) adamw_element(pf[k], gf[k], mf[k], vf[k], c);
      store_f32<N>(m + i, mf);
      store_f32<N>(v + i, vf);
      store_vec(p + i, pf);
    }
  }
  // Scalar tail (n not a multiple of the vector width) or a misaligned tensor (a view with a
  // storage offset): one element per thread.
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    float pi = load_one(p, i), mi = m[i], vi = v[i];
    adamw_element(pi, load_one(g, i), mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    store_one(p, i, pi);
  }
}

void fused_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper) {
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args("lvopt::fused_adamw_", args);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t total_chunks = 0;
  const std::vector<int32_t> first = first_chunks(params, &total_chunks);
  at::Tensor hyper_dev;
  const at::Tensor st = advance_steps(args, {}, /*unit_step=*/false, first, stream, &hyper_dev);
  const auto* state = reinterpret_cast<const TensorState*>(st.data_ptr());
  for_each_launch(args, at::kFloat, first, [&](const LaunchTable& tab) {
    adamw_kernel<float><<<tab.blocks, kThreads, 0, stream>>>(tab, state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for_each_launch(args, at::kBFloat16, first, [&](const LaunchTable& tab) {
    adamw_kernel<uint16_t><<<tab.blocks, kThreads, 0, stream>>>(tab, state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace lvopt

TORCH_LIBRARY_IMPL(lvopt, CUDA, m) { m.impl("fused_adamw_", &lvopt::cuda::fused_adamw_cuda); }
