// Fused multi-tensor AdamH on the CPU (docs/design.md section 2.2), two passes:
//   pass 1: m, v update; u = (m/bc1)/(sqrt(v)/sqrt(bc2)+eps); sums ||u||^2, <W,u>, ||W||^2
//           (read W, g, m, v; write m, v);
//   pass 2: W <- a*W - b*u (read W and u, or W, m, v to recompute u; write W).
// On this CPU a pass runs as fast as it reads (a written line is one already read, so its
// write-back overlaps), so fused_adamh_ keeps u from pass 1 in a workspace (workspace.h),
// written with non-temporal stores that read nothing: pass 1 reads 16 B/param and pass 2
// 8 B/param, against 16 + 12 when pass 2 recomputes u, and AdamW's 16 (benchmarks/RESULTS.md).
// Tensors are taken in batches whose u fit the workspace; a tensor larger than it, or a step
// that cannot have it, recomputes u in pass 2: the same fp32 value, so the same bits.
// fused_adamh_ runs both passes; fused_adamh_reduce_ (pass 1) and fused_adamh_apply_ (pass 2)
// are the same passes as two ops (recomputing u), for sharded tensors whose sums are
// all-reduced in between.
// Reductions are deterministic: each fixed chunk sums into 16 fp64 lanes (element i of the
// chunk into lane i mod 16) whatever the ISA, lanes are added in order, and chunk partials
// are added in chunk order, so the bits do not depend on the ISA, the thread count or the batches.
#include "ops.h"

#include <algorithm>

#include "multi_tensor.h"
#include "workspace.h"

#if LVOPT_X86_DISPATCH
#include <immintrin.h>
#endif

