// Fused multi-tensor AdamH on CUDA (docs/design.md section 2.2), two passes over the data:
//   advance : step counters and per-tensor coefficients (lr = 1 for u), on the device;
//   pass 1  : m, v update; u = (m/bc1)/(sqrt(v)/sqrt(bc2)+eps); per-chunk fp64 partial sums
//             (||u||^2, <W,u>, ||W||^2): read W, g, m, v; write m, v (24 B/param in fp32);
//   finalize: one warp per tensor adds its chunks' partials and computes the scales a, b;
//   pass 2  : W <- a*W - b*u with u recomputed from m, v: read W, m, v; write W (16 B/param).
// fused_adamh_ runs all four; fused_adamh_reduce_ (advance, pass 1, finalize) and
// fused_adamh_apply_ (advance without incrementing, scales from given sums, pass 2) split them
// for sharded tensors, whose sums are all-reduced between the two ops.
// Deterministic: each thread sums its own elements in a fixed order, a block adds its threads
// by a fixed xor-shuffle tree and its 8 warps in order, and the finalize warp adds chunk
// partials by a fixed lane assignment and tree; no atomics, so the bits depend on neither the
// schedule nor the number of SMs. (They differ from the CPU kernel's bits, which use another
// fixed order; both are compared with the fp64-accumulated reference.)
#include <torch/library.h>

#include "multi_tensor.cuh"

namespace lvopt {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamh_reduce_kernel(const __grid_constant__ LaunchTable tab, const TensorState* __restrict__ st,
                        double* __restrict__ partials) {
  const TensorEntry& e = tab.t[find_entry(tab, blockIdx.x)];
  if (st[e.index].skip) return;  // found_inf was set: nothing written (finalize writes zeros)
  const int64_t chunk = blockIdx.x - e.block_start;
  const int64_t begin = chunk * kChunk;
  const int64_t n = min(kChunk, e.numel - begin);
  const AdamCoef c = st[e.index].coef;
  const T* __restrict__ p = static_cast<const T*>(e.p) + begin;
  const T* __restrict__ g = static_cast<const T*>(e.g) + begin;
  float* __restrict__ m = e.m + begin;
  float* __restrict__ v = e.v + begin;
  constexpr int N = VecWidth<T>::value;
  double uu = 0.0, wu = 0.0, ww = 0.0;  // sums[0..2] below
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
      for (int k = 0; k < N; ++k) {
        adam_moments(c.grad_sign * gf[k], mf[k], vf[k], c);
        const double u = adam_update(mf[k], vf[k], c);
        const double w = pf[k];
        uu += u * u;
        wu += w * u;
        ww += w * w;
      }
      store_f32<N>(m + i, mf);
      store_f32<N>(v + i, vf);
    }
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    float mi = m[i], vi = v[i];
    adam_moments(c.grad_sign * load_elem(g, i), mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    const double u = adam_update(mi, vi, c);
    const double w = load_elem(p, i);
    uu += u * u;
    wu += w * u;
    ww += w * w;
  }
  double sums[3] = {uu, wu, ww};
  block_sum_to<3>(sums, partials + 3 * (static_cast<int64_t>(e.chunk_start) + chunk));
}

