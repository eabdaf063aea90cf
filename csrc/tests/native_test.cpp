// Native tests of the CPU kernels, without Python: each op against an fp64 evaluation of
// docs/design.md section 2 written out here independently, through the dispatcher as Python calls
// them. Built by CMakeLists.txt, also with AddressSanitizer/UBSan (make sanitize).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "cpu/workspace.h"
#include "ops.h"

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

using Lists = std::vector<std::vector<at::Tensor>>;  // params, grads, m, v, steps

Lists make_state(const std::vector<std::vector<int64_t>>& shapes, at::ScalarType dt) {
  Lists l(5);
  for (const auto& s : shapes) {
    l[0].push_back(at::randn(s).to(dt));
    l[1].push_back(at::randn(s).to(dt));
    l[2].push_back(at::randn(s) * 0.1);
    l[3].push_back(at::rand(s) * 0.01 + 1e-6);
    l[4].push_back(at::zeros({}, at::kFloat) + 2.0);
  }
  return l;
}

at::Tensor make_hyper(int64_t n, double wd, bool maximize) {
  at::Tensor h = at::empty({n, 6}, at::kDouble);
  auto a = h.accessor<double, 2>();
  for (int64_t i = 0; i < n; ++i) {
    a[i][0] = 1e-3 * (1 + i);
    a[i][1] = 0.9;
    a[i][2] = 0.95 + 0.001 * i;
    a[i][3] = wd;
    a[i][4] = 1e-8;
    a[i][5] = maximize ? 1.0 : 0.0;
  }
  return h;
}

Lists clone(const Lists& l) {
  Lists c(l.size());
  for (size_t k = 0; k < l.size(); ++k)
    for (const auto& t : l[k]) c[k].push_back(t.clone());
  return c;
}

// The AdamW of docs/design.md section 2.1 in fp64, in place on fp64 copies.
void ref_adamw(std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
               std::vector<at::Tensor>& m, std::vector<at::Tensor>& v, double step,
               const at::Tensor& hyper) {
  auto h = hyper.accessor<double, 2>();
  for (size_t i = 0; i < p.size(); ++i) {
    const double lr = h[i][0], b1 = h[i][1], b2 = h[i][2], wd = h[i][3], eps = h[i][4];
    at::Tensor gg = h[i][5] != 0 ? -g[i].to(at::kDouble) : g[i].to(at::kDouble);
    p[i].mul_(1 - lr * wd);
    m[i].mul_(b1).add_(gg * (1 - b1));
    v[i].mul_(b2).add_(gg * gg * (1 - b2));
    const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
    p[i].sub_((lr / bc1) * m[i] / (v[i].sqrt() / std::sqrt(bc2) + eps));
  }
}

void ref_adamh(std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
               std::vector<at::Tensor>& m, std::vector<at::Tensor>& v, double step,
               const at::Tensor& hyper, const std::vector<double>& radius) {
  auto h = hyper.accessor<double, 2>();
  for (size_t i = 0; i < p.size(); ++i) {
    const double lr = h[i][0], b1 = h[i][1], b2 = h[i][2], eps = h[i][4];
    at::Tensor gg = g[i].to(at::kDouble);
    m[i].mul_(b1).add_(gg * (1 - b1));
    v[i].mul_(b2).add_(gg * gg * (1 - b2));
    const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
    at::Tensor u = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
    at::Tensor w = p[i] - lr * radius[i] * u / u.norm();
    p[i].copy_(radius[i] * w / w.norm());
  }
}

std::vector<at::Tensor> to_double(const std::vector<at::Tensor>& l) {
  std::vector<at::Tensor> out;
  for (const auto& t : l) out.push_back(t.to(at::kDouble));
  return out;
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  if (b.numel() == 0) return 0.0;
  return ((a.to(at::kDouble) - b).abs().max() / b.abs().max().clamp_min(1e-30)).item<double>();
}

const std::vector<std::vector<int64_t>> kShapes = {{1},         {17}, {33, 65},
                                                   {65536 + 3}, {0},  {3, 4, 5}};