namespace lvopt {
namespace cpu {
namespace {

constexpr int kLanes = 16;

// Stores 16 floats at dst (64-byte aligned) without reading its line first (non-temporal
// stores; baseline x86-64 has them), so that keeping u costs its write and no read.
LVOPT_ALWAYS_INLINE void store16_streaming(float* __restrict dst, const float* __restrict src) {
#if LVOPT_X86_DISPATCH
  for (int k = 0; k < 16; k += 4) _mm_stream_ps(dst + k, _mm_loadu_ps(src + k));
#else
  for (int k = 0; k < 16; ++k) dst[k] = src[k];
#endif
}

// Pass 1 over one span. kKeep: also stores u at keep[0, n) (keep 64-byte aligned).
template <typename T, bool kFma, bool kKeep>
LVOPT_ALWAYS_INLINE void adamh_reduce_span(const T* __restrict p, const T* __restrict g,
                                           float* __restrict m, float* __restrict v, int64_t n,
                                           const AdamCoef& c, double* __restrict out,
                                           float* __restrict keep) {
  double uu[kLanes] = {}, wu[kLanes] = {}, ww[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    float ub[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      float mi = m[i + l], vi = v[i + l];
      adam_moments(c.grad_sign * load_elem(g, i + l), mi, vi, c);
      m[i + l] = mi;
      v[i + l] = vi;
      const float uf = adam_update(mi, vi, c);
      ub[l] = uf;
      const double u = uf;
      const double w = load_elem(p, i + l);
      uu[l] = add_exact_product<kFma>(uu[l], u, u);
      wu[l] = add_exact_product<kFma>(wu[l], w, u);
      ww[l] = add_exact_product<kFma>(ww[l], w, w);
    }
    if constexpr (kKeep) store16_streaming(keep + i, ub);
  }
  for (int l = 0; i < n; ++i, ++l) {
    float mi = m[i], vi = v[i];
    adam_moments(c.grad_sign * load_elem(g, i), mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    const float uf = adam_update(mi, vi, c);
    if constexpr (kKeep) keep[i] = uf;
    const double u = uf;
    const double w = load_elem(p, i);
    uu[l] = add_exact_product<kFma>(uu[l], u, u);
    wu[l] = add_exact_product<kFma>(wu[l], w, u);
    ww[l] = add_exact_product<kFma>(ww[l], w, w);
  }
#if LVOPT_X86_DISPATCH
  // The streamed lines reach memory before pass 2 reads them on another thread.
  if constexpr (kKeep) _mm_sfence();
#endif
  double s_uu = 0.0, s_wu = 0.0, s_ww = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    s_uu += uu[l];
    s_wu += wu[l];
    s_ww += ww[l];
  }
  out[0] = s_uu;
  out[1] = s_wu;
  out[2] = s_ww;
}

template <typename T>
LVOPT_ALWAYS_INLINE void adamh_apply_span(T* __restrict p, const float* __restrict m,
                                          const float* __restrict v, int64_t n, const AdamCoef& c,
                                          float a, float b) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = adam_update(m[i], v[i], c);
    store_elem(p, i, a * load_elem(p, i) - b * u);
  }
}

// Pass 2 with u kept by pass 1: the same expression on the same u, so the same bits.
template <typename T>
LVOPT_ALWAYS_INLINE void adamh_apply_kept_span(T* __restrict p, const float* __restrict u,
                                               int64_t n, float a, float b) {
  for (int64_t i = 0; i < n; ++i) store_elem(p, i, a * load_elem(p, i) - b * u[i]);
}

#define LVOPT_ADAMH_REDUCE(NAME, T, KEEP)                                                    \
  LVOPT_ISA_DISPATCH_FMA(NAME,                                                               \
                         (const T* p, const T* g, float* m, float* v, int64_t n,             \
                          const AdamCoef& c, double* out, float* keep),                      \
                         (p, g, m, v, n, c, out, keep), (adamh_reduce_span<T, false, KEEP>), \
                         (adamh_reduce_span<T, true, KEEP>))
LVOPT_ADAMH_REDUCE(adamh_reduce_f32, float, false)
LVOPT_ADAMH_REDUCE(adamh_reduce_bf16, uint16_t, false)
LVOPT_ADAMH_REDUCE(adamh_reduce_keep_f32, float, true)
LVOPT_ADAMH_REDUCE(adamh_reduce_keep_bf16, uint16_t, true)
#undef LVOPT_ADAMH_REDUCE
LVOPT_ISA_DISPATCH(adamh_apply_f32,
                   (float* p, const float* m, const float* v, int64_t n, const AdamCoef& c, float a,
                    float b),
                   (p, m, v, n, c, a, b), adamh_apply_span<float>)
LVOPT_ISA_DISPATCH(adamh_apply_bf16,
                   (uint16_t* p, const float* m, const float* v, int64_t n, const AdamCoef& c,
                    float a, float b),
                   (p, m, v, n, c, a, b), adamh_apply_span<uint16_t>)
LVOPT_ISA_DISPATCH(adamh_apply_kept_f32, (float* p, const float* u, int64_t n, float a, float b),
                   (p, u, n, a, b), adamh_apply_kept_span<float>)
LVOPT_ISA_DISPATCH(adamh_apply_kept_bf16,
                   (uint16_t* p, const float* u, int64_t n, float a, float b), (p, u, n, a, b),
                   adamh_apply_kept_span<uint16_t>)

// Where pass 1 keeps u: tensor t's u at base + offset[t] (each 64-byte aligned); base ==
// nullptr: not kept, pass 2 recomputes it.
struct Kept {
  float* base = nullptr;
  const int64_t* offset = nullptr;
  float* of(const Chunk& ch) const { return base + offset[ch.tensor] + ch.begin; }
};

// Pass 1 over the chunks (coef: this step's coefficients, lr = 1): updates m and v, keeps u
// where `kept` says, and adds the fp64 sums (||u||^2, <W,u>, ||W||^2 of W before the step) of
// each chunk's tensor into st ([n, 3], row-major, zero for these tensors before).
void reduce_pass(const StepArgs& a, const std::vector<AdamCoef>& coef,
                 const std::vector<Chunk>& chunks, const Kept& kept, double* st) {
  std::vector<double> partial(chunks.size() * 3);
  for_each_chunk(chunks, [&](const Chunk& ch, int64_t k) {
    const at::Tensor& p = a.params[ch.tensor];
    float* m = a.exp_avgs[ch.tensor].data_ptr<float>() + ch.begin;
    float* v = a.exp_avg_sqs[ch.tensor].data_ptr<float>() + ch.begin;
    const int64_t len = ch.end - ch.begin;
    const AdamCoef& c = coef[ch.tensor];
    double* out = &partial[3 * k];
    if (p.scalar_type() == at::kFloat) {
      const float* pp = p.data_ptr<float>() + ch.begin;
      const float* g = a.grads[ch.tensor].data_ptr<float>() + ch.begin;
      if (kept.base != nullptr) {
        adamh_reduce_keep_f32(pp, g, m, v, len, c, out, kept.of(ch));
      } else {
        adamh_reduce_f32(pp, g, m, v, len, c, out, nullptr);
      }
    } else {
      const uint16_t* pp = reinterpret_cast<const uint16_t*>(p.data_ptr()) + ch.begin;
      const uint16_t* g =
          reinterpret_cast<const uint16_t*>(a.grads[ch.tensor].data_ptr()) + ch.begin;
      if (kept.base != nullptr) {
        adamh_reduce_keep_bf16(pp, g, m, v, len, c, out, kept.of(ch));
      } else {
        adamh_reduce_bf16(pp, g, m, v, len, c, out, nullptr);
      }
    }
  });
  add_chunk_partials(chunks, partial, 3, st);
}

// Pass 2 over the chunks: W <- a*W - b*u with the scales of the sums st ([n, 3], row-major)
// and the radii; u from `kept`, or recomputed from m and v.
void apply_pass(const StepArgs& a, at::TensorList radii, const std::vector<AdamCoef>& coef,
                const std::vector<Chunk>& chunks, const Kept& kept, const double* st) {
  const size_t n = a.params.size();
  const double* hp = a.hyper.data_ptr<double>();
  std::vector<float> scale_a(n), scale_b(n);
  // Only the chunks' tensors (chunks are in tensor order): a batch's pass 2 scales its own.
  const size_t lo = chunks.empty() ? 0 : chunks.front().tensor;
  const size_t hi = chunks.empty() ? 0 : chunks.back().tensor + 1;
  for (size_t i = lo; i < hi; ++i) {
    hyperball_scales_f32(hp[i * kHyperCols + kLr], radii[i].data_ptr<double>()[0], st + 3 * i,
                         scale_a[i], scale_b[i]);
  }
  for_each_chunk(chunks, [&](const Chunk& ch, int64_t) {
    const at::Tensor& p = a.params[ch.tensor];
    const int64_t len = ch.end - ch.begin;
    const float sa = scale_a[ch.tensor], sb = scale_b[ch.tensor];
    const bool f32 = p.scalar_type() == at::kFloat;
    if (kept.base != nullptr) {
      const float* u = kept.of(ch);
      if (f32) {
        adamh_apply_kept_f32(p.data_ptr<float>() + ch.begin, u, len, sa, sb);
      } else {
        adamh_apply_kept_bf16(reinterpret_cast<uint16_t*>(p.data_ptr()) + ch.begin, u, len, sa, sb);
      }
      return;
    }
    const float* m = a.exp_avgs[ch.tensor].data_ptr<float>() + ch.begin;
    const float* v = a.exp_avg_sqs[ch.tensor].data_ptr<float>() + ch.begin;
    if (f32) {
      adamh_apply_f32(p.data_ptr<float>() + ch.begin, m, v, len, coef[ch.tensor], sa, sb);
    } else {
      adamh_apply_bf16(reinterpret_cast<uint16_t*>(p.data_ptr()) + ch.begin, m, v, len,
                       coef[ch.tensor], sa, sb);
    }
  });
}

std::vector<Chunk> chunks_of(at::TensorList params);

// Floats of workspace tensor t's kept u takes: its elements rounded up to 16 (64 bytes), so
// that every tensor's u starts 64-byte aligned.
int64_t kept_floats(int64_t numel) { return (numel + 15) / 16 * 16; }

// Steps with fewer elements than this recompute u. Their W, g, m, v (16 B/param, 64 MiB at
// the threshold) can stay in a server's last-level cache between the passes, so pass 2 reads
// m and v from cache, and streaming u out to memory and back would cost more than it saves
// (measured: a 1024x1024 step 0.99 ms with u kept against 0.80 recomputed; 4096x4096 30 against
// 36 ms: benchmarks/studies/adamh_passes.py).
constexpr int64_t kKeepMinElements = int64_t{1} << 22;

// Both passes over all tensors, in batches of consecutive tensors whose u fit the workspace
// (one batch, u recomputed, when it is off, too small for a tensor, busy, or the step small).
void two_passes(const StepArgs& a, at::TensorList radii, const std::vector<AdamCoef>& coef,
                double* st) {
  const std::vector<Chunk> chunks = chunks_of(a.params);
  const size_t n = a.params.size();
  int64_t elements = 0;
  for (const auto& p : a.params) elements += p.numel();
  const int64_t limit = elements < kKeepMinElements
                            ? 0
                            : workspace_limit_bytes() / static_cast<int64_t>(sizeof(float));
  // A batch ends before the tensor whose u would overflow the limit; offset[t]: where tensor
  // t's u starts in its batch's workspace. A batch over the limit (one tensor larger than it)
  // keeps nothing.
  struct Batch {
    size_t end;
    bool keep;
  };
  std::vector<Batch> batches;
  std::vector<int64_t> offset(n, 0);
  int64_t biggest = 0, filled = 0;
  for (size_t t = 0; t < n; ++t) {
    const int64_t f = kept_floats(a.params[t].numel());
    if (filled > 0 && filled + f > limit) {
      batches.push_back({t, filled <= limit});
      filled = 0;
    }
    offset[t] = filled;
    filled += f;
    if (filled <= limit) biggest = std::max(biggest, filled);
  }
  batches.push_back({n, filled <= limit});
  WorkspaceLease lease = lease_workspace(biggest);
  if (lease.data() == nullptr) batches.assign(1, Batch{n, false});
  size_t c0 = 0;
  for (const Batch& b : batches) {
    size_t c1 = c0;
    while (c1 < chunks.size() && static_cast<size_t>(chunks[c1].tensor) < b.end) ++c1;
    const std::vector<Chunk> batch(chunks.begin() + c0, chunks.begin() + c1);
    const Kept kept{b.keep ? lease.data() : nullptr, offset.data()};
    reduce_pass(a, coef, batch, kept, st);
    apply_pass(a, radii, coef, batch, kept, st);
    c0 = c1;
  }
}

// The coefficients of pass 1 and pass 2 (u with lr = 1; lr enters through the norms), from
// the step numbers the counters hold after this step's increment.
std::vector<AdamCoef> unit_coefs(const StepArgs& a, std::vector<AdamCoef> coef,
                                 const std::vector<double>& step_numbers) {
  const double* hp = a.hyper.data_ptr<double>();
  for (size_t i = 0; i < coef.size(); ++i) {
    coef[i] = unit_lr(coef[i], hp + i * kHyperCols, step_numbers[i]);
  }
  return coef;
}

std::vector<Chunk> chunks_of(at::TensorList params) {
  std::vector<int64_t> numels;
  numels.reserve(params.size());
  for (const auto& p : params) numels.push_back(p.numel());
  return plan_chunks(numels);
}

}  // namespace