// One warp per tensor: lane l adds chunks l, l+32, ... in order, then a fixed tree.
__global__ void adamh_finalize_kernel(TensorState* __restrict__ st,
                                      const double* __restrict__ partials,
                                      double* __restrict__ stats) {
  TensorState& s = st[blockIdx.x];
  double x[3];
  sum_chunk_partials<3>(s, partials, x);
  if (s.skip) x[0] = x[1] = x[2] = 0.0;  // skipped: no chunk wrote partials; a = 1, b = 0
  if (threadIdx.x == 0) {
    double* out = stats + 3 * static_cast<int64_t>(blockIdx.x);
    out[0] = x[0];
    out[1] = x[1];
    out[2] = x[2];
    hyperball_scales_f32(s.lr, s.radius, x, s.scale_a, s.scale_b);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamh_apply_kernel(const __grid_constant__ LaunchTable tab,
                       const TensorState* __restrict__ st) {
  const TensorEntry& e = tab.t[find_entry(tab, blockIdx.x)];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - e.block_start) * kChunk;
  const int64_t n = min(kChunk, e.numel - begin);
  const TensorState& s = st[e.index];
  if (s.skip) return;
  const AdamCoef c = s.coef;
  const float a = s.scale_a, b = s.scale_b;
  T* __restrict__ p = static_cast<T*>(e.p) + begin;
  const float* __restrict__ m = e.m + begin;
  const float* __restrict__ v = e.v + begin;
  constexpr int N = VecWidth<T>::value;
  int64_t done = 0;
  if (aligned16(p, p, m, v)) {
    done = n / N * N;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * N; i < done; i += kThreads * N) {
      float pf[N], mf[N], vf[N];
      load_vec(p + i, pf);
      load_f32<N>(m + i, mf);
      load_f32<N>(v + i, vf);
#pragma unroll
      for (int k = 0; k < N; ++k) pf[k] = a * pf[k] - b * adam_update(mf[k], vf[k], c);
      store_vec(p + i, pf);
    }
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    store_elem(p, i, a * load_elem(p, i) - b * adam_update(m[i], v[i], c));
  }
}

// The scales of pass 2 from sums given to the op (fused_adamh_apply_): one thread per tensor.
__global__ void adamh_scales_kernel(TensorState* __restrict__ st, const double* __restrict__ sums,
                                    int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  TensorState& s = st[i];
  hyperball_scales_f32(s.lr, s.radius, sums + 3 * i, s.scale_a, s.scale_b);
}