void test_adamw(at::ScalarType dt, bool maximize) {
  Lists s = make_state(kShapes, dt);
  auto rp = to_double(s[0]), rm = to_double(s[2]), rv = to_double(s[3]);
  at::Tensor hyper = make_hyper(static_cast<int64_t>(kShapes.size()), 0.1, maximize);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lvopt::fused_adamw_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, std::optional<at::TensorList>)>();
  for (int step = 3; step <= 5; ++step) {
    op.call(s[0], s[1], s[2], s[3], s[4], hyper, std::nullopt, std::nullopt, std::nullopt);
    ref_adamw(rp, s[1], rm, rv, step, hyper);
  }
  const double tol = dt == at::kFloat ? 1e-5 : 2e-2;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    const std::string what = std::string("adamw ") + c10::toString(dt) +
                             (maximize ? " maximize" : "") + " tensor " + std::to_string(i);
    check(max_rel(s[0][i], rp[i]) < tol, what + " params");
    check(max_rel(s[2][i], rm[i]) < 1e-5 && max_rel(s[3][i], rv[i]) < 1e-5, what + " moments");
    check(s[4][i].item<float>() == 5.0f, what + " step count");
  }
}

// cap_bytes: the workspace cap for the step (csrc/cpu/workspace.h): u kept in one batch, in
// several, not at all for a tensor larger than the cap, or never (0). The step has more than
// the 4 Mi elements below which u is always recomputed.
void test_adamh(int64_t cap_bytes) {
  const std::vector<std::vector<int64_t>> shapes = {{33, 65}, {300, 257}, {1, 70001}, {2048, 2049}};
  const int64_t old_cap = lvopt::cpu::set_workspace_limit_bytes(cap_bytes);
  const std::string tag = " (workspace cap " + std::to_string(cap_bytes) + " B)";
  Lists s = make_state(shapes, at::kFloat);
  std::vector<at::Tensor> radii;
  std::vector<double> r;
  for (const auto& p : s[0]) {
    radii.push_back(p.to(at::kDouble).norm());
    r.push_back(radii.back().item<double>());
  }
  auto rp = to_double(s[0]), rm = to_double(s[2]), rv = to_double(s[3]);
  at::Tensor hyper = make_hyper(static_cast<int64_t>(shapes.size()), 0.0, false);
  for (int step = 3; step <= 5; ++step) {
    lvopt::cpu::fused_adamh_(s[0], s[1], s[2], s[3], s[4], radii, hyper, std::nullopt);
    ref_adamh(rp, s[1], rm, rv, step, hyper, r);
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    check(max_rel(s[0][i], rp[i]) < 1e-5, "adamh tensor " + std::to_string(i) + tag);
    const double norm = s[0][i].to(at::kDouble).norm().item<double>();
    check(std::abs(norm / r[i] - 1) < 1e-6, "adamh norm kept " + std::to_string(i) + tag);
  }
  lvopt::cpu::set_workspace_limit_bytes(old_cap);
}

void test_threads_give_same_bits() {
  Lists a = make_state({{300001}, {129, 257}}, at::kFloat);
  Lists b = clone(a);
  at::Tensor hyper = make_hyper(2, 0.1, false);
  const int n = at::get_num_threads();
  at::set_num_threads(1);
  lvopt::cpu::fused_adamw_(a[0], a[1], a[2], a[3], a[4], hyper, std::nullopt, std::nullopt);
  at::set_num_threads(n);
  lvopt::cpu::fused_adamw_(b[0], b[1], b[2], b[3], b[4], hyper, std::nullopt, std::nullopt);
  bool same = true;
  for (int k : {0, 2, 3})
    for (size_t i = 0; i < a[k].size(); ++i) same = same && at::equal(a[k][i], b[k][i]);
  check(same, "thread count does not change bits");
}

void test_errors_write_nothing() {
  Lists s = make_state({{4, 4}, {6}}, at::kFloat);
  Lists before = clone(s);
  s[1][1] = at::randn({7});
  bool threw = false;
  try {
    lvopt::cpu::fused_adamw_(s[0], s[1], s[2], s[3], s[4], make_hyper(2, 0.1, false), std::nullopt,
                             std::nullopt);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("grads[1] has shape") != std::string::npos;
  }
  check(threw, "shape mismatch raises a clear error");
  bool same = true;
  for (int k : {0, 2, 3, 4})
    for (size_t i = 0; i < s[k].size(); ++i) same = same && at::equal(s[k][i], before[k][i]);
  check(same, "a step that raises writes nothing");
}