at::Tensor fused_adamh_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList radii,
                        const at::Tensor& hyper, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  const size_t n = params.size();
  check_hyperball_args(op, args, radii);
  float* found = check_found_inf(op, found_inf);
  if (found != nullptr && (*found != 0.0f || any_nonfinite(grads))) {
    // A non-finite gradient (here or in an earlier op): write nothing. Pass one writes the
    // moments, so the scan comes first (+4 B/element; the same bytes as a pass one that
    // defers its moment writes to pass two).
    *found = 1.0f;
    return hyper.new_zeros({static_cast<int64_t>(n), 3});
  }
  std::vector<double> step_numbers;
  std::vector<AdamCoef> coef = advance_steps(args, &step_numbers);
  coef = unit_coefs(args, std::move(coef), step_numbers);
  at::Tensor stats = at::zeros({static_cast<int64_t>(n), 3}, hyper.options().device(at::kCPU));
  two_passes(args, radii, coef, stats.data_ptr<double>());
  return stats;
}

at::Tensor fused_adamh_reduce_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList steps,
                               const at::Tensor& hyper,
                               const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_reduce_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  check_no_weight_decay(op, args);
  float* found = check_found_inf(op, found_inf);
  if (found != nullptr && (*found != 0.0f || any_nonfinite(grads))) {
    *found = 1.0f;
    return hyper.new_zeros({static_cast<int64_t>(params.size()), 3});
  }
  std::vector<double> step_numbers;
  std::vector<AdamCoef> coef = advance_steps(args, &step_numbers);
  coef = unit_coefs(args, std::move(coef), step_numbers);
  at::Tensor stats =
      at::zeros({static_cast<int64_t>(params.size()), 3}, hyper.options().device(at::kCPU));
  reduce_pass(args, coef, chunks_of(params), Kept{}, stats.data_ptr<double>());
  return stats;
}

void fused_adamh_apply_(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList steps, at::TensorList radii, const at::Tensor& hyper,
                        const at::Tensor& sums, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_apply_";
  // Pass 2 reads no gradient: the parameters stand in for them in the shared checks.
  const StepArgs args{params, params, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  check_hyperball_args(op, args, radii);
  check_hyperball_sums(op, args, sums, c10::DeviceType::CPU);
  const float* found = check_found_inf(op, found_inf);
  if (found != nullptr && *found != 0.0f) return;  // pass 1 was skipped: write nothing
  std::vector<double> step_numbers;
  std::vector<AdamCoef> coef = current_coefs(args, &step_numbers);
  coef = unit_coefs(args, std::move(coef), step_numbers);
  apply_pass(args, radii, coef, chunks_of(params), Kept{}, sums.data_ptr<double>());
}

}  // namespace cpu
}  // namespace lvopt