// Pass 1 and the finalize kernel: the per-tensor sums into stats (and the scales into st).
void reduce_pass(const StepArgs& args, const std::vector<int32_t>& first, int64_t total_chunks,
                 TensorState* st, const at::Tensor& stats, cudaStream_t stream) {
  const auto f64 = args.params[0].options().dtype(at::kDouble);
  // Every chunk's slot is written by pass 1, so no zero fill is needed.
  at::Tensor partials = at::empty({std::max<int64_t>(total_chunks, 1) * 3}, f64);
  double* part = partials.data_ptr<double>();
  for_each_launch(args, at::kFloat, first, [&](const LaunchTable& tab) {
    adamh_reduce_kernel<float><<<tab.blocks, kThreads, 0, stream>>>(tab, st, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for_each_launch(args, at::kBFloat16, first, [&](const LaunchTable& tab) {
    adamh_reduce_kernel<uint16_t><<<tab.blocks, kThreads, 0, stream>>>(tab, st, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  adamh_finalize_kernel<<<static_cast<unsigned>(args.params.size()), 32, 0, stream>>>(
      st, part, stats.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 2 with the scales in st.
void apply_pass(const StepArgs& args, const std::vector<int32_t>& first, const TensorState* st,
                cudaStream_t stream) {
  for_each_launch(args, at::kFloat, first, [&](const LaunchTable& tab) {
    adamh_apply_kernel<float><<<tab.blocks, kThreads, 0, stream>>>(tab, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for_each_launch(args, at::kBFloat16, first, [&](const LaunchTable& tab) {
    adamh_apply_kernel<uint16_t><<<tab.blocks, kThreads, 0, stream>>>(tab, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor zero_stats(const StepArgs& args) {
  return at::empty({static_cast<int64_t>(args.params.size()), 3},
                   args.params[0].options().dtype(at::kDouble))
      .zero_();
}

// Pass 1 as fused_adamh_ and fused_adamh_reduce_ both run it: the gradient scan, the step
// advance (radii: the tensors' radii, or none), pass 1 and the finalize. Returns the per-tensor
// sums; *st_buf gets the tensors' state with the scales of pass 2, and stays undefined when a
// non-finite gradient stopped the step (then the sums are zeros and nothing was written).
at::Tensor reduce_step(const StepArgs& args, at::TensorList radii,
                       const std::optional<at::Tensor>& found_inf,
                       const std::vector<int32_t>& first, int64_t total_chunks, cudaStream_t stream,
                       at::Tensor* st_buf) {
  // Pass 1 writes the moments, so a non-finite gradient must be found before it (a scan of g).
  if (stop_for_nonfinite(args, first, found_inf, stream)) return zero_stats(args);
  at::Tensor hyper_dev;
  *st_buf = advance_steps(args, radii, /*unit_step=*/true, first, stream, &hyper_dev, found_inf);
  at::Tensor stats = at::empty({static_cast<int64_t>(args.params.size()), 3},
                               args.params[0].options().dtype(at::kDouble));
  reduce_pass(args, first, total_chunks, reinterpret_cast<TensorState*>(st_buf->data_ptr()), stats,
              stream);
  return stats;
}

at::Tensor fused_adamh_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList radii,
                            const at::Tensor& hyper, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  const size_t n = params.size();
  ::lvopt::check_hyperball_args(op, args, radii);
  check_found_inf(op, found_inf, args);
  if (n == 0) return at::empty({0, 3}, hyper.options());
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t total_chunks = 0;
  const std::vector<int32_t> first = first_chunks(params, &total_chunks);
  at::Tensor st_buf;
  at::Tensor stats = reduce_step(args, radii, found_inf, first, total_chunks, stream, &st_buf);
  if (st_buf.defined()) {
    apply_pass(args, first, reinterpret_cast<const TensorState*>(st_buf.data_ptr()), stream);
  }
  return stats;
}

at::Tensor fused_adamh_reduce_cuda(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                   at::TensorList steps, const at::Tensor& hyper,
                                   const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_reduce_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  ::lvopt::check_no_weight_decay(op, args);
  check_found_inf(op, found_inf, args);
  if (params.empty()) return at::empty({0, 3}, hyper.options());
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t total_chunks = 0;
  const std::vector<int32_t> first = first_chunks(params, &total_chunks);
  at::Tensor st_buf;
  return reduce_step(args, {}, found_inf, first, total_chunks, stream, &st_buf);
}

void fused_adamh_apply_cuda(at::TensorList params, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList radii,
                            const at::Tensor& hyper, const at::Tensor& sums,
                            const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_apply_";
  // Pass 2 reads no gradient: the parameters stand in for them in the shared checks.
  const StepArgs args{params, params, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  ::lvopt::check_hyperball_args(op, args, radii);
  ::lvopt::check_hyperball_sums(op, args, sums, c10::DeviceType::CUDA);
  check_found_inf(op, found_inf, args);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t total_chunks = 0;
  const std::vector<int32_t> first = first_chunks(params, &total_chunks);
  // A set flag marks every tensor skipped on the device (advance_kernel); only host counters
  // make the flag be read here, as in stop_for_nonfinite.
  bool host_step = false;
  for (const at::Tensor& s : steps) host_step = host_step || s.device().is_cpu();
  if (host_step && found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  at::Tensor hyper_dev;
  at::Tensor st_buf = advance_steps(args, radii, /*unit_step=*/true, first, stream, &hyper_dev,
                                    found_inf, /*advance=*/false);
  auto* st = reinterpret_cast<TensorState*>(st_buf.data_ptr());
  adamh_scales_kernel<<<static_cast<unsigned>((n + 127) / 128), 128, 0, stream>>>(
      st, sums.data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  apply_pass(args, first, st, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace lvopt

TORCH_LIBRARY_IMPL(lvopt, CUDA, m) {
  m.impl("fused_adamh_", &lvopt::cuda::fused_adamh_cuda);
  m.impl("fused_adamh_reduce_", &lvopt::cuda::fused_adamh_reduce_cuda);
  m.impl("fused_adamh_apply_", &lvopt::cuda::fused_adamh_apply_cuda);
}