// nonfinite="skip": one NaN or inf anywhere (last element of the last tensor, a bf16 tensor)
// leaves every parameter, moment and step count as it was and sets found_inf.
void test_nonfinite_skip(at::ScalarType dt, float bad) {
  Lists s = make_state({{70000}, {33, 65}}, dt);
  s[1][1].view(-1)[33 * 65 - 1] = bad;
  Lists before = clone(s);
  at::Tensor found = at::zeros({1}, at::kFloat);
  lvopt::cpu::fused_adamw_(s[0], s[1], s[2], s[3], s[4], make_hyper(2, 0.1, false), found,
                           std::nullopt);
  bool same = true;
  for (int k : {0, 2, 3, 4})
    for (size_t i = 0; i < s[k].size(); ++i) same = same && at::equal(s[k][i], before[k][i]);
  const std::string what =
      std::string("nonfinite ") + c10::toString(dt) + " " + std::to_string(bad);
  check(same && found.item<float>() == 1.0f, what + ": adamw skipped, found_inf set");
  std::vector<at::Tensor> radii = {at::ones({}, at::kDouble), at::ones({}, at::kDouble)};
  found.zero_();
  lvopt::cpu::fused_adamh_(s[0], s[1], s[2], s[3], s[4], radii, make_hyper(2, 0.0, false), found);
  for (int k : {0, 2, 3, 4})
    for (size_t i = 0; i < s[k].size(); ++i) same = same && at::equal(s[k][i], before[k][i]);
  check(same && found.item<float>() == 1.0f, what + ": adamh skipped, found_inf set");
  // A clean step with found_inf given steps normally and leaves the flag at 0.
  s[1][1].view(-1)[33 * 65 - 1] = 0.5f;
  found.zero_();
  lvopt::cpu::fused_adamw_(s[0], s[1], s[2], s[3], s[4], make_hyper(2, 0.1, false), found,
                           std::nullopt);
  check(found.item<float>() == 0.0f && s[4][0].item<float>() == before[4][0].item<float>() + 1,
        what + ": finite gradients step");
}

// track=True: stats hold sum W_before^2 and sum (W_after - W_before)^2 per tensor.
void test_stats(at::ScalarType dt) {
  Lists s = make_state({{70001}, {33, 65}, {0}}, dt);
  std::vector<at::Tensor> w0;
  for (const auto& p : s[0]) w0.push_back(p.to(at::kDouble));
  at::Tensor stats = at::empty({3, 2}, at::kDouble);
  lvopt::cpu::fused_adamw_(s[0], s[1], s[2], s[3], s[4], make_hyper(3, 0.1, false), std::nullopt,
                           stats);
  bool ok = true;
  for (size_t i = 0; i < 3; ++i) {
    const double ww = w0[i].pow(2).sum().item<double>();
    const double dd = (s[0][i].to(at::kDouble) - w0[i]).pow(2).sum().item<double>();
    const double* st = stats.data_ptr<double>() + 2 * i;
    // fp32 partials of 16 squares per lane, then fp64: within fp32 rounding.
    ok = ok && std::abs(st[0] - ww) <= 1e-7 * std::max(ww, 1.0) &&
         std::abs(st[1] - dd) <= 1e-7 * std::max(dd, 1e-30);
  }
  check(ok, std::string("stats ") + c10::toString(dt));
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dt : {at::kFloat, at::kBFloat16})
    for (bool maximize : {false, true}) test_adamw(dt, maximize);
  for (int64_t cap :
       {int64_t{512} << 20, int64_t{4} * (2048 * 2049 + 16), int64_t{4} * 80000, int64_t{0}}) {
    test_adamh(cap);
  }
  test_threads_give_same_bits();
  test_errors_write_nothing();
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    for (float bad : {NAN, INFINITY, -INFINITY}) test_nonfinite_skip(dt, bad);
    test_stats(dt);
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
